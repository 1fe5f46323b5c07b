"""Noise schedules, sampling, and the run folder format shared by training and the audits.

Run folder (written by ddpm_conditional.py):
    config.json                     the full training config (+ words, embedding source)
    conditioning.safetensors        jl_matrix (in_dim x 128), word_table (n_words x 128)
    checkpoints/latest              name of the newest complete checkpoint
    checkpoints/step-XXXXXXXX/      state.safetensors (model.*, ema.*, optim.*) + state.json
    metrics.csv  loss.png  samples/epoch-XXX.png

Checkpoints are written to a temporary folder and renamed, so a killed run never leaves a
half-written checkpoint behind ``latest``; nothing is loaded with pickle.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffusion_from_scratch.cli import InputError
from diffusion_from_scratch.modules import ConditionalUNet, UNetConfig
from diffusion_from_scratch.utils import atomic_write_json, atomic_write_text

SAMPLERS = ("ddpm", "ddim", "dpm")


# ----------------------------------------------------------------------------- schedules
def train_scheduler(num_timesteps: int, beta_schedule: str, prediction_type: str) -> DDPMScheduler:
    """The forward process: linear betas 1e-4 -> 0.02 (Ho et al. 2020, the original) or the
    cosine schedule (Nichol & Dhariwal 2021, diffusers' "squaredcos_cap_v2")."""
    return DDPMScheduler(num_train_timesteps=num_timesteps, beta_start=1e-4, beta_end=0.02,
                         beta_schedule=beta_schedule, prediction_type=prediction_type, clip_sample=False)


def sampling_scheduler(train: DDPMScheduler, sampler: str, steps: int):
    """A sampler built from the training schedule's config; ``ddpm`` with all steps is the
    original's 1,000-step ancestral sampler, ``ddim``/``dpm`` are the fast ones."""
    if sampler not in SAMPLERS:
        raise InputError(f"--sampler: expected one of {SAMPLERS}, got {sampler!r}")
    if sampler == "ddpm":
        scheduler = DDPMScheduler.from_config(train.config)
    elif sampler == "ddim":
        scheduler = DDIMScheduler.from_config(train.config, set_alpha_to_one=True, timestep_spacing="trailing")
    else:
        scheduler = DPMSolverMultistepScheduler.from_config(train.config, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    return scheduler


def min_snr_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), SNR = abar / (1 - abar).

    For an epsilon target w = min(SNR, gamma) / SNR; for a v target w = min(SNR, gamma) / (SNR + 1);
    gamma <= 0 gives w = 1 (plain MSE).
    """
    if gamma <= 0:
        return torch.ones(len(t), device=t.device)
    abar = alphas_cumprod.to(t.device)[t]
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "epsilon":
        return clipped / snr
    return clipped


@torch.no_grad()
def sample(model: torch.nn.Module, word_vectors: torch.Tensor, scheduler, guidance: float,
           generator: torch.Generator, batch_size: int = 256) -> torch.Tensor:
    """Images for each row of ``word_vectors`` (N, word_dim), as uint8 (N, 3, S, S).

    Classifier-free guidance ``out = uncond + s * (cond - uncond)`` with the conditional and
    unconditional halves in one batched forward; s = 1 is the model's own conditional and
    needs only the conditional half.
    """
    config = model.config
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(word_vectors), batch_size):
        words = word_vectors[start:start + batch_size].to(device)
        n = len(words)
        x = torch.randn(n, config.in_channels, config.image_size, config.image_size, generator=generator).to(device)
        # multistep solvers keep a step index and past outputs: start each batch afresh
        scheduler.set_timesteps(len(scheduler.timesteps))
        for t in scheduler.timesteps:
            t_batch = torch.full((n,), int(t), device=device, dtype=torch.long)
            if guidance == 1.0:
                out = model(x, t_batch, words)
            else:
                both = model(torch.cat([x, x]), torch.cat([t_batch, t_batch]),
                             torch.cat([words, torch.zeros_like(words)]))
                cond, uncond = both.chunk(2)
                out = uncond + guidance * (cond - uncond)
            step_generator = generator if isinstance(scheduler, DDPMScheduler) else None
            x = scheduler.step(out, t, x, generator=step_generator).prev_sample
        outputs.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(outputs)


# ----------------------------------------------------------------------------- checkpoints
def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                meta["scalars"][f"{index}.{key}"] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, ema: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, extra: dict, keep: int = 2) -> Path:
    """Write checkpoints/step-N atomically (tmp folder + rename), point ``latest`` at it, prune old ones."""
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
    optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors |= optim_tensors
    save_file(tensors, str(tmp / "state.safetensors"))
    atomic_write_json(tmp / "state.json", {"step": step, "optimizer": optim_meta} | extra)
    for name in ("state.safetensors", "state.json"):  # make the contents durable before the rename
        with open(tmp / name, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_text(ckpt_root / "latest", final.name + "\n")
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise InputError(f"{pointer} names {path.name}, which does not exist; the run folder is damaged")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of one checkpoint; a truncated or corrupt file raises InputError."""
    try:
        tensors = load_file(str(Path(path) / "state.safetensors"))
        meta = json.loads((Path(path) / "state.json").read_text())
    except (SafetensorError, OSError, json.JSONDecodeError, ValueError) as error:
        raise InputError(f"checkpoint {path} is truncated or corrupt ({error}); nothing was changed. Delete it "
                         f"and point {Path(path).parent / 'latest'} at an older step to resume from there") from None
    return tensors, meta


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    return _unflatten_optimizer(tensors, meta["optimizer"])


# ----------------------------------------------------------------------------- loading a run
class TrainedRun:
    """A finished (or running) training run: EMA model, schedule, and word projection."""

    def __init__(self, run_dir: str | Path, device: torch.device | None = None, use_ema: bool = True,
                 checkpoint: str = ""):
        self.run_dir = Path(run_dir)
        config_path = self.run_dir / "config.json"
        if not config_path.is_file():
            raise InputError(f"--run: {self.run_dir} is not a training run folder (no config.json)")
        if checkpoint:  # a specific step-N folder of this run
            checkpoint = self.run_dir / "checkpoints" / checkpoint
            if not checkpoint.is_dir():
                raise InputError(f"--checkpoint: {checkpoint} does not exist")
        else:
            checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            raise InputError(f"--run: {self.run_dir} has no checkpoint yet (checkpoints/latest missing)")
        self.config = json.loads(config_path.read_text())
        self.device = device or torch.device("cpu")
        tensors, self.state = load_checkpoint(checkpoint)
        conditioning = load_file(str(self.run_dir / "conditioning.safetensors"))
        self.jl_matrix = conditioning["jl_matrix"].numpy()
        self.words = list(self.config["words"])
        self.model = ConditionalUNet(UNetConfig(**self.config["unet"]), conditioning["word_table"])
        self.model.load_state_dict(prefixed(tensors, "ema." if use_ema else "model."))
        self.model.to(self.device).eval()
        self.scheduler = train_scheduler(self.config["num_train_timesteps"], self.config["beta_schedule"],
                                         self.config["prediction"])
        self.step = int(self.state["step"])

    def word_vectors(self, words: list[str]) -> torch.Tensor:
        """Projected conditioning vectors for any vocabulary word (seen in training or not),
        through the same embedding, debiasing and seeded JL matrix as training."""
        from diffusion_from_scratch.word_vectors import word_table

        table, matrix = word_table(words, source=self.config["embedding"], debias=self.config["debias"],
                                   jl_seed=self.config["jl_seed"], dim=self.config["jl_dim"])
        if not np.allclose(matrix, self.jl_matrix, atol=1e-6):
            raise InputError(f"{self.run_dir}: the JL matrix rebuilt from jl_seed={self.config['jl_seed']} differs "
                             f"from the saved one; the word vectors would not match training")
        return torch.from_numpy(np.asarray(table, dtype=np.float32))
