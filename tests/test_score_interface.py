"""k -> timestep: the table of set_timesteps(n) with the scheduler's own spacing and offset."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from bias_begets_bias.cli import InputError
from bias_begets_bias.pipeline import train_scheduler
from statistical_auditing.core.score_interface import ScoreModel, largest_k, timestep_table

# Stable Diffusion 2.1's scheduler/scheduler_config.json (no timestep_spacing key: each class's default applies)
SD21 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, prediction_type="v_prediction")


class TableModel(ScoreModel):
    """Only the table matters here."""

    def __init__(self, scheduler, n):
        self.timesteps = timestep_table(scheduler, n)
        self.alphas_cumprod = scheduler.alphas_cumprod
        self.device = torch.device("cpu")

    def encode(self, images):
        raise NotImplementedError

    def predict_eps(self, x_t, t, conditions):
        raise NotImplementedError


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_sd_scheduler_1000_steps_k_is_t(cls):
    # leading spacing, step ratio 1000 // 1000 = 1, offset 1: timesteps 1000, 999, ..., 1
    model = TableModel(cls(**SD21), 1000)
    assert model.timesteps[:2].tolist() == [1000, 999] and model.timesteps[-2:].tolist() == [2, 1]
    assert [model.timestep_for_k(k) for k in (1, 5, 20, 999)] == [1, 5, 20, 999]
    with pytest.raises(InputError, match=r"k=1000 is outside the timestep table: expected 1 <= k <= 999"):
        model.timestep_for_k(1000)  # t = 1000 has no alphas_cumprod entry (the original would index past it)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_sd_scheduler_100_steps_k_is_10k_minus_9(cls):
    # step ratio 1000 // 100 = 10: timesteps 990 + 1, ..., 10 + 1, 0 + 1; timesteps[-k] = 10 (k - 1) + 1
    model = TableModel(cls(**SD21), 100)
    assert [model.timestep_for_k(k) for k in (1, 2, 5, 50, 100)] == [1, 11, 41, 491, 991]
    with pytest.raises(InputError, match=r"k=101 is outside the timestep table: expected 1 <= k <= 100$"):
        model.timestep_for_k(101)


def test_euler_keeps_linspace_when_integer_and_falls_back_to_leading():
    # linspace(0, 999, 1000) reversed = 999, ..., 0 (integers; Euler ignores steps_offset there)
    model = TableModel(EulerDiscreteScheduler(**SD21), 1000)
    assert [model.timestep_for_k(k) for k in (1, 5, 1000)] == [0, 4, 999]
    # linspace(0, 999, 100) is fractional (0, 10.09, ...): leading spacing instead, as DDPM's
    assert TableModel(EulerDiscreteScheduler(**SD21), 100).timesteps.tolist() == list(range(991, 0, -10))


def test_pixel_training_scheduler_k_is_k_minus_1():
    # the from-scratch training scheduler: leading, steps_offset 0
    scheduler = train_scheduler(1000, "linear", "epsilon")
    model = TableModel(scheduler, 1000)
    assert model.timesteps.tolist() == list(range(999, -1, -1))  # the table the pixel audit always used
    assert [model.timestep_for_k(k) for k in (1, 5, 1000)] == [0, 4, 999]
    hundred = TableModel(scheduler, 100)
    assert [hundred.timestep_for_k(k) for k in (1, 2, 100)] == [0, 10, 990]
    assert len(scheduler.timesteps) == 1000  # the caller's scheduler is not changed by the table


def test_bad_number_of_steps_and_k_are_refused():
    for n in (0, 1001):
        with pytest.raises(InputError, match=f"--num_inference_steps: {n} is outside 1..1000"):
            timestep_table(DDPMScheduler(**SD21), n)
    model = TableModel(DDPMScheduler(**SD21), 10)
    with pytest.raises(InputError, match="k=0 is outside the timestep table: expected 1 <= k <= 10"):
        model.timestep_for_k(0)
    assert largest_k(torch.tensor([1000, 999, 5, 1]), 1000) == 3
    assert largest_k(torch.tensor([999, 0]), 1000) == 2
