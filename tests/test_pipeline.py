import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from bias_begets_bias.cli import InputError
from bias_begets_bias.modules import ConditionalUNet, UNetConfig
from bias_begets_bias.pipeline import (SAMPLERS, TrainedRun, grad_scaler_state, latest_checkpoint,
                                             load_checkpoint, remove_orphaned_checkpoints, restore_grad_scaler,
                                             sample, sampling_scheduler, save_checkpoint, train_scheduler)
from bias_begets_bias.utils import atomic_write_json


def tiny_unet() -> ConditionalUNet:
    torch.manual_seed(0)
    return ConditionalUNet(UNetConfig(image_size=8, widths=(4, 8, 8, 8), bottleneck=8, attention=(0,) * 6,
                                      norm_groups=1)).eval()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_in_several_batches_equals_one_batch_per_call(sampler):
    """Every batch starts the sampler afresh (multistep solvers keep state between steps)."""
    model, words = tiny_unet(), torch.randn(4, 128)
    train = train_scheduler(1000, "squaredcos_cap_v2", "v_prediction")
    together = sample(model, words, sampling_scheduler(train, sampler, 5), 2.0, torch.Generator().manual_seed(3),
                      batch_size=2)
    generator = torch.Generator().manual_seed(3)
    apart = torch.cat([sample(model, words[i:i + 2], sampling_scheduler(train, sampler, 5), 2.0, generator)
                       for i in (0, 2)])
    assert together.shape == (4, 3, 8, 8) and together.dtype == torch.uint8
    assert torch.equal(together, apart)


# ----------------------------------------------------------------------------- ancestral sampler variance
@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ddpm_step_noise_is_the_configured_variance_by_hand(variance):
    """One ancestral step at t = 999 of the linear schedule with zero predicted noise: the result
    minus the same step without noise is sigma z, sigma^2 = beta_999 = 0.02 for ``beta`` (the
    original's sqrt(beta_t)) and beta-tilde = (1 - abar_998) / (1 - abar_999) * 0.02 for ``posterior``."""
    train = train_scheduler(1000, "linear", "epsilon", ddpm_variance=variance)
    scheduler = sampling_scheduler(train, "ddpm", 1000)
    assert scheduler.config.variance_type == {"posterior": "fixed_small", "beta": "fixed_large"}[variance]
    x, eps = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 3, 4, 4)
    noisy = scheduler.step(eps, 999, x, generator=torch.Generator().manual_seed(5)).prev_sample
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    sigma2 = 0.02 if variance == "beta" else float((1 - abar[998]) / (1 - abar[999]) * 0.02)
    mean = x.double() / math.sqrt(1 - 0.02)  # x0-form posterior mean with eps = 0: x_t / sqrt(alpha_t)
    assert torch.allclose(noisy.double(), mean + math.sqrt(sigma2) * z.double(), atol=2e-5)
    # an explicit argument overrides what the schedule carries
    assert sampling_scheduler(train, "ddpm", 10, ddpm_variance="posterior").config.variance_type == "fixed_small"


def test_sample_steps_beyond_the_timestep_table_are_refused():
    with pytest.raises(InputError, match="--sample_steps"):
        sampling_scheduler(train_scheduler(1000, "linear", "epsilon"), "ddim", 5000)


def test_trained_run_samples_with_the_variance_it_was_configured_with(tmp_path, smoke_run):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    assert TrainedRun(run).scheduler.config.variance_type == "fixed_small"
    config = json.loads((run / "config.json").read_text())
    atomic_write_json(run / "config.json", config | {"ddpm_variance": "beta"})
    assert sampling_scheduler(TrainedRun(run).scheduler, "ddpm", 20).config.variance_type == "fixed_large"
    del config["ddpm_variance"]  # a run saved before the setting existed sampled with the posterior variance
    atomic_write_json(run / "config.json", config)
    assert TrainedRun(run).scheduler.config.variance_type == "fixed_small"


# ----------------------------------------------------------------------------- checkpoints
def tiny_state() -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    model, ema = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    return model, ema, optimizer


def test_grad_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    """A CPU GradScaler after an overflow (scale 1024 -> 512) and two good steps (growth tracker 2)
    is restored exactly from state.json, and then behaves as the original on the next steps."""
    model, ema, optimizer = tiny_state()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    for loss_scale in (float("inf"), 1.0, 1.0):
        optimizer.zero_grad()
        scaler.scale(model(torch.ones(1, 2)).sum() * loss_scale).backward()
        scaler.step(optimizer)
        scaler.update()
    assert (scaler.get_scale(), scaler.state_dict()["_growth_tracker"]) == (512.0, 2)
    path = save_checkpoint(tmp_path, 3, model, ema, optimizer, {"grad_scaler": grad_scaler_state(scaler)})
    _, meta = load_checkpoint(path)
    restored = torch.amp.GradScaler("cpu")
    restore_grad_scaler(restored, meta["grad_scaler"])
    assert restored.state_dict() == scaler.state_dict()
    for s in (scaler, restored):  # the third good step doubles the scale in both
        optimizer.zero_grad()
        s.scale(model(torch.ones(1, 2)).sum()).backward()
        s.unscale_(optimizer)
        s.update()
    assert restored.get_scale() == scaler.get_scale() == 1024.0
    assert grad_scaler_state(None) is None and grad_scaler_state(torch.amp.GradScaler("cpu", enabled=False)) is None


def test_pruning_keeps_the_newest_and_never_the_one_latest_names(tmp_path):
    model, ema, optimizer = tiny_state()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, ema, optimizer, {}, keep=2)
    names = lambda: sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))  # noqa: E731
    assert names() == ["step-00000002", "step-00000003"]
    save_checkpoint(tmp_path, 9, model, ema, optimizer, {}, keep=2)
    (tmp_path / "checkpoints" / "latest").write_text("step-00000002\n")  # a user resumes from an older step
    save_checkpoint(tmp_path, 3, model, ema, optimizer, {}, keep=1)
    assert names() == ["step-00000003", "step-00000009"] and latest_checkpoint(tmp_path).name == "step-00000003"
    with pytest.raises(InputError, match="--keep_checkpoints: must be at least 1"):
        save_checkpoint(tmp_path, 4, model, ema, optimizer, {}, keep=0)


def test_a_checkpoint_without_the_latest_pointer_is_still_found(tmp_path):
    """A kill between the checkpoint folder's rename and the pointer update leaves a complete step-N."""
    model, ema, optimizer = tiny_state()
    save_checkpoint(tmp_path, 2, model, ema, optimizer, {}, keep=5)
    save_checkpoint(tmp_path, 10, model, ema, optimizer, {}, keep=5)
    (tmp_path / "checkpoints" / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step-00000010"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_a_flipped_bit_is_an_error_naming_the_file(tmp_path):
    model, ema, optimizer = tiny_state()
    path = save_checkpoint(tmp_path, 1, model, ema, optimizer, {"epoch": 0})
    tensors, meta = load_checkpoint(path)
    assert torch.equal(tensors["model.weight"], model.weight.detach()) and meta["epoch"] == 0
    data = bytearray((path / "state.safetensors").read_bytes())
    data[-1] ^= 0x10
    (path / "state.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"{path / 'state.safetensors'} is truncated or corrupt: its sha256"):
        load_checkpoint(path)


def test_corrupt_conditioning_is_named(tmp_path, smoke_run):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    data = bytearray((run / "conditioning.safetensors").read_bytes())
    data[-1] ^= 0x01
    (run / "conditioning.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match="conditioning.safetensors is corrupt"):
        TrainedRun(run)
    (run / "conditioning.safetensors").unlink()
    with pytest.raises(InputError, match="conditioning.safetensors: missing"):
        TrainedRun(run)
    (run / "config.json").write_text('{"train": ')
    with pytest.raises(InputError, match="config.json: cannot read the run's config"):
        TrainedRun(run)


@pytest.mark.integration  # a process is started to get the pid of a dead writer
def test_orphaned_checkpoint_folders_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = tmp_path / "checkpoints"
    orphan, mine, alive = (root / f".tmp-step-00000003-{pid}" for pid in (dead.pid, os.getpid(), os.getppid()))
    for folder in (orphan, mine, alive):
        folder.mkdir(parents=True)
    assert sorted(remove_orphaned_checkpoints(tmp_path)) == sorted([orphan, mine])
    assert alive.exists() and not orphan.exists() and not mine.exists()
