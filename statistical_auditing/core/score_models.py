"""The from-scratch pixel model as a ``ScoreModel``, and ``load_score_model`` for either family.

The interface itself (``ScoreModel``, ``to_epsilon``, ``timestep_table``) lives in
score_interface.py, which both this module and sd_models.py import; it is re-exported here.
"""
from __future__ import annotations

import zlib

import torch

from statistical_auditing.core.score_interface import (DEFAULT_INFERENCE_STEPS, ScoreModel, alphas_cumprod_at,  # noqa: F401
                                                  timestep_table, to_epsilon)


class PixelScoreModel(ScoreModel):
    """A from-scratch run (diffusion_from_scratch/ddpm_conditional.py) as a ScoreModel.

    Pixel space: ``encode`` maps [0, 1] images to [-1, 1] at the run's resolution.
    Conditions are words: any vocabulary word is projected through the run's saved JL
    matrix; "" is the unconditional branch (zero word half).
    """

    def __init__(self, run_dir: str, device: torch.device | None = None, use_ema: bool = True,
                 num_inference_steps: int = DEFAULT_INFERENCE_STEPS):
        from bias_begets_bias.pipeline import TrainedRun

        self.run = TrainedRun(run_dir, device, use_ema=use_ema)
        self.device = self.run.device
        self.model = self.run.model
        self.prediction_type = self.run.config["prediction"]
        self.alphas_cumprod = self.run.scheduler.alphas_cumprod.to(self.device)
        # the training scheduler has steps_offset 0: n = 1000 gives 999 ... 0, n = 100 gives 990 ... 0
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = timestep_table(self.run.scheduler, self.num_inference_steps)
        self.use_ema = use_ema
        self.image_size = self.model.config.image_size
        self._vectors: dict[str, torch.Tensor] = {}
        self.evaluations = 0  # UNet evaluations (images x conditions), for cost reports

    def identity(self) -> dict:
        """The run's checkpoint step and the CRC32 of its config.json (a run trained further, or
        another run, gives another identity), and which weights are used."""
        return {"family": "pixel", "run_step": self.run.step, "use_ema": self.use_ema,
                "run_config_crc32": zlib.crc32((self.run.run_dir / "config.json").read_bytes())}

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
