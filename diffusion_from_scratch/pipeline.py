"""Noise schedules, sampling, and the run folder format shared by training and the audits.

Run folder (written by ddpm_conditional.py):
    config.json                     the full training config (+ words, embedding source, sha256 of
                                    conditioning.safetensors)
    conditioning.safetensors        jl_matrix (in_dim x 128), word_table (n_words x 128)
    checkpoints/latest              name of the newest complete checkpoint
    checkpoints/step-XXXXXXXX/      state.safetensors (model.*, ema.*, optim.*) + state.json (step,
                                    optimizer scalars, lr scheduler and GradScaler state, sha256 of
                                    state.safetensors)
    metrics.csv  loss.png  samples/epoch-XXX.png

Checkpoints are written to a temporary folder and renamed, so a killed run never leaves a
half-written checkpoint behind ``latest``; loading verifies the recorded sha256, so a
corrupted file is an error naming it; nothing is loaded with pickle.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as safetensors_bytes

from diffusion_from_scratch.cli import InputError
from diffusion_from_scratch.modules import ConditionalUNet, UNetConfig
from diffusion_from_scratch.utils import MAX_TEXT_FILE_BYTES, atomic_write_bytes, atomic_write_json, atomic_write_text

SAMPLERS = ("ddpm", "ddim", "dpm")
# The sampler of the bias audit, which its fidelity control (fidelity.py) and the dose-response
# must share: one definition, so that a change of the audit's sampler cannot leave them behind.
# DPM-Solver++ 50 (README, "The tiny recipe": 20 steps collapse the mixed words' scenes).
AUDIT_SAMPLER = "dpm"
AUDIT_SAMPLE_STEPS = 50  # [1, inf)
# The ancestral (ddpm) sampler's noise variance at step t -> t', as diffusers' variance_type:
# posterior = beta-tilde = (1 - abar_t') / (1 - abar_t) * beta (Ho et al. 2020's sigma^2 = beta-tilde);
# beta = beta = 1 - abar_t / abar_t' (the original's sqrt(beta_t) noise scale, "fixed_large").
DDPM_VARIANCES = {"posterior": "fixed_small", "beta": "fixed_large"}
CHECKPOINT_TMP_PREFIX = ".tmp-step-"  # checkpoints/.tmp-step-XXXXXXXX-<pid>: a checkpoint being written


# ----------------------------------------------------------------------------- schedules
def train_scheduler(num_timesteps: int, beta_schedule: str, prediction_type: str,
                    ddpm_variance: str = "posterior") -> DDPMScheduler:
    """The forward process: linear betas 1e-4 -> 0.02 (Ho et al. 2020, the original) or the
    cosine schedule (Nichol & Dhariwal 2021, diffusers' "squaredcos_cap_v2").

    ``ddpm_variance`` (a key of DDPM_VARIANCES) is carried in the config, so that every
    ancestral sampler built from this schedule by ``sampling_scheduler`` uses it.
    """
    if ddpm_variance not in DDPM_VARIANCES:
        raise InputError(f"--ddpm_variance: expected one of {tuple(DDPM_VARIANCES)}, got {ddpm_variance!r}")
    return DDPMScheduler(num_train_timesteps=num_timesteps, beta_start=1e-4, beta_end=0.02,
                         beta_schedule=beta_schedule, prediction_type=prediction_type, clip_sample=False,
                         variance_type=DDPM_VARIANCES[ddpm_variance])


def sampling_scheduler(train: DDPMScheduler, sampler: str, steps: int, ddpm_variance: str | None = None):
    """A sampler built from the training schedule's config; ``ddpm`` with all steps is the
    1,000-step ancestral sampler (noise variance: ``ddpm_variance``, by default the one the
    schedule carries, i.e. the run's: see ``train_scheduler``), ``ddim``/``dpm`` are the fast ones."""
    if sampler not in SAMPLERS:
        raise InputError(f"--sampler: expected one of {SAMPLERS}, got {sampler!r}")
    if not 1 <= steps <= train.config.num_train_timesteps:
        raise InputError(f"--sample_steps: need 1 <= steps <= {train.config.num_train_timesteps} (the timestep "
                         f"table), got {steps}")
    if sampler == "ddpm":
        overrides = {} if ddpm_variance is None else {"variance_type": DDPM_VARIANCES[ddpm_variance]}
        scheduler = DDPMScheduler.from_config(train.config, **overrides)
    elif sampler == "ddim":
        scheduler = DDIMScheduler.from_config(train.config, set_alpha_to_one=True, timestep_spacing="trailing")
    else:
        scheduler = DPMSolverMultistepScheduler.from_config(train.config, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    return scheduler


def training_timesteps(n: int, low: int, high: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """n training timesteps in {low .. high - 1}.

    ``shift`` = 1: uniform, t ~ U{low .. high - 1} (Ho et al. 2020). ``shift`` = s != 1: the
    timestep shift of Esser et al. 2024 (SD3, eq. 23) on u ~ U(0, 1):
    u' = s * u / (1 + (s - 1) * u), t = low + floor(u' * (high - low)); s > 1 moves samples to
    high noise, where a sample's global attributes (hair, scene) are decided, e.g. s = 3 puts
    half of them in the top quarter of the schedule (u' >= 3/4 iff u >= 1/2).
    """
    if shift == 1.0:  # the draws every run before this setting made
        return torch.randint(low, high, (n,), generator=generator)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    shifted = shift * u / (1 + (shift - 1) * u)
    return (low + torch.floor(shifted * (high - low))).long().clamp(max=high - 1)


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


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _step_of(folder: Path) -> int:
    return int(folder.name.split("-", 1)[1])


def _step_folders(ckpt_root: Path) -> list[Path]:
    """The complete checkpoints (step-N folders) under ``ckpt_root``, oldest first."""
    if not ckpt_root.is_dir():
        return []
    folders = [f for f in ckpt_root.glob("step-*") if f.is_dir() and f.name[len("step-"):].isdigit()]
    return sorted(folders, key=_step_of)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, ema: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, extra: dict, keep: int = 2) -> Path:
    """Write checkpoints/step-N atomically (tmp folder + rename), point ``latest`` at it, prune old ones.

    state.json holds ``extra`` (JSON values only: the lr scheduler's and GradScaler's
    state_dicts go here) and the sha256 of state.safetensors, which ``load_checkpoint``
    verifies. Pruning keeps this checkpoint and the ``keep - 1`` newest older ones, and
    never removes the one ``latest`` names.
    """
    if keep < 1:
        raise InputError(f"--keep_checkpoints: must be at least 1 (the checkpoint 'latest' names), got {keep}")
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f"{CHECKPOINT_TMP_PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)  # mode 0o777 & ~umask, as any folder
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
    optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors |= optim_tensors
    data = safetensors_bytes(tensors)
    atomic_write_bytes(tmp / "state.safetensors", data)  # fsynced before the rename below
    atomic_write_json(tmp / "state.json", {"step": step, "optimizer": optim_meta, "sha256": sha256_hex(data)} | extra)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_text(ckpt_root / "latest", final.name + "\n")
    older = [f for f in _step_folders(ckpt_root) if _step_of(f) < step]
    for old in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_orphaned_checkpoints(run_dir: Path) -> list[Path]:
    """Delete checkpoints/.tmp-step-N-<pid> folders whose writer (pid) is no longer running:
    what a kill during a checkpoint leaves behind (hundreds of MB at the paper's size)."""
    removed = []
    for tmp in (Path(run_dir) / "checkpoints").glob(f"{CHECKPOINT_TMP_PREFIX}*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            if pid != os.getpid():
                os.kill(pid, 0)
                continue  # its writer still runs
        except (ValueError, IndexError, ProcessLookupError):
            pass
        except PermissionError:
            continue  # another user's live process
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names; without that file, the newest step-N folder
    (a step-N folder only exists complete: a kill between its rename and the pointer update
    leaves it so); None when there is none."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        folders = _step_folders(pointer.parent)
        return folders[-1] if folders else None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read {pointer} ({error}); the run folder is damaged") from None
    path = pointer.parent / name
    if not name or not path.is_dir():
        raise InputError(f"{pointer} names {name!r}, which does not exist; the run folder is damaged")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of one checkpoint; a truncated or corrupt file, or one whose sha256
    differs from the one recorded in state.json, raises InputError naming it."""
    path = Path(path)
    tensor_file, meta_file = path / "state.safetensors", path / "state.json"
    advice = (f"nothing was changed. Delete {path} and point {path.parent / 'latest'} at an older step "
              f"to resume from there")
    try:
        data = tensor_file.read_bytes()
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta, dict):
            raise ValueError("state.json is not a JSON object")
        expected = meta.get("sha256")
        if expected is not None and sha256_hex(data) != expected:
            raise InputError(f"checkpoint file {tensor_file} is truncated or corrupt: its sha256 differs from the "
                             f"one recorded in {meta_file}; {advice}")
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"checkpoint {path} is truncated or corrupt ({error}); {advice}") from None
    return tensors, meta


def grad_scaler_state(scaler) -> dict | None:
    """The fp16 GradScaler's state as JSON values (scale, growth tracker, factors, interval);
    None without an enabled scaler."""
    if scaler is None or not scaler.is_enabled():
        return None
    return {k: (v.item() if torch.is_tensor(v) else v) for k, v in scaler.state_dict().items()}


def restore_grad_scaler(scaler, state: dict | None) -> None:
    """Load ``grad_scaler_state``'s output into ``scaler`` (nothing to do when either is absent)."""
    if scaler is not None and scaler.is_enabled() and state:
        scaler.load_state_dict(dict(state))


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    return _unflatten_optimizer(tensors, meta["optimizer"])


# ----------------------------------------------------------------------------- loading a run
RUN_CONFIG_KEYS = ("train", "unet", "words", "num_train_timesteps", "beta_schedule", "prediction")


def read_run_config(path: Path) -> dict:
    """A run's config.json; a missing, truncated or foreign file raises InputError naming it."""
    try:
        if Path(path).stat().st_size > MAX_TEXT_FILE_BYTES:
            raise ValueError(f"{Path(path).stat().st_size} bytes, too large for a config")
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        detail = getattr(error, "strerror", None) or error
        raise InputError(f"{path}: cannot read the run's config ({detail})") from None
    missing = [k for k in RUN_CONFIG_KEYS if k not in config] if isinstance(config, dict) else list(RUN_CONFIG_KEYS)
    if missing:
        raise InputError(f"{path}: not a training run's config (missing {', '.join(missing)})")
    return config


def load_conditioning(run_dir: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """conditioning.safetensors of a run (jl_matrix, word_table), checked against the sha256 its
    config.json recorded (runs saved before the checksum existed are not checked)."""
    path = Path(run_dir) / "conditioning.safetensors"
    try:
        data = path.read_bytes()
        if expected_sha256 is not None and sha256_hex(data) != expected_sha256:
            raise InputError(f"{path} is corrupt: its sha256 differs from the one recorded in "
                             f"{Path(run_dir) / 'config.json'}")
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, OSError) as error:
        raise InputError(f"{path}: missing or unreadable ({getattr(error, 'strerror', None) or error}); the run "
                         f"folder is incomplete") from None
    if "jl_matrix" not in tensors or "word_table" not in tensors:
        raise InputError(f"{path}: expected the tensors jl_matrix and word_table")
    return tensors


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
        self.config = read_run_config(config_path)
        self.device = device or torch.device("cpu")
        tensors, self.state = load_checkpoint(checkpoint)
        conditioning = load_conditioning(self.run_dir, self.config.get("conditioning_sha256"))
        self.jl_matrix = conditioning["jl_matrix"].numpy()
        self.saved_word_table = conditioning["word_table"].numpy()
        try:
            self.words = list(self.config["words"])
            if not all(isinstance(word, str) for word in self.words):
                raise ValueError("'words' must be a list of strings")
            self.model = ConditionalUNet(UNetConfig(**self.config["unet"]), conditioning["word_table"])
            self.model.load_state_dict(prefixed(tensors, "ema." if use_ema else "model."))
            # Runs saved before the ddpm_variance setting existed sampled with the posterior variance.
            self.scheduler = train_scheduler(int(self.config["num_train_timesteps"]), self.config["beta_schedule"],
                                             self.config["prediction"], self.config.get("ddpm_variance", "posterior"))
            self.step = int(self.state["step"])
        except (TypeError, ValueError, KeyError, RuntimeError, NotImplementedError) as error:
            detail = " ".join(str(error).split())[:300]
            raise InputError(f"{config_path}: does not describe the model of {checkpoint} ({type(error).__name__}: "
                             f"{detail}); the run folder is damaged") from None
        self.model.to(self.device).eval()

    def word_vectors(self, words: list[str]) -> torch.Tensor:
        """Conditioning vectors for any vocabulary word (seen in training or not), through the
        same embedding and debiasing as training and the run's SAVED JL matrix (the run folder
        is the record; ``check_conditioning`` verifies it once)."""
        from diffusion_from_scratch.word_vectors import conditioning_table

        self.check_conditioning()
        table = conditioning_table(words, self.embedding, self.jl_matrix, self.config["debias"])
        return torch.from_numpy(np.asarray(table, dtype=np.float32))

    @property
    def embedding(self):
        from diffusion_from_scratch.word_vectors import load_word_vectors

        return load_word_vectors(self.config["embedding"])

    def check_conditioning(self) -> None:
        """Once per run: the saved training-word table must be what the embedding gives through the
        saved matrix (else the embedding file changed and new words would not match training);
        a saved matrix that its jl_seed no longer rebuilds (another scikit-learn, say) is only
        noted, because the saved matrix is the one the model was trained with."""
        if getattr(self, "_conditioning_checked", False):
            return
        from diffusion_from_scratch.word_vectors import conditioning_table, jl_matrix

        expected = conditioning_table(self.words, self.embedding, self.jl_matrix, self.config["debias"])
        if not np.allclose(expected, self.saved_word_table, atol=1e-5):
            raise InputError(f"{self.run_dir / 'conditioning.safetensors'}: the training words' vectors from word "
                             f"vectors {self.config['embedding']!r} through the saved JL matrix differ from the "
                             f"saved ones; the embedding source is not the one this run was trained with")
        rebuilt = jl_matrix(self.jl_matrix.shape[0], self.jl_matrix.shape[1], self.config["jl_seed"])
        if not np.allclose(rebuilt, self.jl_matrix, atol=1e-6):
            print(f"note: {self.run_dir}: jl_seed={self.config['jl_seed']} no longer rebuilds the saved JL matrix "
                  f"(another scikit-learn?); using the saved matrix, as in training", file=sys.stderr)
        self._conditioning_checked = True
