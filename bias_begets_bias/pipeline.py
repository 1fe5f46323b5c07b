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

A kept run (``export_weights``): config.json, conditioning.safetensors and ema.safetensors (the
EMA model's tensors only, fp16 by default, with step, source sha256 and dtype in its metadata);
TrainedRun loads it as it loads a training run, so it can be re-audited without training.

Checkpoints are written to a temporary folder and renamed, so a killed run never leaves a
half-written checkpoint behind ``latest``; loading verifies the recorded sha256, so a
corrupted file is an error naming it; nothing is loaded with pickle.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as safetensors_bytes

from bias_begets_bias.cli import InputError
from bias_begets_bias.modules import ConditionalUNet, UNetConfig
from bias_begets_bias.utils import (MAX_TEXT_FILE_BYTES, atomic_write_bytes, atomic_write_json, atomic_write_text,
                                          resolve_recorded_path)

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
EXPORTED_WEIGHTS = "ema.safetensors"  # the EMA weights of a kept run (export_weights)
EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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


# Training settings that are not the recipe: the run's identity (its arm, JL seed and training seed),
# where its files were, which follow from those (conditioning_sha256), and how the machine ran it.
IDENTITY_KEYS = ("debias", "jl_seed", "seed")
NOT_RECIPE_KEYS = ("run_dir", "dataset_path", "class_words", "conditioning_sha256", "num_threads", "resume", "device",
                   "wandb")


def training_recipe(training: dict) -> dict:
    """The settings of a run's config.json that must agree between runs pooled together: every
    top-level and ``train`` setting except IDENTITY_KEYS and NOT_RECIPE_KEYS (and their
    ``*_sha256``). ``class_words`` of ``train`` is the word file's path; its content is the
    top-level ``class_words`` table, which is compared."""
    def kept(key: str, top: bool) -> bool:
        if top and key in ("train", "class_words"):  # compared key by key; the class words table itself
            return key == "class_words"
        return not {key, key.removesuffix("_sha256")} & {*IDENTITY_KEYS, *NOT_RECIPE_KEYS}

    recipe = {key: value for key, value in training.items() if kept(key, True)}
    train = training.get("train") if isinstance(training.get("train"), dict) else {}
    return recipe | {f"train.{key}": value for key, value in train.items() if kept(key, False)}


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


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes: the format is an 8-byte little-endian
    header length, then that many bytes of JSON whose ``__metadata__`` maps strings to strings."""
    length = int.from_bytes(data[:8], "little")
    if len(data) < 8 + length:
        raise ValueError("the header is truncated")
    header = json.loads(data[8:8 + length])
    return dict(header.get("__metadata__") or {})


def run_checkpoint(run_dir: Path, checkpoint: str) -> Path:
    """The checkpoint ``--checkpoint`` names: a step-N folder of THIS run's checkpoints/ (by name,
    or by a path that leads there); anything else (another run's checkpoint, a folder elsewhere)
    raises InputError, so that results are never reported under the wrong run."""
    root = Path(run_dir) / "checkpoints"
    own = {folder.resolve(): folder for folder in _step_folders(root)}
    given = Path(checkpoint).expanduser()
    candidate = given if given.is_absolute() or given.parts[:1] in ((".",), ("..",)) or len(given.parts) > 1 \
        else root / given
    found = own.get(candidate.resolve()) if candidate.exists() else None
    if found is None:
        names = ", ".join(folder.name for folder in own.values()) or "none"
        raise InputError(f"--checkpoint: {checkpoint} is not one of the checkpoints of the run {run_dir} "
                         f"(its checkpoints/: {names})")
    return found


def export_weights(run_dir: str | Path, dest_dir: str | Path, dtype: torch.dtype = torch.float16,
                   checkpoint: str = "") -> Path:
    """Write a kept copy of a run to ``dest_dir``: ema.safetensors (the EMA model's tensors of the
    latest checkpoint, or of ``checkpoint``, floating ones cast to ``dtype``; no raw model, no
    optimizer; metadata: step, the source checkpoint's sha256, dtype), and copies of
    conditioning.safetensors and config.json. Every file is written atomically. TrainedRun
    loads the folder as a run (weights cast back to float32)."""
    run_dir, dest_dir = Path(run_dir), Path(dest_dir)
    if dtype not in EXPORT_DTYPES.values():
        raise InputError(f"export_weights: dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype}")
    source = run_checkpoint(run_dir, checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if source is None:
        raise InputError(f"--run: {run_dir} has no checkpoint to export (checkpoints/latest missing)")
    if dest_dir.resolve() == run_dir.resolve() or (dest_dir / "checkpoints").exists():
        raise InputError(f"export: {dest_dir} is a training run folder; export into a folder of its own")
    config = read_run_config(run_dir / "config.json")
    conditioning = load_conditioning(run_dir, config.get("conditioning_sha256"))  # checked before it is copied
    del conditioning
    tensors, state = load_checkpoint(source)
    ema = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in prefixed(tensors, "ema.").items()}
    if not ema:
        raise InputError(f"{source}: holds no EMA weights (ema.*)")
    name = next(key for key, value in EXPORT_DTYPES.items() if value == dtype)
    source_sha = state.get("sha256") or sha256_hex((source / "state.safetensors").read_bytes())
    data = safetensors_bytes(ema, metadata={"step": str(int(state["step"])), "source_sha256": str(source_sha),
                                            "source_checkpoint": source.name, "dtype": name})
    atomic_write_bytes(dest_dir / EXPORTED_WEIGHTS, data)
    atomic_write_bytes(dest_dir / "conditioning.safetensors", (run_dir / "conditioning.safetensors").read_bytes())
    atomic_write_bytes(dest_dir / "config.json", (run_dir / "config.json").read_bytes())
    return dest_dir


def load_exported_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The EMA tensors of a kept run's ema.safetensors, cast to float32 for compute, and a state
    dict (step, source sha256, dtype) from its metadata; a damaged file raises InputError."""
    try:
        data = Path(path).read_bytes()
        meta = safetensors_metadata(data)
        tensors = load_safetensors_bytes(data)
        state = {"step": int(meta["step"]), "source_sha256": meta.get("source_sha256"), "dtype": meta.get("dtype")}
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        raise InputError(f"{path}: truncated or not exported weights ({type(error).__name__}: {error}); export "
                         f"the run again") from None
    return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}, state


class TrainedRun:
    """A finished (or running) training run, or a kept copy of one (``export_weights``): EMA
    model, schedule, and word projection."""

    def __init__(self, run_dir: str | Path, device: torch.device | None = None, use_ema: bool = True,
                 checkpoint: str = ""):
        self.run_dir = Path(run_dir)
        config_path = self.run_dir / "config.json"
        if not config_path.is_file():
            raise InputError(f"--run: {self.run_dir} is not a training run folder (no config.json)")
        exported = self.run_dir / EXPORTED_WEIGHTS
        self.kept = not (self.run_dir / "checkpoints").exists() and exported.is_file()
        if self.kept:
            if checkpoint:
                raise InputError(f"--checkpoint: {self.run_dir} is a kept run with only its final EMA weights "
                                 f"({EXPORTED_WEIGHTS}), no checkpoints")
            if not use_ema:
                raise InputError(f"{self.run_dir} is a kept run: it holds only the EMA weights, not the raw model")
            checkpoint = exported
        elif checkpoint:  # one of this run's own step-N folders
            checkpoint = run_checkpoint(self.run_dir, checkpoint)
        else:
            checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            raise InputError(f"--run: {self.run_dir} has no checkpoint yet (checkpoints/latest missing)")
        self.checkpoint = checkpoint
        self.config = read_run_config(config_path)
        self.device = device or torch.device("cpu")
        if self.kept:
            tensors, self.state = load_exported_weights(checkpoint)
            tensors = {f"ema.{k}": v for k, v in tensors.items()}
        else:
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
        self.check_config_against_conditioning()
        self.model.to(self.device).eval()

    def check_config_against_conditioning(self) -> None:
        """config.json must describe the saved conditioning: jl_dim its width, words its rows,
        jl_seed the seed that rebuilds its JL matrix, and the train block the same embedding,
        debias, jl_seed and jl_dim as the top level. A hand-edited key raises InputError naming
        config.json and the key (the saved tensors are what the model was trained with)."""
        from bias_begets_bias.word_vectors import debias_mode, jl_matrix

        path = self.run_dir / "config.json"
        train = self.config.get("train") if isinstance(self.config.get("train"), dict) else {}
        for key in ("embedding", "debias", "jl_seed", "jl_dim"):
            if key not in self.config:
                continue
            top, inner = self.config[key], train.get(key, self.config[key])
            if key == "debias":
                try:
                    top, inner = debias_mode(top), debias_mode(inner)
                except InputError:
                    raise InputError(f"{path}: key 'debias' = {self.config[key]!r} is not a debias mode") from None
            if top != inner:
                raise InputError(f"{path}: key '{key}' = {self.config[key]!r} differs from train.{key} = "
                                 f"{train.get(key)!r}; the config was edited, restore it")
        rows, width = self.saved_word_table.shape
        if len(self.words) != rows:
            raise InputError(f"{path}: key 'words' lists {len(self.words)} words, but conditioning.safetensors holds "
                             f"{rows} rows")
        if "jl_dim" in self.config and self.config["jl_dim"] != width or self.jl_matrix.shape[1] != width:
            raise InputError(f"{path}: key 'jl_dim' = {self.config.get('jl_dim')!r}, but conditioning.safetensors "
                             f"holds {width}-dimensional vectors")
        if "jl_seed" in self.config:
            seed = self.config["jl_seed"]
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 32:
                raise InputError(f"{path}: key 'jl_seed' = {seed!r} is not a seed in [0, 2**32)")
            rebuilt = jl_matrix(self.jl_matrix.shape[0], width, seed)
            if not np.allclose(rebuilt, self.jl_matrix, atol=1e-6):
                raise InputError(f"{path}: key 'jl_seed' = {seed} does not rebuild the JL matrix saved in "
                                 f"conditioning.safetensors (the run was trained with another seed, or another "
                                 f"scikit-learn draws differently); restore the run's config.json")

    def word_vectors(self, words: list[str]) -> torch.Tensor:
        """Conditioning vectors for any vocabulary word (seen in training or not), through the
        same embedding and debiasing as training and the run's SAVED JL matrix (the run folder
        is the record; ``check_conditioning`` verifies it once)."""
        from bias_begets_bias.word_vectors import conditioning_table

        self.check_conditioning()
        table = conditioning_table(words, self.embedding, self.jl_matrix, self.config["debias"])
        return torch.from_numpy(np.asarray(table, dtype=np.float32))

    @property
    def embedding_source(self) -> str:
        """config.json's embedding as ``word_vectors.load_word_vectors`` takes it: a named source, or
        a word2vec file recorded relative to the repository (older runs: absolute) found here."""
        from bias_begets_bias.word_vectors import SOURCES

        source = self.config["embedding"]
        if isinstance(source, str) and source not in SOURCES:
            return str(resolve_recorded_path(source, self.run_dir, self.config.get("embedding_sha256")))
        return source

    @property
    def embedding(self):
        from bias_begets_bias.word_vectors import load_word_vectors

        return load_word_vectors(self.embedding_source)

    def check_conditioning(self) -> None:
        """Once per run: the saved training-word table must be what config.json's embedding and
        debias give through the saved JL matrix (else the config was edited, or the embedding
        file changed, and new words would not match training): InputError naming config.json.
        ``check_config_against_conditioning`` has already checked jl_seed and jl_dim."""
        if getattr(self, "_conditioning_checked", False):
            return
        from bias_begets_bias.word_vectors import conditioning_table

        expected = conditioning_table(self.words, self.embedding, self.jl_matrix, self.config["debias"])
        if not np.allclose(expected, self.saved_word_table, atol=1e-5):
            raise InputError(f"{self.run_dir / 'config.json'}: keys 'embedding' = {self.config['embedding']!r} and "
                             f"'debias' = {self.config['debias']!r} do not give the training words' vectors saved in "
                             f"conditioning.safetensors (through its JL matrix); the config was edited or the "
                             f"embedding source is not the one this run was trained with")
        self._conditioning_checked = True
