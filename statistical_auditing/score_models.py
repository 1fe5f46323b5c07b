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


class PixelScoreModel(ScoreModel):
    """A from-scratch run (diffusion_from_scratch/ddpm_conditional.py) as a ScoreModel.

    Pixel space: ``encode`` maps [0, 1] images to [-1, 1] at the run's resolution.
    Conditions are words: any vocabulary word is projected through the run's saved JL
    matrix; "" is the unconditional branch (zero word half).
    """

    def __init__(self, run_dir: str, device: torch.device | None = None, use_ema: bool = True):
        from diffusion_from_scratch.pipeline import TrainedRun

        self.run = TrainedRun(run_dir, device, use_ema=use_ema)
        self.device = self.run.device
        self.model = self.run.model
        self.prediction_type = self.run.config["prediction"]
        self.alphas_cumprod = self.run.scheduler.alphas_cumprod.to(self.device)
        self.timesteps = self.run.scheduler.timesteps.clone()  # 999 ... 0: the training table
        self.image_size = self.model.config.image_size
        self._vectors: dict[str, torch.Tensor] = {}
        self.evaluations = 0  # UNet evaluations (images x conditions), for cost reports

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        images = images.to(self.device, torch.float32)
        if images.shape[-1] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False).clamp(0, 1)
        return images * 2 - 1

    def condition_vectors(self, conditions: list[str]) -> torch.Tensor:
        """Projected word vectors, computed once per word; "" gives the zero (unconditional) vector."""
        new = [c for c in dict.fromkeys(conditions) if c and c not in self._vectors]
        if new:
            for word, vector in zip(new, self.run.word_vectors(new)):
                self._vectors[word] = vector.to(self.device)
        zero = torch.zeros(self.model.config.word_dim, device=self.device)
        return torch.stack([self._vectors[c] if c else zero for c in conditions])

    @torch.no_grad()
    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, conditions: list[str]) -> torch.Tensor:
        b, k = len(x_t), len(conditions)
        x_t, t = x_t.to(self.device), t.to(self.device).long()
        vectors = self.condition_vectors(conditions)
        x_rep = x_t.repeat_interleave(k, dim=0)
        t_rep = t.repeat_interleave(k, dim=0)
        out = self.model(x_rep, t_rep, vectors.repeat(b, 1)).view(b, k, *x_t.shape[1:])
        self.evaluations += b * k
        return to_epsilon(out.float(), x_t.float(), t, self.alphas_cumprod, self.prediction_type)


def load_score_model(spec: str, device: torch.device | None = None, **sd_options) -> ScoreModel:
    """A from-scratch run folder (has config.json and checkpoints/) or a Stable Diffusion pipeline
    (hub id or local folder); ``sd_options`` go to StableDiffusionScoreModel.from_pretrained."""
    from pathlib import Path

    if (Path(spec) / "config.json").is_file() and (Path(spec) / "checkpoints").is_dir():
        return PixelScoreModel(spec, device)
    from statistical_auditing.sd_models import StableDiffusionScoreModel

    return StableDiffusionScoreModel.from_pretrained(spec, device=device, **sd_options)
