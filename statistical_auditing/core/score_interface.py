"""The ``ScoreModel`` interface both model families implement, and the pieces they share.

A ``ScoreModel`` exposes what ScoreDecomp, the ELBO classifier and the heat-maps need:

- ``encode(images)``: images in [0, 1], shape (B, 3, H, W) -> clean model-space x0
  (identity to [-1, 1] for the pixel model, scaled VAE latents for Stable Diffusion);
- ``timesteps``: the model's timestep table, a 1-D LongTensor in sampling order
  (descending, as diffusers schedulers store it), made by ``timestep_table``;
  ``timestep_for_k(k)`` = ``timesteps[-k]``, i.e. k counted from the clean end as the
  original did (k = 1 is the least noisy);
- ``add_noise(x0, noise, t)``: the forward process q(x_t | x0) at integer timesteps t (B,);
- ``predict_eps(x_t, t, conditions)``: epsilon predictions for every condition in one
  batched forward, shape (B, K, *x_t.shape[1:]), converted to epsilon whatever the
  model's ``prediction_type`` ("epsilon", "v_prediction" or "sample");
- ``identity()``: what a saved result made with this model depends on (a resume key).

Conditions are words for the from-scratch model and prompts for Stable Diffusion; the
empty string "" means the unconditional branch in both.

This module imports neither implementation (score_models.py, sd_models.py), so both can
import it without an import cycle.
"""
from __future__ import annotations

import abc
from typing import Any

import torch

from bias_begets_bias.cli import InputError

# The original's number of inference steps: ``scheduler.set_timesteps(1000)`` in utils_classifier.load_model.
DEFAULT_INFERENCE_STEPS = 1000


def alphas_cumprod_at(alphas_cumprod: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """abar_t gathered at integer timesteps t and shaped to broadcast over an ndim tensor."""
    abar = alphas_cumprod.to(device=t.device)[t.long()]
    return abar.reshape(abar.shape + (1,) * (ndim - abar.ndim))


def to_epsilon(output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
               alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Convert a model output to the epsilon it implies.

    With x_t = sqrt(abar) x0 + sqrt(1 - abar) eps (Ho et al. 2020):
    - "epsilon": eps = output;
    - "v_prediction" (Salimans & Ho 2022, v = sqrt(abar) eps - sqrt(1 - abar) x0):
      eps = sqrt(abar) v + sqrt(1 - abar) x_t;
    - "sample" (x0 prediction): eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar).
    ``output`` may carry extra condition dimensions after the batch one: x_t and t
    broadcast over them.
    """
    abar = alphas_cumprod_at(alphas_cumprod, t, output.ndim).to(output.dtype)
    if output.ndim == x_t.ndim + 1:  # (B, K, ...) outputs against a (B, ...) x_t
        x_t = x_t.unsqueeze(1)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return abar.sqrt() * output + (1 - abar).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - abar.sqrt() * output) / (1 - abar).sqrt()
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def timestep_table(scheduler: Any, num_inference_steps: int = DEFAULT_INFERENCE_STEPS) -> torch.Tensor:
    """The integer timestep table (descending) that ``timesteps[-k]`` indexes, as the original made it.

    The original called ``scheduler.set_timesteps(num_inference_steps)`` (1000) on the model's
    own scheduler; so does this, on a copy built from the scheduler's config, keeping the
    scheduler's spacing and ``steps_offset``. With "leading" spacing, n steps of T training
    timesteps and offset o the table is (T // n) * i + o for i = n-1, ..., 0:
    - SD's schedulers (o = 1): n = 1000 gives 1000, ..., 1 (k -> t = k; k = 1000 would index
      one past alphas_cumprod and is refused by ``timestep_for_k``), n = 100 gives 991, ..., 1
      (k -> t = 10k - 9, the heat-map script's ``--num_timesteps 100``);
    - the from-scratch training scheduler (o = 0): n = 1000 gives 999, ..., 0 (k -> k - 1),
      n = 100 gives 990, ..., 0 (k -> 10 (k - 1)).
    Euler's default "linspace" spacing can give fractional timesteps, which have no
    alphas_cumprod entry; Euler then switches to "leading" spacing (integer timesteps).
    """
    n_train = int(scheduler.config.num_train_timesteps)
    if isinstance(num_inference_steps, bool) or not 1 <= int(num_inference_steps) <= n_train:
        raise InputError(f"--num_inference_steps: {num_inference_steps} is outside 1..{n_train} "
                         f"(the scheduler's num_train_timesteps)")
    scheduler = type(scheduler).from_config(scheduler.config)  # a copy: the caller's scheduler is left as it was
    scheduler.set_timesteps(int(num_inference_steps))
    table = scheduler.timesteps
    if not torch.equal(table, table.round()) and hasattr(scheduler, "sigmas"):
        scheduler.register_to_config(timestep_spacing="leading")
        scheduler.set_timesteps(int(num_inference_steps))
        table = scheduler.timesteps
    return table.round().long()


def largest_k(timesteps: torch.Tensor, num_train_timesteps: int) -> int:
    """The largest k such that timesteps[-1], ..., timesteps[-k] all lie in 0..num_train_timesteps - 1."""
    k = 0
    for t in reversed(timesteps.tolist()):
        if not 0 <= t <= num_train_timesteps - 1:
            break
        k += 1
    return k


class ScoreModel(abc.ABC):
    """Common interface; see the module docstring for the contract of each member."""

    timesteps: torch.Tensor  # sampling order, descending
    alphas_cumprod: torch.Tensor  # indexed by training timestep
    device: torch.device

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, conditions: list[str]) -> torch.Tensor: ...

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (Ho et al. 2020, eq. 4)."""
        abar = alphas_cumprod_at(self.alphas_cumprod, t, x0.ndim).to(x0.dtype)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def timestep_for_k(self, k: int) -> int:
        """timesteps[-k], the timestep k steps from the clean end of the table (k = 1 is the least
        noisy); InputError naming k and the valid range when it is not a training timestep."""
        n_train = len(self.alphas_cumprod)
        k_max = largest_k(self.timesteps, n_train)
        if not 1 <= k <= k_max:
            detail = (f" (timesteps[-{k}] = {int(self.timesteps[-k])} with {len(self.timesteps)} inference steps; "
                      f"the model's timesteps are 0..{n_train - 1})" if 1 <= k <= len(self.timesteps) else "")
            raise InputError(f"k={k} is outside the timestep table: expected 1 <= k <= {k_max}{detail}")
        return int(self.timesteps[-k])

    def identity(self) -> dict:
        """What results made with this model depend on (JSON-serialisable; a resume key)."""
        return {"family": type(self).__name__}
