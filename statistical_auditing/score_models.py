"""One interface over both model families, so every auditing method runs on either.

A ``ScoreModel`` exposes what ScoreDecomp, the ELBO classifier and the heat-maps need:

- ``encode(images)``: images in [0, 1], shape (B, 3, H, W) -> clean model-space x0
  (identity to [-1, 1] for the pixel model, scaled VAE latents for Stable Diffusion);
- ``timesteps``: the model's timestep table, a 1-D LongTensor in sampling order
  (descending, as diffusers schedulers store it); ``timestep_for_k(k)`` = ``timesteps[-k]``,
  i.e. k counted from the clean end as the original did (k = 1 is the least noisy);
- ``add_noise(x0, noise, t)``: the forward process q(x_t | x0) at integer timesteps t (B,);
- ``predict_eps(x_t, t, conditions)``: epsilon predictions for every condition in one
  batched forward, shape (B, K, *x_t.shape[1:]), converted to epsilon whatever the
  model's ``prediction_type`` ("epsilon", "v_prediction" or "sample").

Conditions are words for the from-scratch model and prompts for Stable Diffusion; the
empty string "" means the unconditional branch in both.
"""
from __future__ import annotations

import abc

import torch

from diffusion_from_scratch.cli import InputError


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
        """The timestep k steps from the clean end of the table (k = 1 is the least noisy)."""
        n = len(self.timesteps)
        if not 1 <= k <= n:
            raise InputError(f"k={k} is outside the timestep table: expected 1 <= k <= {n}")
        return int(self.timesteps[-k])
