"""Train the word-conditioned DDPM from scratch on the six-class data.

    python diffusion_from_scratch/ddpm_conditional.py --preset tiny --dataset_path data/generated/portraits/32
    python diffusion_from_scratch/ddpm_conditional.py --run_dir runs/tiny --resume true
    accelerate launch diffusion_from_scratch/ddpm_conditional.py --preset paper --dataset_path <root>/64

Every training image is trained once per word of its class (data/class_words.json): the
conditioning vector is [sinusoidal(t) ; JL(word2vec(word))], with the word half zeroed for
a random share of samples (classifier-free guidance dropout). ``paper`` reproduces the
original's settings (docs/original.md section 3) without its defects; ``tiny`` is the recipe
that obeys its conditioning after a short CPU run (README, "The tiny recipe"); ``smoke``
runs in seconds for the tests.

All randomness (data order, timesteps, noise, dropout, augmentation) is a pure function of
(seed, step), and the checkpoints hold the model, EMA, optimizer, learning-rate scheduler
and fp16 GradScaler states, so a run resumed from a checkpoint continues exactly as if
never stopped. ``--run_dir X --resume true`` alone continues the run with its saved
settings; a flag given explicitly may change the ones in RESUMABLE_OVERRIDES (each change
is printed and recorded in config.json). A run that never saved a checkpoint holds nothing
to keep: the next command for its folder starts it again.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shlex
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes

from bias_begets_bias.cli import (InputError, check_ranges, config_from_constants, constants_of,
                                    parse_number_list, require, run_main)
from bias_begets_bias.modules import EMA, ConditionalUNet, UNetConfig
from bias_begets_bias.word_vectors import DEBIAS_MODES, SOURCES
from bias_begets_bias.pipeline import (DDPM_VARIANCES, SAMPLERS, grad_scaler_state, latest_checkpoint,
                                             load_checkpoint, min_snr_weight, optimizer_state, prefixed,
                                             read_run_config, remove_orphaned_checkpoints, restore_grad_scaler,
                                             sample, sampling_scheduler, save_checkpoint, sha256_hex, train_scheduler,
                                             training_timesteps)
from bias_begets_bias.utils import (DATA_DIR, IMAGE_SUFFIXES, atomic_write_bytes, atomic_write_json,
                                          atomic_write_text, csv_text, derived_seed, file_sha256, load_class_words,
                                          load_json, load_split, progress_bar, record_path, remove_orphaned_temporaries,
                                          require_memory, require_writable, resolve_device, resolve_recorded_path,
                                          save_image_grid, training_vocabulary, writable_folder)

# ----------------------------------------------------------------------------- config
PRESET = "tiny"  # tiny (CPU, minutes) | paper (the original's GPU settings) | smoke (seconds, tests)
DATASET_PATH = "data/generated/portraits/32"  # <root>/<size> holding train/ and test/ class folders
CLASS_WORDS = str(DATA_DIR / "class_words.json")  # class -> its training words
CLASS_BALANCE = 0.9  # [0, 1] refuse data whose smallest class has fewer than this share of the largest's images (0 = any)
RUN_DIR = "runs/tiny"  # output folder of this run
RESUME = False  # continue the run in RUN_DIR from its latest checkpoint (starts it if RUN_DIR has none)
EMBEDDING = "w2v-bundled"  # word-vector source (see word_vectors.py) or a path to a word2vec file
DEBIAS = "none"  # none | hard (Bolukbasi et al. 2016 before the JL projection: the control arm) | projected (after it)
JL_SEED = 0  # [0, 2**32) seed of the Gaussian random projection 300 -> JL_DIM
JL_DIM = 128  # [1, inf) word half of the conditioning vector
IMAGE_SIZE = 32  # [1, inf) training resolution (images of another size are resized)
EPOCHS = 16  # [1, inf) passes over all (image, word) pairs
MAX_STEPS = 0  # [0, inf) stop after this many optimizer steps (0 = run all epochs)
BATCH_SIZE = 32  # [1, inf) images per optimizer step (across all processes)
PAIR_ORDER = "shuffled"  # consecutive (3 steps per batch, one per word: the original) | shuffled pairs
LR = 1e-3  # (0, inf) peak learning rate
ADAM_EPS = 1e-8  # (0, inf) AdamW epsilon
WEIGHT_DECAY = 0.0  # [0, inf) AdamW weight decay
LR_SCHEDULE = "cosine"  # cosine (linear warm-up + cosine decay) | onecycle (the original: lr and beta1) | constant
WARMUP_STEPS = 100  # [0, inf) linear warm-up for the cosine schedule
GRAD_CLIP = 1.0  # [0, inf) max gradient norm (0 = off)
EMA_BETA = 0.995  # [0, 1) EMA decay (horizon ~200 steps, short against a few-thousand-step run)
EMA_WARMUP = 200  # [0, inf) optimizer steps during which the EMA just copies the model
COND_DROPOUT = 0.05  # [0, 1) per-sample probability of zeroing the word half (guidance dropout; the original: 0.05)
PREDICTION = "v_prediction"  # epsilon (the original) | v_prediction | sample
BETA_SCHEDULE = "squaredcos_cap_v2"  # linear (1e-4 -> 0.02, the original) | squaredcos_cap_v2 (cosine)
NUM_TRAIN_TIMESTEPS = 1000  # [1, inf) diffusion steps
MIN_TIMESTEP = 0  # [0, inf) training timesteps t ~ U{MIN_TIMESTEP .. NUM_TRAIN_TIMESTEPS - 1} (the original: 1)
TIMESTEP_SHIFT = 3.0  # (0, inf) SD3's timestep shift of that draw (1 = uniform, > 1 = more samples at high noise)
DDPM_VARIANCE = "posterior"  # ancestral sampler's noise: posterior (beta-tilde) | beta (sqrt(beta_t), the original)
MIN_SNR_GAMMA = 0.0  # [0, inf) min-SNR loss weighting (0 = plain MSE on the target, more weight on high noise)
AUGMENT = "flip"  # none | flip | crop (Resize 1.25x + RandomResizedCrop 0.8-1, the original)
WIDTHS = "16,32,96,96"  # list of ints in [1, inf): channels of inc, down1, down2, down3
BOTTLENECK = 192  # [1, inf) bottleneck channels
ATTENTION = "0,1,1,1,0,0"  # list of ints in [0, 1]: self-attention after down1..3 and up1..3 (1 = on)
NORM_GROUPS = 8  # [1, inf) GroupNorm groups (the original: 1)
WORD_SCALE = 32.0  # (-inf, inf) multiplier of the word half (the time half has norm 8)
COND_MLP = True  # learned MLP on the conditioning vector (EDM-style); False = the original
SCALE_SHIFT = True  # blocks apply it as h * (1 + scale) + shift (ADM's AdaGN); False = + shift (the original)
BOTTLENECK_COND = True  # the bottleneck's convs receive the conditioning too; False = the original (only Down/Up)
CHANNELS_LAST = True  # channels-last memory format (faster convolutions on CPU)
PRECISION = "auto"  # auto (fp16 on CUDA, fp32 elsewhere) | fp32 | fp16 | bf16
DEVICE = ""  # empty = the accelerator if there is one, else cpu
NUM_THREADS = 0  # [0, inf) torch CPU threads (0 = torch's default)
SEED = 789  # [0, 2**63) training seed (the original's)
CHECKPOINT_EVERY = 200  # [1, inf) optimizer steps between checkpoints (and at each epoch end)
KEEP_CHECKPOINTS = 2  # [1, inf) how many recent checkpoints to keep (>= 1; the one `latest` names is never deleted)
SAMPLE_EVERY = 4  # [0, inf) epochs between EMA sample grids (0 = only at the end)
SAMPLE_PER_WORD = 8  # [1, inf) images per word in each grid
SAMPLER = "ddim"  # ddpm (ancestral) | ddim | dpm (DPM-Solver++)
SAMPLE_STEPS = 50  # [1, inf) sampler steps
GUIDANCE = 3.0  # (-inf, inf) classifier-free guidance scale of the sample grids
WANDB = "off"  # off | offline | online (Weights & Biases, optional)

PRESETS = {
    "tiny": {},
    "paper": dict(image_size=64, epochs=81, batch_size=50, pair_order="consecutive", lr=1e-4, adam_eps=1e-5,
                  weight_decay=0.01, lr_schedule="onecycle", grad_clip=0.0, ema_beta=0.995, ema_warmup=2000,
                  cond_dropout=0.05, prediction="epsilon", beta_schedule="linear", min_timestep=1, timestep_shift=1.0,
                  ddpm_variance="beta", min_snr_gamma=0.0, augment="crop", widths="64,128,256,256", bottleneck=512,
                  attention="1,1,1,1,1,1", norm_groups=1, word_scale=1.0, cond_mlp=False, scale_shift=False,
                  bottleneck_cond=False, channels_last=False, checkpoint_every=2000, sample_every=8, sampler="ddpm",
                  sample_steps=1000, dataset_path="data/generated/portraits/64", run_dir="runs/paper"),
    "smoke": dict(epochs=1, max_steps=6, batch_size=8, widths="8,16,16,16", bottleneck=16, attention="0,0,1,0,0,0",
                  norm_groups=4, checkpoint_every=3, sample_every=1, sample_per_word=2, sample_steps=4,
                  warmup_steps=2, ema_warmup=2, run_dir="runs/smoke"),
}
CHOICES = {
    "pair_order": ("consecutive", "shuffled"), "lr_schedule": ("cosine", "onecycle", "constant"),
    "prediction": ("epsilon", "v_prediction", "sample"), "beta_schedule": ("linear", "squaredcos_cap_v2"),
    "augment": ("none", "flip", "crop"), "precision": ("auto", "fp32", "fp16", "bf16"), "sampler": SAMPLERS,
    "ddpm_variance": tuple(DDPM_VARIANCES), "debias": DEBIAS_MODES, "wandb": ("off", "offline", "online"), "preset": tuple(PRESETS),
}
# Flags that may differ when resuming (everything else must match the saved config).
RESUMABLE_OVERRIDES = ("resume", "device", "wandb", "epochs", "max_steps", "num_threads", "sample_every",
                       "checkpoint_every", "keep_checkpoints", "run_dir", "class_balance")
# Overrides that become the run's own settings (written to config.json); the others only
# describe this process's machine (device, threads, logger).
PERSISTED_OVERRIDES = ("epochs", "max_steps", "sample_every", "checkpoint_every", "keep_checkpoints", "class_balance")
# What runs saved before these settings existed did (a resume of such a run keeps doing it).
LEGACY_DEFAULTS = {"min_timestep": 0, "ddpm_variance": "posterior", "timestep_shift": 1.0,
                   "bottleneck_cond": False}
VALIDATION_CHUNK = 256  # [1, inf) held-out images per validation forward pass
# Settings that are paths: config.json records them relative to the repository (else to the run
# folder), so that a record means the same on every machine; a named embedding source is no path.
PATH_SETTINGS = ("dataset_path", "class_words", "run_dir", "embedding")


def is_path_setting(key: str, value) -> bool:
    return key in PATH_SETTINGS and isinstance(value, str) and not (key == "embedding" and value in SOURCES)


def recorded_settings(cfg: dict, run_dir: Path) -> dict:
    """``cfg`` as config.json records it: path settings through ``utils.record_path``."""
    return {key: record_path(value, run_dir) if is_path_setting(key, value) else value for key, value in cfg.items()}


def resolved_settings(cfg: dict, run_dir: Path) -> dict:
    """Path settings read from a config.json (relative, or absolute from another machine) as
    paths on this machine (``utils.resolve_recorded_path``)."""
    return {key: str(resolve_recorded_path(value, run_dir)) if is_path_setting(key, value) and key != "run_dir"
            else value for key, value in cfg.items()}


def unet_config(cfg: dict) -> UNetConfig:
    def ints(text: str, flag: str) -> list[int]:
        return parse_number_list(text, flag, int)

    try:
        return UNetConfig(image_size=cfg["image_size"], widths=tuple(ints(cfg["widths"], "widths")),
                          bottleneck=cfg["bottleneck"], attention=tuple(ints(cfg["attention"], "attention")),
                          norm_groups=cfg["norm_groups"], word_dim=cfg["jl_dim"], word_scale=cfg["word_scale"],
                          cond_mlp=cfg["cond_mlp"], scale_shift=cfg["scale_shift"],
                          bottleneck_cond=cfg["bottleneck_cond"], emb_dim=cfg["jl_dim"] + 128)
    except ValueError as error:
        raise InputError(f"model shape: {error}") from None


def check_room(cfg: dict, ucfg: UNetConfig, n_words: int, dataset: Path, device: torch.device) -> None:
    """Refuse, before the data is loaded, a run whose images and weights cannot fit in memory (the
    images of ``dataset`` as uint8 at --image_size, twice while they are stacked, plus on a CPU
    the model, its EMA, gradients and AdamW's two moments in fp32: a lower bound, activations
    come on top), then build the UNet and run one forward pass on the meta device (no memory,
    no arithmetic), so that a shape the layers refuse stops here, not at the first step."""
    shape_flags = "model shape (--image_size, --widths, --bottleneck, --attention, --norm_groups, --jl_dim)"
    try:
        with torch.device("meta"):
            shape = ConditionalUNet(ucfg, torch.zeros(n_words, ucfg.word_dim))
    except (ValueError, RuntimeError, AssertionError) as error:
        raise InputError(f"{shape_flags}: {' '.join(str(error).split())[:300]}") from None
    n_parameters = sum(p.numel() for p in shape.parameters())
    n_images = 0
    for split in ("train", "test"):
        folder = dataset / split
        if folder.is_dir():
            for class_dir in (c for c in folder.iterdir() if c.is_dir()):
                n_images += sum(1 for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    need = n_images * 3 * cfg["image_size"] ** 2 * 2 + (n_parameters * 4 * 5 if device.type == "cpu" else 0)
    require_memory(need, f"--image_size {cfg['image_size']} with {n_images:,} images and a {n_parameters:,}-parameter "
                         f"UNet")
    try:
        with torch.device("meta"):
            shape(torch.empty(1, ucfg.in_channels, ucfg.image_size, ucfg.image_size), torch.zeros(1, dtype=torch.long),
                  torch.zeros(1, ucfg.word_dim))
    except (ValueError, RuntimeError, AssertionError) as error:
        raise InputError(f"{shape_flags}: {' '.join(str(error).split())[:300]}") from None


def check_config(cfg: dict) -> None:
    """Every numeric setting in the range its constant declares, and the settings that depend on
    each other consistent, before anything is read or written (run on the flags as given and
    again on a resumed run's saved settings)."""
    check_ranges(cfg, constants_of(globals()).ranges)
    n = cfg["num_train_timesteps"]
    require(cfg["min_timestep"] < n,
            f"--min_timestep: must be below --num_train_timesteps {n}, got {cfg['min_timestep']}")
    require(cfg["sample_steps"] <= n, f"--sample_steps: at most --num_train_timesteps ({n}), got {cfg['sample_steps']}")


# ----------------------------------------------------------------------------- the epoch plan
def epoch_plan(labels: torch.Tensor, word_ids: list[list[int]], batch_size: int, order: str,
               seed: int, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The optimizer steps of one epoch as (image indices, word indices) pairs.

    Every image appears once per word of its class. ``consecutive``: a batch of images is
    trained in len(words) consecutive steps, one per word (the original's scheme);
    ``shuffled``: all (image, word) pairs are shuffled across batches.
    """
    generator = torch.Generator().manual_seed(derived_seed(seed, "epoch", epoch))
    per_image = [word_ids[int(c)] for c in labels]
    if order == "shuffled":
        images = torch.tensor([i for i, ws in enumerate(per_image) for _ in ws])
        words = torch.tensor([w for ws in per_image for w in ws])
        perm = torch.randperm(len(images), generator=generator)
        return [(images[perm[s:s + batch_size]], words[perm[s:s + batch_size]])
                for s in range(0, len(perm), batch_size)]
    steps = []
    perm = torch.randperm(len(labels), generator=generator)
    for s in range(0, len(perm), batch_size):
        batch = perm[s:s + batch_size]
        for j in range(max(len(ws) for ws in word_ids)):
            keep = [i for i in batch.tolist() if j < len(per_image[i])]
            steps.append((torch.tensor(keep), torch.tensor([per_image[i][j] for i in keep])))
    return steps


def augment(images: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Float images in [-1, 1]; ``crop`` = RandomResizedCrop(scale 0.8-1, ratio 3/4-4/3) of the
    1.25x-resized image as the original (taken here on the image itself, the same crop family)."""
    if mode == "none":
        return images
    n, _, h, w = images.shape
    flips = torch.rand(n, generator=generator) < 0.5
    if mode == "flip":
        return torch.where(flips[:, None, None, None], images.flip(-1), images)
    out = torch.empty_like(images)
    areas = torch.empty(n).uniform_(0.8, 1.0, generator=generator)
    log_ratios = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    offsets = torch.rand(n, 2, generator=generator)
    for i in range(n):
        ratio = math.exp(log_ratios[i])
        cw = min(w, int(round(math.sqrt(areas[i] * h * w * ratio))))
        ch = min(h, int(round(math.sqrt(areas[i] * h * w / ratio))))
        top, left = int(offsets[i, 0] * (h - ch)), int(offsets[i, 1] * (w - cw))
        crop = images[i:i + 1, :, top:top + ch, left:left + cw]
        out[i] = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
    return out


# ----------------------------------------------------------------------------- loss pieces
def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction: str) -> torch.Tensor:
    """What the network learns to output for x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps:
    eps (``epsilon``), v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (``v_prediction``,
    Salimans & Ho 2022) or x0 (``sample``)."""
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0


def shard_of(n: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's samples of a global batch of n (rank, rank + world, ...) and each one's
    loss weight, world / n.

    DDP averages the processes' gradients, (1 / world) sum_r grad(sum_{i in r} w_i l_i), which
    with w_i = world / n is the gradient of the global mean (1 / n) sum_i l_i however the n
    samples split. A process whose share is empty (n < world on the last batch) gets sample 0
    with weight 0, so it still joins the gradient all-reduce and contributes nothing.
    """
    indices = torch.arange(rank, n, world)
    if len(indices) == 0:
        return torch.zeros(1, dtype=torch.long), torch.zeros(1)
    return indices, torch.full((len(indices),), world / n)


def validation_words(labels: torch.Tensor, word_ids: list[list[int]]) -> torch.Tensor:
    """The word each held-out image is scored with: image i of the held-out set (class c) gets word
    i mod len(words of c)."""
    return torch.tensor([word_ids[int(c)][i % len(word_ids[int(c)])] for i, c in enumerate(labels.tolist())],
                        dtype=torch.long)


def validation_loss(chunk_loss: Callable[[torch.Tensor, torch.Tensor, int], float], n: int,
                    chunk: int = VALIDATION_CHUNK) -> float:
    """Mean per-image loss over all n held-out images, scored in chunks of ``chunk``:
    (1 / n) sum_chunks len(chunk) * chunk_loss(indices, start) with ``chunk_loss`` the chunk's mean."""
    total = 0.0
    for start in range(0, n, chunk):
        indices = torch.arange(start, min(start + chunk, n))
        total += chunk_loss(indices, start) * len(indices)
    return total / n


# ----------------------------------------------------------------------------- learning-rate schedule
def lr_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, total_steps: int):
    """torch's scheduler for ``cfg["lr_schedule"]`` over ``total_steps`` optimizer steps (step it
    once after each optimizer step; lr_s is the rate of step s = 0, 1, ...; L = cfg["lr"]).

    onecycle: ``OneCycleLR(max_lr=L, total_steps)`` with torch's defaults, as the original:
      with a = 0.3 total - 1 and cos(a, b, p) = b + (a - b)(1 + cos(pi p)) / 2, lr_s =
      cos(L/25, L, s/a) for s <= a, then cos(L, L/25/1e4, (s - a)/(total - 1 - a)); and
      (cycle_momentum) AdamW's beta1 = cos(0.95, 0.85, .) then cos(0.85, 0.95, .) on the same phases.
    cosine: ``LinearLR`` warm-up then ``CosineAnnealingLR``: with W = cfg["warmup_steps"],
      lr_s = L (s + 1) / W for s < W, then L (1 + cos(pi (s - W) / (total - W))) / 2.
    constant: ``ConstantLR(factor=1)``: lr_s = L.
    """
    schedulers = torch.optim.lr_scheduler
    if cfg["lr_schedule"] == "onecycle":
        return schedulers.OneCycleLR(optimizer, max_lr=cfg["lr"], total_steps=max(1, total_steps))
    if cfg["lr_schedule"] == "constant":
        return schedulers.ConstantLR(optimizer, factor=1.0, total_iters=0)
    warmup = cfg["warmup_steps"]
    cosine = lambda: schedulers.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup))  # noqa: E731
    if warmup == 0:
        return cosine()
    linear = schedulers.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return schedulers.SequentialLR(optimizer, [linear, cosine()], milestones=[warmup])


def step_scheduler(scheduler) -> None:
    """scheduler.step() without torch's notices (SequentialLR's own step(0) at a milestone, and the
    'step before optimizer.step()' notice when fp16 skips an optimizer step)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()


def lr_scheduler_at(optimizer: torch.optim.Optimizer, cfg: dict, total_steps: int, step: int):
    """``lr_scheduler`` as it stands after ``step`` optimizer steps, replayed from step 0 (the
    param groups' lr, and beta1 for onecycle, are set to the schedule's values at ``step``).
    Used on resume when the run's length changed or its checkpoint holds no scheduler state."""
    for group in optimizer.param_groups:
        group["lr"] = cfg["lr"]
        for key in ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"):
            group.pop(key, None)
    scheduler = lr_scheduler(optimizer, cfg, total_steps)
    for _ in range(min(step, total_steps)):
        step_scheduler(scheduler)
    return scheduler


# ----------------------------------------------------------------------------- run folder
def say(message: str) -> None:
    """Print on the main process only (RANK is set by the launcher of a multi-process run)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


def saved_settings(config_path: Path, cfg: dict) -> dict:
    """The ``train`` block of a run's config.json, completed for settings added since it was
    saved (LEGACY_DEFAULTS: what such runs did; else this command's value)."""
    from bias_begets_bias.word_vectors import debias_mode

    saved = read_run_config(config_path)["train"]
    if not isinstance(saved, dict):
        raise InputError(f"{config_path}: its 'train' entry is not a JSON object")
    merged = {key: saved.get(key, LEGACY_DEFAULTS.get(key, value)) for key, value in cfg.items()}
    merged["debias"] = debias_mode(merged["debias"])  # runs saved before the three modes stored a bool
    return merged


def prepare_run(cfg: dict, explicit: set[str], preset_given: bool = False) -> tuple[dict, Path | None, dict]:
    """(the run's config, the checkpoint to resume from or None, {setting: (saved, new)} changed).

    A folder without a checkpoint holds nothing trained: any command may (re)start it, and
    with --resume true its saved settings are the base. With a checkpoint, --resume true
    continues it with its saved settings; an explicit flag may change those in
    RESUMABLE_OVERRIDES (each change printed), any other differing flag is refused.
    """
    run_dir = Path(cfg["run_dir"])
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"--run_dir: {run_dir} is a file, not a folder")
    checkpoint = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    config_path = run_dir / "config.json"
    if checkpoint is None:
        if not config_path.is_file():
            if cfg["resume"]:
                say(f"--resume: {run_dir} holds no run yet; starting one")
            return cfg, None, {}
        if not cfg["resume"]:
            say(f"--run_dir: {run_dir} holds a run that never saved a checkpoint; starting it again with this "
                f"command's settings")
            return cfg, None, {}
        say(f"--resume: {run_dir} holds a run that never saved a checkpoint; starting it again from step 0 "
            f"with its saved settings")
        allowed = set(cfg)
    else:
        if not cfg["resume"]:
            raise InputError(f"--run_dir: {run_dir} already holds a run (checkpoint {checkpoint.name}); pass "
                             f"--resume true to continue it or choose another folder")
        allowed = set(RESUMABLE_OVERRIDES)
    saved = resolved_settings(saved_settings(config_path, cfg), run_dir)
    for key in explicit:  # a recorded path not found here (a copied or moved run) is what the flag now says
        if is_path_setting(key, saved[key]) and key != "run_dir" and not Path(saved[key]).exists():
            saved[key] = cfg[key]

    def differs(key: str) -> bool:
        if is_path_setting(key, cfg[key]) and is_path_setting(key, saved[key]):
            return Path(saved[key]).expanduser().resolve() != Path(cfg[key]).expanduser().resolve()
        return saved[key] != cfg[key]

    clashes = sorted(k for k in explicit if k not in allowed and differs(k))
    if preset_given and saved.get("preset") != cfg["preset"] and "preset" not in allowed:
        clashes.insert(0, "preset")
    require(not clashes, f"--resume: {', '.join('--' + k for k in clashes)} differ from the saved run in "
                         f"{config_path}; only {', '.join('--' + k for k in RESUMABLE_OVERRIDES)} may change")
    merged = dict(saved) | {"resume": cfg["resume"], "run_dir": cfg["run_dir"]}
    changes = {}
    for key in sorted(explicit & allowed - {"resume", "run_dir"}):
        if differs(key):
            say(f"--{key}: the saved run has {saved[key]!r}; using {cfg[key]!r}")
            changes[key] = (saved[key], cfg[key])
            merged[key] = cfg[key]
    return merged, checkpoint, changes


def finishing_command(root: Path, settings: dict) -> str:
    """The synthetic_data.py command that completes the dataset in ``root`` (its dataset.json)."""
    args = ["python", "diffusion_from_scratch/synthetic_data.py", "--out", str(root)]
    for key in ("source", "per_class", "test_fraction", "seed", "prompts"):
        if key in settings:
            args += [f"--{key}", str(settings[key])]
    if isinstance(settings.get("sizes"), list):
        args += ["--sizes", ",".join(str(s) for s in settings["sizes"])]
    if settings.get("source") == "stable-diffusion":
        args += ["--model", str(settings.get("model")),
                 "--num_inference_steps", str(settings.get("num_inference_steps"))]
    return shlex.join(args)


def check_dataset(dataset: Path, classes: list[str], counts: dict[str, list[int]], balance: float) -> None:
    """Refuse a dataset that a stopped generator left incomplete, or one with badly unbalanced classes.

    ``counts``: split -> images per class found on disk. A dataset made by synthetic_data.py
    (``<root>/dataset.json`` beside ``<root>/<size>``) is complete when its manifest.jsonl
    exists and lists exactly the images found. Then, for any data: the smallest class must
    hold at least ``balance`` times the largest class's images in each split (0 = no check).
    """
    root = dataset.parent
    if (root / "dataset.json").is_file():
        settings = load_json(root / "dataset.json")
        command = finishing_command(root, settings if isinstance(settings, dict) else {})
        manifest = root / "manifest.jsonl"
        if not manifest.is_file():
            raise InputError(f"--dataset_path: the dataset in {root} is incomplete (dataset.json but no "
                             f"manifest.jsonl: synthetic_data.py stopped before the end); finish it with: {command}")
        listed: Counter = Counter()
        try:
            for line in manifest.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if dataset.name in row.get("files", {}):
                        listed[(row["split"], row["class"])] += 1
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise InputError(f"{manifest}: not a readable manifest ({error}); rebuild it with: {command}") from None
        if listed:
            found = Counter({(split, c): n for split, per_class in counts.items() for c, n in zip(classes, per_class)})
            differ = sorted(k for k in set(listed) | set(found) if listed[k] != found[k])
            if differ:
                split, name = differ[0]
                raise InputError(f"--dataset_path: {dataset} does not hold the images {manifest} lists "
                                 f"({len(differ)} class folders differ, e.g. {split}/{name}: {found[differ[0]]} found, "
                                 f"{listed[differ[0]]} listed); restore them with: {command}")
    if balance <= 0:
        return
    for split, per_class in counts.items():
        low, high = min(per_class), max(per_class)
        if low < balance * high:
            shown = ", ".join(f"{c} {n}" for c, n in zip(classes, per_class))
            raise InputError(f"--dataset_path: the classes of {dataset / split} are unbalanced ({shown}): the "
                             f"smallest has {low / high:.0%} of the largest's images, below --class_balance "
                             f"{balance:g}. If synthetic_data.py was stopped early, rerun it with the same --out and "
                             f"settings to finish the set; to train on your own unbalanced data, pass "
                             f"--class_balance 0")


class MetricsLog:
    """metrics.csv (always), optional W&B; rows past a resumed step are dropped first."""

    FIELDS = ("step", "epoch", "train_loss", "lr", "val_loss", "val_loss_ema", "seconds")

    def __init__(self, path: Path, resume_step: int, wandb_mode: str, config: dict):
        self.path = path
        rows = []
        if path.exists() and resume_step > 0:
            try:
                with open(path, newline="") as handle:
                    rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= resume_step]
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
                raise InputError(f"{path}: unreadable metrics ({error}); move it away to start a fresh log") from None
        atomic_write_text(path, csv_text(rows, self.FIELDS))
        # steps whose validation row is already logged (a resume does not repeat them)
        self.validated = {int(r["step"]) for r in rows if r.get("val_loss")}
        self.handle = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.handle, self.FIELDS, lineterminator="\n")
        self.wandb = None
        if wandb_mode != "off":
            try:
                import wandb
                self.wandb = wandb.init(project="bias_begets_bias", dir=str(path.parent), mode=wandb_mode,
                                        config=config, name=path.parent.name, resume="allow")
            except Exception as error:  # noqa: BLE001 - wandb raises many types (missing package, network, login)
                self.handle.close()
                detail = " ".join(f"{type(error).__name__}: {error}".split())[:300]
                raise InputError(f"--wandb {wandb_mode}: Weights & Biases could not start ({detail}); rerun with "
                                 f"--wandb off (the folder {path.parent} accepts the corrected command)") from None

    def log(self, **row) -> None:
        self.writer.writerow({k: row.get(k, "") for k in self.FIELDS})
        self.handle.flush()
        if row.get("val_loss", "") != "":
            self.validated.add(int(row["step"]))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if v != ""}, step=row["step"])

    def close(self) -> None:
        self.handle.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_losses(metrics_path: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = [int(r["step"]) for r in rows if r["train_loss"]]
    train = [float(r["train_loss"]) for r in rows if r["train_loss"]]
    val = [(int(r["step"]), float(r["val_loss"]), float(r["val_loss_ema"])) for r in rows if r["val_loss"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        window = max(1, len(train) // 50)
        smooth = np.convolve(train, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, label=f"train (moving mean of {window})")
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], "o-", label="validation (model)")
        ax.plot([v[0] for v in val], [v[2] for v in val], "s--", label="validation (EMA)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("weighted MSE")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, buffer.getvalue())


# ----------------------------------------------------------------------------- stages of a run
@dataclasses.dataclass
class RunPlan:
    """What a command trains: its settings (merged with a resumed run's), the UNet they describe,
    the checkpoint to continue from (None: step 0) and the resumable settings it changes
    ({setting: (saved, new)})."""

    cfg: dict
    ucfg: UNetConfig
    checkpoint: Path | None
    changes: dict

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg["run_dir"])


@dataclasses.dataclass
class Processes:
    """This process's place in an Accelerate run and the arithmetic it trains in."""

    accelerator: Any
    device: torch.device
    precision: str  # fp32 | fp16 | bf16 (``auto`` resolved)
    rank: int
    world: int
    main_process: bool


@dataclasses.dataclass
class TrainingData:
    """The words, the images of both splits (uint8, at --image_size) and the conditioning table."""

    class_words: dict[str, list[str]]
    classes: list[str]
    vocabulary: list[str]
    word_ids: list[list[int]]  # per class, its words as indices into vocabulary
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    table: torch.Tensor  # vocabulary -> conditioning word vector (after the JL projection)
    jl: np.ndarray  # the JL projection matrix


@dataclasses.dataclass
class Weights:
    """The model, its EMA, the optimizer and learning-rate schedule, restored from the plan's
    checkpoint if any, and the run's length in optimizer steps."""

    model: ConditionalUNet
    ema_model: ConditionalUNet
    optimizer: torch.optim.Optimizer
    schedule: Any  # a torch lr scheduler (lr_scheduler)
    steps_per_epoch: int
    total_steps: int
    start_step: int  # 0, or the checkpoint's step
    state: dict  # the checkpoint's state ({} without one)


@dataclasses.dataclass
class Trainer:
    """Everything a training step, validation, a sample grid and a checkpoint use, placed on the
    device (``model`` and ``optimizer`` as Accelerate prepared them, ``base_model`` unwrapped)."""

    cfg: dict
    run_dir: Path
    data: TrainingData
    accelerator: Any
    device: torch.device
    rank: int
    world: int
    main_process: bool
    model: Any
    base_model: ConditionalUNet
    ema_model: ConditionalUNet
    optimizer: Any
    schedule: Any
    scaler: Any  # Accelerate's fp16 GradScaler, or None
    ema: EMA
    scheduler: Any  # the diffusers noise scheduler
    alphas: torch.Tensor  # its alphas_cumprod on the device
    table_dev: torch.Tensor  # the model's word table
    memory_format: torch.memory_format
    val_words: torch.Tensor
    steps_per_epoch: int
    total_steps: int
    start_step: int


def plan_run(args: list[str]) -> RunPlan:
    """The command line parsed and checked, as given and merged with the run in --run_dir
    (``prepare_run``), before anything is read or written."""
    cfg, explicit = config_from_constants(constants_of(globals()), PRESETS, args, choices=CHOICES,
                                          description=__doc__.splitlines()[0], return_explicit=True)
    preset_given = any(a == "--preset" or a.startswith("--preset=") for a in args)
    check_config(cfg)  # the flags as given ...
    require_writable(Path(cfg["run_dir"]), "run_dir")
    cfg, checkpoint, changes = prepare_run(cfg, explicit, preset_given)
    check_config(cfg)  # ... and merged with a saved run's settings
    return RunPlan(cfg, unet_config(cfg), checkpoint, changes)


def start_processes(cfg: dict) -> Processes:
    """Torch's threads, the device and precision, and Accelerate's processes (every one has read
    the run folder when this returns, so the main one may write to it)."""
    from accelerate import Accelerator

    if cfg["num_threads"] > 0:
        torch.set_num_threads(cfg["num_threads"])
    device = resolve_device(cfg["device"])
    precision = cfg["precision"]
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    require(precision != "fp16" or device.type == "cuda", "--precision fp16: needs a CUDA device")
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), cpu=device.type == "cpu")
    accelerator.wait_for_everyone()  # every process has read the run folder before the main one writes to it
    return Processes(accelerator, accelerator.device, precision, accelerator.process_index,
                     accelerator.num_processes, accelerator.is_main_process)


def load_data(cfg: dict, ucfg: UNetConfig, device: torch.device) -> TrainingData:
    """The class words, both splits of the dataset (after ``check_room``, then ``check_dataset``)
    and the word table."""
    from bias_begets_bias.word_vectors import word_table

    class_words = load_class_words(Path(cfg["class_words"]))
    classes = list(class_words)
    vocabulary = training_vocabulary(class_words)
    word_ids = [[vocabulary.index(w) for w in class_words[c]] for c in classes]

    root = Path(cfg["dataset_path"])
    check_room(cfg, ucfg, len(vocabulary), root, device)
    train_images, train_labels = load_split(root, "train", classes, cfg["image_size"])
    val_images, val_labels = load_split(root, "test", classes, cfg["image_size"])
    check_dataset(root, classes, {split: torch.bincount(labels, minlength=len(classes)).tolist()
                                  for split, labels in (("train", train_labels), ("test", val_labels))},
                  cfg["class_balance"])

    table, jl = word_table(vocabulary, source=cfg["embedding"], debias=cfg["debias"], jl_seed=cfg["jl_seed"],
                           dim=cfg["jl_dim"])
    table = torch.from_numpy(np.asarray(table, dtype=np.float32))
    return TrainingData(class_words, classes, vocabulary, word_ids, train_images, train_labels, val_images,
                        val_labels, table, jl)


def build_weights(plan: RunPlan, data: TrainingData) -> Weights:
    """Model and EMA (initial weights from --seed), AdamW and the learning-rate schedule over the
    run's steps, all restored from the plan's checkpoint if there is one."""
    cfg, run_dir, checkpoint = plan.cfg, plan.run_dir, plan.checkpoint
    torch.manual_seed(cfg["seed"])  # initial weights
    model = ConditionalUNet(plan.ucfg, data.table)
    ema_model = ConditionalUNet(plan.ucfg, data.table)
    ema_model.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], eps=cfg["adam_eps"],
                                  weight_decay=cfg["weight_decay"])
    steps_per_epoch = len(epoch_plan(data.train_labels, data.word_ids, cfg["batch_size"], cfg["pair_order"],
                                     cfg["seed"], 0))
    total_steps = steps_per_epoch * cfg["epochs"]
    if cfg["max_steps"] > 0:
        total_steps = min(total_steps, cfg["max_steps"])
    schedule = lr_scheduler(optimizer, cfg, total_steps)

    start_step, state = 0, {}
    if checkpoint is not None:
        tensors, state = load_checkpoint(checkpoint)
        start_step = int(state["step"])
        require(start_step <= total_steps, f"--max_steps/--epochs: the run in {run_dir} is already at step "
                                           f"{start_step}, past the {total_steps} steps these settings train")
        model.load_state_dict(prefixed(tensors, "model."))
        ema_model.load_state_dict(prefixed(tensors, "ema."))
        optimizer.load_state_dict(optimizer_state(tensors, state))
        if state.get("lr_scheduler") is not None and state.get("total_steps") == total_steps:
            schedule.load_state_dict(state["lr_scheduler"])
        else:  # another length (an explicit --epochs/--max_steps), or a checkpoint from before scheduler states
            schedule = lr_scheduler_at(optimizer, cfg, total_steps, start_step)
        say(f"resuming {run_dir} from {checkpoint.name} (step {start_step} of {total_steps})")
    return Weights(model, ema_model, optimizer, schedule, steps_per_epoch, total_steps, start_step, state)


def write_run_folder(plan: RunPlan, processes: Processes, data: TrainingData, start_step: int) -> None:
    """The run folder made ready (main process only): leftovers of a killed run removed, and a new
    run's conditioning.safetensors and config.json written, or a resumed run's config.json
    updated with the settings this command changes for good (PERSISTED_OVERRIDES)."""
    cfg, run_dir, changes = plan.cfg, plan.run_dir, plan.changes
    writable_folder(run_dir, "run_dir")
    writable_folder(run_dir / "checkpoints", "run_dir")
    remove_orphaned_checkpoints(run_dir)
    remove_orphaned_temporaries(run_dir)
    if plan.checkpoint is None:
        conditioning = safetensors_bytes({"jl_matrix": torch.from_numpy(np.ascontiguousarray(data.jl,
                                                                                              dtype=np.float32)),
                                          "word_table": data.table.contiguous()})
        atomic_write_bytes(run_dir / "conditioning.safetensors", conditioning)
        train_record = recorded_settings(cfg, run_dir)
        record = {"train": train_record, "unet": plan.ucfg.to_dict(), "words": data.vocabulary,
                  "classes": data.classes, "class_words": data.class_words,
                  "class_words_file": train_record["class_words"],
                  "class_words_sha256": file_sha256(Path(cfg["class_words"])),
                  "embedding": train_record["embedding"], "debias": cfg["debias"],
                  "jl_seed": cfg["jl_seed"], "jl_dim": cfg["jl_dim"], "prediction": cfg["prediction"],
                  "beta_schedule": cfg["beta_schedule"], "num_train_timesteps": cfg["num_train_timesteps"],
                  "min_timestep": cfg["min_timestep"], "ddpm_variance": cfg["ddpm_variance"],
                  "conditioning_sha256": sha256_hex(conditioning), "dataset_path": train_record["dataset_path"],
                  "precision": processes.precision, "processes": processes.world}
        atomic_write_json(run_dir / "config.json", record)
    elif any(k in PERSISTED_OVERRIDES for k in changes):
        record = read_run_config(run_dir / "config.json")
        persisted = recorded_settings({k: new for k, (_, new) in changes.items() if k in PERSISTED_OVERRIDES},
                                      run_dir)
        record["train"].update(persisted)
        record.setdefault("resumes", []).append({"step": start_step, "changed": persisted})
        atomic_write_json(run_dir / "config.json", record)


def prepare_trainer(plan: RunPlan, processes: Processes, data: TrainingData, weights: Weights) -> Trainer:
    """The weights placed on the device and handed to Accelerate (the lr scheduler stays ours: one
    step per optimizer step), the fp16 GradScaler restored, and the noise scheduler built."""
    cfg, accelerator, device = plan.cfg, processes.accelerator, processes.device
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    weights.model.to(device, memory_format=memory_format)
    weights.ema_model.to(device, memory_format=memory_format).eval()
    model, optimizer = accelerator.prepare(weights.model, weights.optimizer)
    scaler = getattr(accelerator, "scaler", None)
    restore_grad_scaler(scaler, weights.state.get("grad_scaler"))
    base_model = accelerator.unwrap_model(model)
    ema = EMA(cfg["ema_beta"], cfg["ema_warmup"])
    scheduler = train_scheduler(cfg["num_train_timesteps"], cfg["beta_schedule"], cfg["prediction"],
                                cfg["ddpm_variance"])
    return Trainer(cfg=cfg, run_dir=plan.run_dir, data=data, accelerator=accelerator, device=device,
                   rank=processes.rank, world=processes.world, main_process=processes.main_process,
                   model=model, base_model=base_model, ema_model=weights.ema_model, optimizer=optimizer,
                   schedule=weights.schedule, scaler=scaler, ema=ema, scheduler=scheduler,
                   alphas=scheduler.alphas_cumprod.to(device), table_dev=base_model.word_table,
                   memory_format=memory_format, val_words=validation_words(data.val_labels, data.word_ids),
                   steps_per_epoch=weights.steps_per_epoch, total_steps=weights.total_steps,
                   start_step=weights.start_step)


# ----------------------------------------------------------------------------- training
def loss_on(tr: Trainer, net, images_u8: torch.Tensor, words: torch.Tensor, step_seed: int, drop_p: float,
            aug: str, shard: bool = True, shift: float | None = None) -> torch.Tensor:
    """Loss of one batch: sum_i w_i * weight(t_i) * mean((net(x_t) - target)^2) over this
    process's samples i, with w_i from ``shard_of`` (the global batch mean after DDP's
    gradient average); ``shard=False`` scores the whole batch here (w_i = 1/n); ``shift``
    None = --timestep_shift. Every random draw comes from ``step_seed`` and covers the whole batch."""
    cfg, device = tr.cfg, tr.device
    shift = cfg["timestep_shift"] if shift is None else shift
    g = torch.Generator().manual_seed(step_seed)
    n = len(images_u8)
    x0 = images_u8.float() / 127.5 - 1
    x0 = augment(x0, aug, g)
    t = training_timesteps(n, cfg["min_timestep"], cfg["num_train_timesteps"], shift, g)
    noise = torch.randn(x0.shape, generator=g)
    keep = (torch.rand(n, generator=g) >= drop_p).float()[:, None]
    mine, share = shard_of(n, tr.rank, tr.world) if shard else (torch.arange(n), torch.full((n,), 1 / n))
    x0, t, noise, keep, words, share = x0[mine].to(device), t[mine].to(device), noise[mine].to(device), \
        keep[mine].to(device), words[mine].to(device), share.to(device)
    x0 = x0.contiguous(memory_format=tr.memory_format)
    x_t = tr.scheduler.add_noise(x0, noise, t)
    target = training_target(tr.scheduler, x0, noise, t, cfg["prediction"])
    with tr.accelerator.autocast():
        out = net(x_t, t, tr.table_dev[words] * keep)
    per_sample = F.mse_loss(out.float(), target, reduction="none").mean(dim=(1, 2, 3))
    weights = min_snr_weight(tr.alphas, t, cfg["min_snr_gamma"], cfg["prediction"])
    return (per_sample * weights * share).sum()


@torch.no_grad()
def validate(tr: Trainer, net) -> float:
    """Mean loss over ALL held-out images (run on the main process only, unsharded)."""
    net.eval()
    data, seed = tr.data, tr.cfg["seed"]
    return validation_loss(lambda idx, start: float(loss_on(tr, net, data.val_images[idx], tr.val_words[idx],
                                                            derived_seed(seed, "val", start), 0.0,
                                                            "none", shard=False, shift=1.0)),
                           len(data.val_images))


def save_samples(tr: Trainer, tag: str) -> None:
    """The EMA model's sample grid, --sample_per_word images per word, as samples/<tag>.png."""
    cfg = tr.cfg
    g = torch.Generator().manual_seed(derived_seed(cfg["seed"], "samples"))
    vectors = tr.ema_model.word_table.cpu().repeat_interleave(cfg["sample_per_word"], dim=0)  # the checkpoint's
    images = sample(tr.ema_model, vectors, sampling_scheduler(tr.scheduler, cfg["sampler"], cfg["sample_steps"]),
                    cfg["guidance"], g)
    save_image_grid(images, tr.run_dir / "samples" / f"{tag}.png", nrow=cfg["sample_per_word"],
                    labels=tr.data.vocabulary)


def checkpoint_now(tr: Trainer, step: int, epoch: int) -> None:
    """The checkpoint after ``step`` (main process only)."""
    if tr.main_process:
        save_checkpoint(tr.run_dir, step, tr.base_model, tr.ema_model, tr.optimizer,
                        {"epoch": epoch, "total_steps": tr.total_steps, "lr_scheduler": tr.schedule.state_dict(),
                         "grad_scaler": grad_scaler_state(tr.scaler)},
                        keep=tr.cfg["keep_checkpoints"])


def end_of_epoch_work(tr: Trainer, metrics: MetricsLog, started: float, step: int) -> None:
    """Validation row, loss plot and (when due) the EMA sample grid after ``step``; parts a
    killed run already finished (logged row, written grid) are not repeated."""
    epoch_end = step % tr.steps_per_epoch == 0
    done_epochs = step // tr.steps_per_epoch
    if step not in metrics.validated:
        val, val_ema = validate(tr, tr.base_model), validate(tr, tr.ema_model)
        tr.model.train()
        metrics.log(step=step, epoch=(step - 1) // tr.steps_per_epoch, val_loss=f"{val:.6f}",
                    val_loss_ema=f"{val_ema:.6f}", seconds=f"{time.perf_counter() - started:.1f}")
    plot_losses(tr.run_dir / "metrics.csv", tr.run_dir / "loss.png")
    if step == tr.total_steps or (tr.cfg["sample_every"] and done_epochs % tr.cfg["sample_every"] == 0):
        tag = f"epoch-{done_epochs:03d}" if epoch_end else f"step-{step:08d}"
        if not (tr.run_dir / "samples" / f"{tag}.png").is_file():
            save_samples(tr, tag)


def refuse_non_finite(run_dir: Path, batch_loss: torch.Tensor, step: int) -> NoReturn:
    """Stop a run whose training loss is no longer finite, saying what its folder keeps."""
    last = latest_checkpoint(run_dir)
    if last is None:
        raise InputError(f"training loss became {float(batch_loss)} at step {step}, before any "
                         f"checkpoint, so nothing trained is kept; rerun with a lower --lr (the folder "
                         f"{run_dir} accepts the corrected command)")
    raise InputError(f"training loss became {float(batch_loss)} at step {step}; {run_dir} keeps its "
                     f"checkpoint {last.name} (resuming it would repeat the same steps); start a new "
                     f"--run_dir with a lower --lr")


def training_loop(tr: Trainer, metrics: MetricsLog | None, started: float) -> int:
    """Train from ``tr.start_step`` to ``tr.total_steps`` (first finishing the end-of-epoch work a
    kill may have cut short), with checkpoints, metrics rows and end-of-epoch work on the way;
    returns the step reached."""
    cfg, accelerator, model, run_dir = tr.cfg, tr.accelerator, tr.model, tr.run_dir
    steps_per_epoch, total_steps, step = tr.steps_per_epoch, tr.total_steps, tr.start_step
    if tr.main_process and step > 0 and (step % steps_per_epoch == 0 or step == total_steps):
        end_of_epoch_work(tr, metrics, started, step)  # a kill may have come between the checkpoint and this work
    accelerator.wait_for_everyone()
    progress = progress_bar(total=total_steps, initial=step, unit="step", disable=not tr.main_process,
                            desc=f"training {run_dir.name}")
    model.train()
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        plan = epoch_plan(tr.data.train_labels, tr.data.word_ids, cfg["batch_size"], cfg["pair_order"], cfg["seed"],
                          epoch)
        for images_idx, words in plan[position:]:
            if step >= total_steps:
                break
            lr_now = tr.schedule.get_last_lr()[0]
            loss = loss_on(tr, model, tr.data.train_images[images_idx], words, derived_seed(cfg["seed"], "step", step),
                           cfg["cond_dropout"], cfg["augment"])
            # the global batch mean, the same number on every process (so all stop together)
            batch_loss = accelerator.reduce(loss.detach(), reduction="mean") if tr.world > 1 else loss.detach()
            if not torch.isfinite(batch_loss):
                refuse_non_finite(run_dir, batch_loss, step)
            tr.optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if cfg["grad_clip"] > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            tr.optimizer.step()
            step_scheduler(tr.schedule)
            tr.ema.update(tr.ema_model, tr.base_model, step)
            step += 1
            progress.update(1)
            if metrics is not None:
                metrics.log(step=step, epoch=epoch, train_loss=f"{float(batch_loss):.6f}", lr=f"{lr_now:.3e}",
                            seconds=f"{time.perf_counter() - started:.1f}")
            end_of_epoch = step % steps_per_epoch == 0
            if step % cfg["checkpoint_every"] == 0 or end_of_epoch or step == total_steps:
                checkpoint_now(tr, step, epoch)
            if end_of_epoch or step == total_steps:
                if tr.main_process:
                    end_of_epoch_work(tr, metrics, started, step)
                accelerator.wait_for_everyone()
    progress.close()
    return step


def train(tr: Trainer) -> None:
    """The training loop with its metrics log (main process), then the closing line."""
    metrics = MetricsLog(tr.run_dir / "metrics.csv", tr.start_step, tr.cfg["wandb"], tr.cfg) if tr.main_process \
        else None
    started = time.perf_counter()
    try:
        step = training_loop(tr, metrics, started)
    finally:
        if metrics is not None:
            metrics.close()
    if tr.main_process:
        if step == tr.start_step:
            print(f"{tr.run_dir} is already trained to step {step} of {tr.total_steps}; its end-of-run work "
                  f"(validation, loss plot, sample grid) is done")
        else:
            print(f"trained {step - tr.start_step} steps in {(time.perf_counter() - started) / 60:.1f} min; "
                  f"run folder: {tr.run_dir}")


def main(argv: list[str] | None = None) -> Path:
    """Train (or resume) the run the command line describes; returns its folder."""
    plan = plan_run(sys.argv[1:] if argv is None else list(argv))
    processes = start_processes(plan.cfg)
    data = load_data(plan.cfg, plan.ucfg, processes.device)
    weights = build_weights(plan, data)
    if processes.main_process:
        write_run_folder(plan, processes, data, weights.start_step)
    train(prepare_trainer(plan, processes, data, weights))
    return plan.run_dir


if __name__ == "__main__":
    run_main(main, "interrupted: rerun with --run_dir of this run and --resume true to continue from its last "
                   "checkpoint")
