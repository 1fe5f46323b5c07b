"""Train the word-conditioned DDPM from scratch on the six-class data.

    python diffusion_from_scratch/ddpm_conditional.py --preset tiny --dataset_path data/generated/portraits/32
    python diffusion_from_scratch/ddpm_conditional.py --preset tiny --run_dir runs/tiny --resume true
    accelerate launch diffusion_from_scratch/ddpm_conditional.py --preset paper --dataset_path <root>/64

Every training image is trained once per word of its class (data/class_words.json): the
conditioning vector is [sinusoidal(t) ; JL(word2vec(word))], with the word half zeroed for
a random share of samples (classifier-free guidance dropout). ``paper`` reproduces the
original's settings (ORIGINAL.md section 3) without its defects; ``tiny`` is the recipe
that obeys its conditioning after a short CPU run (README, "The tiny recipe"); ``smoke``
runs in seconds for the tests.

All randomness (data order, timesteps, noise, dropout, augmentation) is a pure function of
(seed, step), so a run resumed from a checkpoint continues exactly as if never stopped.
"""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffusion_from_scratch.cli import InputError, config_from_constants, constants_of, require, run_main
from diffusion_from_scratch.modules import EMA, ConditionalUNet, UNetConfig
from diffusion_from_scratch.pipeline import (SAMPLERS, latest_checkpoint, load_checkpoint, min_snr_weight,
                                             optimizer_state, prefixed, sample, sampling_scheduler,
                                             save_checkpoint, train_scheduler)
from diffusion_from_scratch.utils import (DATA_DIR, atomic_write_json, derived_seed, load_class_words, load_split,
                                          resolve_device, save_image_grid, training_vocabulary, progress_bar)

# ----------------------------------------------------------------------------- config
PRESET = "tiny"  # tiny (CPU, minutes) | paper (the original's GPU settings) | smoke (seconds, tests)
DATASET_PATH = "data/generated/portraits/32"  # <root>/<size> holding train/ and test/ class folders
CLASS_WORDS = str(DATA_DIR / "class_words.json")  # class -> its training words
RUN_DIR = "runs/tiny"  # output folder of this run
RESUME = False  # continue the run in RUN_DIR from its latest checkpoint (starts it if RUN_DIR has none)
EMBEDDING = "w2v-bundled"  # word-vector source (see word_vectors.py) or a path to a word2vec file
DEBIAS = False  # hard-debias the word vectors first (Bolukbasi et al. 2016): the control arm
JL_SEED = 0  # seed of the Gaussian random projection 300 -> JL_DIM
JL_DIM = 128  # word half of the conditioning vector
IMAGE_SIZE = 32  # training resolution (images of another size are resized)
EPOCHS = 8  # passes over all (image, word) pairs
MAX_STEPS = 0  # stop after this many optimizer steps (0 = run all epochs)
BATCH_SIZE = 32  # images per optimizer step (across all processes)
PAIR_ORDER = "shuffled"  # consecutive (3 steps per batch, one per word: the original) | shuffled pairs
LR = 1e-3  # peak learning rate
ADAM_EPS = 1e-8  # AdamW epsilon
WEIGHT_DECAY = 0.0  # AdamW weight decay
LR_SCHEDULE = "cosine"  # cosine (warm-up + cosine decay) | onecycle (the original) | constant
WARMUP_STEPS = 100  # linear warm-up for the cosine schedule
GRAD_CLIP = 1.0  # max gradient norm (0 = off)
EMA_BETA = 0.995  # EMA decay (horizon ~200 steps, short against a few-thousand-step run)
EMA_WARMUP = 200  # optimizer steps during which the EMA just copies the model
COND_DROPOUT = 0.1  # per-sample probability of zeroing the word half (guidance dropout)
PREDICTION = "v_prediction"  # epsilon (the original) | v_prediction | sample
BETA_SCHEDULE = "squaredcos_cap_v2"  # linear (1e-4 -> 0.02, the original) | squaredcos_cap_v2 (cosine)
NUM_TRAIN_TIMESTEPS = 1000  # diffusion steps
MIN_SNR_GAMMA = 0.0  # min-SNR loss weighting (0 = plain MSE on the target, more weight on high noise)
AUGMENT = "flip"  # none | flip | crop (Resize 1.25x + RandomResizedCrop 0.8-1, the original)
WIDTHS = "16,32,96,96"  # channels of inc, down1, down2, down3
BOTTLENECK = 192  # bottleneck channels
ATTENTION = "0,1,1,1,0,0"  # self-attention after down1..3 and up1..3 (1 = on)
NORM_GROUPS = 8  # GroupNorm groups (the original: 1)
WORD_SCALE = 8.0  # multiplier of the word half (the time half has norm 8)
COND_MLP = True  # learned MLP on the conditioning vector (EDM-style); False = the original
SCALE_SHIFT = True  # blocks apply it as h * (1 + scale) + shift (ADM's AdaGN); False = + shift (the original)
CHANNELS_LAST = True  # channels-last memory format (faster convolutions on CPU)
PRECISION = "auto"  # auto (fp16 on CUDA, fp32 elsewhere) | fp32 | fp16 | bf16
DEVICE = ""  # empty = the accelerator if there is one, else cpu
NUM_THREADS = 0  # torch CPU threads (0 = torch's default)
SEED = 789  # training seed (the original's)
CHECKPOINT_EVERY = 200  # optimizer steps between checkpoints (and at each epoch end)
KEEP_CHECKPOINTS = 2  # how many recent checkpoints to keep
SAMPLE_EVERY = 4  # epochs between EMA sample grids (0 = only at the end)
SAMPLE_PER_WORD = 8  # images per word in each grid
SAMPLER = "ddim"  # ddpm (ancestral) | ddim | dpm (DPM-Solver++)
SAMPLE_STEPS = 50  # sampler steps
GUIDANCE = 3.0  # classifier-free guidance scale of the sample grids
WANDB = "off"  # off | offline | online (Weights & Biases, optional)

PRESETS = {
    "tiny": {},
    "paper": dict(image_size=64, epochs=81, batch_size=50, pair_order="consecutive", lr=1e-4, adam_eps=1e-5,
                  weight_decay=0.01, lr_schedule="onecycle", grad_clip=0.0, ema_beta=0.995, ema_warmup=2000,
                  cond_dropout=0.05, prediction="epsilon", beta_schedule="linear", min_snr_gamma=0.0,
                  augment="crop", widths="64,128,256,256", bottleneck=512, attention="1,1,1,1,1,1",
                  norm_groups=1, word_scale=1.0, cond_mlp=False, scale_shift=False, channels_last=False, checkpoint_every=2000,
                  sample_every=8, sampler="ddpm", sample_steps=1000, dataset_path="data/generated/portraits/64",
                  run_dir="runs/paper"),
    "smoke": dict(epochs=1, max_steps=6, batch_size=8, widths="8,16,16,16", bottleneck=16, attention="0,0,1,0,0,0",
                  norm_groups=4, checkpoint_every=3, sample_every=1, sample_per_word=2, sample_steps=4,
                  warmup_steps=2, ema_warmup=2, run_dir="runs/smoke"),
}
CHOICES = {
    "pair_order": ("consecutive", "shuffled"), "lr_schedule": ("cosine", "onecycle", "constant"),
    "prediction": ("epsilon", "v_prediction", "sample"), "beta_schedule": ("linear", "squaredcos_cap_v2"),
    "augment": ("none", "flip", "crop"), "precision": ("auto", "fp32", "fp16", "bf16"), "sampler": SAMPLERS,
    "wandb": ("off", "offline", "online"), "preset": tuple(PRESETS),
}
# Flags that may differ when resuming (everything else must match the saved config).
RESUMABLE_OVERRIDES = ("resume", "device", "wandb", "epochs", "max_steps", "num_threads", "sample_every",
                       "checkpoint_every", "keep_checkpoints", "run_dir")


def unet_config(cfg: dict) -> UNetConfig:
    def ints(text: str, flag: str) -> list[int]:
        try:
            return [int(v) for v in text.split(",")]
        except ValueError:
            raise InputError(f"--{flag}: expected comma-separated integers, got {text!r}") from None

    try:
        return UNetConfig(image_size=cfg["image_size"], widths=tuple(ints(cfg["widths"], "widths")),
                          bottleneck=cfg["bottleneck"], attention=tuple(ints(cfg["attention"], "attention")),
                          norm_groups=cfg["norm_groups"], word_dim=cfg["jl_dim"], word_scale=cfg["word_scale"],
                          cond_mlp=cfg["cond_mlp"], scale_shift=cfg["scale_shift"], emb_dim=cfg["jl_dim"] + 128)
    except ValueError as error:
        raise InputError(f"model shape: {error}") from None


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


def lr_at(step: int, total: int, cfg: dict) -> float:
    """The learning rate at an optimizer step, a pure function of the step (so resume is exact)."""
    peak = cfg["lr"]
    if cfg["lr_schedule"] == "constant":
        return peak
    if cfg["lr_schedule"] == "cosine":
        if step < cfg["warmup_steps"]:
            return peak * (step + 1) / cfg["warmup_steps"]
        progress = (step - cfg["warmup_steps"]) / max(1, total - cfg["warmup_steps"])
        return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    # OneCycleLR with torch's defaults (pct_start 0.3, div_factor 25, final_div_factor 1e4, cosine)
    initial, minimum = peak / 25, peak / 25 / 1e4
    phase_end = 0.3 * total - 1

    def cosine(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)

    if step <= phase_end:
        return cosine(initial, peak, step / phase_end)
    return cosine(peak, minimum, min(1.0, (step - phase_end) / (total - 1 - phase_end)))


# ----------------------------------------------------------------------------- run folder
def prepare_run(cfg: dict, explicit: set[str]) -> tuple[dict, Path | None]:
    run_dir = Path(cfg["run_dir"])
    checkpoint = latest_checkpoint(run_dir) if run_dir.exists() else None
    if not cfg["resume"]:
        require(checkpoint is None and not (run_dir / "config.json").exists(),
                f"--run_dir: {run_dir} already holds a run; pass --resume true to continue it or choose another folder")
        return cfg, None
    if not (run_dir / "config.json").is_file():
        print(f"--resume: {run_dir} holds no run yet; starting one")
        return cfg, None
    saved = json.loads((run_dir / "config.json").read_text())["train"]
    clashes = [k for k in explicit if k not in RESUMABLE_OVERRIDES and k in saved and saved[k] != cfg[k]]
    require(not clashes, f"--resume: {', '.join('--' + k for k in clashes)} differ from the saved run; "
                         f"only {', '.join(RESUMABLE_OVERRIDES)} may change")
    merged = saved | {k: cfg[k] for k in RESUMABLE_OVERRIDES}
    return merged, checkpoint


class MetricsLog:
    """metrics.csv (always), optional W&B; rows past a resumed step are dropped first."""

    FIELDS = ("step", "epoch", "train_loss", "lr", "val_loss", "val_loss_ema", "seconds")

    def __init__(self, path: Path, resume_step: int, wandb_mode: str, config: dict):
        self.path = path
        rows = []
        if path.exists() and resume_step > 0:
            with open(path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self.handle = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.handle, self.FIELDS)
        self.wandb = None
        if wandb_mode != "off":
            import wandb
            self.wandb = wandb.init(project="bias_begets_bias", dir=str(path.parent), mode=wandb_mode,
                                    config=config, name=path.parent.name, resume="allow")

    def log(self, **row) -> None:
        self.writer.writerow({k: row.get(k, "") for k in self.FIELDS})
        self.handle.flush()
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
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)


# ----------------------------------------------------------------------------- training
def main(argv: list[str] | None = None) -> Path:
    from accelerate import Accelerator

    cfg, explicit = config_from_constants(constants_of(globals()), PRESETS, argv, choices=CHOICES,
                                          description=__doc__.splitlines()[0], return_explicit=True)
    for key in ("epochs", "batch_size", "image_size", "jl_dim", "sample_steps", "checkpoint_every"):
        require(cfg[key] > 0, f"--{key}: must be positive, got {cfg[key]}")
    require(cfg["lr"] > 0, f"--lr: must be positive, got {cfg['lr']}")
    require(0.0 <= cfg["cond_dropout"] < 1.0, f"--cond_dropout: need 0 <= p < 1, got {cfg['cond_dropout']}")
    cfg, checkpoint = prepare_run(cfg, explicit)
    if cfg["num_threads"] > 0:
        torch.set_num_threads(cfg["num_threads"])

    device = resolve_device(cfg["device"])
    precision = cfg["precision"]
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    require(precision != "fp16" or device.type == "cuda", "--precision fp16: needs a CUDA device")
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), cpu=device.type == "cpu")
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    require(cfg["batch_size"] % world == 0, f"--batch_size {cfg['batch_size']} must divide by the {world} processes")

    class_words = load_class_words(Path(cfg["class_words"]))
    classes = list(class_words)
    vocabulary = training_vocabulary(class_words)
    word_ids = [[vocabulary.index(w) for w in class_words[c]] for c in classes]

    from diffusion_from_scratch.word_vectors import word_table
    table, jl = word_table(vocabulary, source=cfg["embedding"], debias=cfg["debias"], jl_seed=cfg["jl_seed"],
                           dim=cfg["jl_dim"])
    table = torch.from_numpy(np.asarray(table, dtype=np.float32))

    root = Path(cfg["dataset_path"])
    train_images, train_labels = load_split(root, "train", classes, cfg["image_size"])
    val_images, val_labels = load_split(root, "test", classes, cfg["image_size"])

    ucfg = unet_config(cfg)
    torch.manual_seed(cfg["seed"])  # initial weights
    model = ConditionalUNet(ucfg, table)
    ema_model = ConditionalUNet(ucfg, table)
    ema_model.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], eps=cfg["adam_eps"],
                                  weight_decay=cfg["weight_decay"])
    steps_per_epoch = len(epoch_plan(train_labels, word_ids, cfg["batch_size"], cfg["pair_order"], cfg["seed"], 0))
    total_steps = steps_per_epoch * cfg["epochs"]
    if cfg["max_steps"] > 0:
        total_steps = min(total_steps, cfg["max_steps"])

    run_dir = Path(cfg["run_dir"])
    start_step = 0
    if checkpoint is not None:
        tensors, state = load_checkpoint(checkpoint)
        model.load_state_dict(prefixed(tensors, "model."))
        ema_model.load_state_dict(prefixed(tensors, "ema."))
        optimizer.load_state_dict(optimizer_state(tensors, state))
        start_step = int(state["step"])
        if accelerator.is_main_process:
            print(f"resuming {run_dir} from {checkpoint.name} (step {start_step} of {total_steps})")
    elif accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"train": cfg, "unet": ucfg.to_dict(), "words": vocabulary, "classes": classes,
                  "class_words": class_words, "embedding": cfg["embedding"], "debias": cfg["debias"],
                  "jl_seed": cfg["jl_seed"], "jl_dim": cfg["jl_dim"], "prediction": cfg["prediction"],
                  "beta_schedule": cfg["beta_schedule"], "num_train_timesteps": cfg["num_train_timesteps"],
                  "dataset_path": str(root), "precision": precision, "processes": world}
        save_file({"jl_matrix": torch.from_numpy(np.ascontiguousarray(jl, dtype=np.float32)),
                   "word_table": table.contiguous()}, str(run_dir / "conditioning.safetensors"))
        atomic_write_json(run_dir / "config.json", record)

    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    ema_model.to(device, memory_format=memory_format).eval()
    model, optimizer = accelerator.prepare(model, optimizer)
    base_model = accelerator.unwrap_model(model)
    ema = EMA(cfg["ema_beta"], cfg["ema_warmup"])
    scheduler = train_scheduler(cfg["num_train_timesteps"], cfg["beta_schedule"], cfg["prediction"])
    alphas = scheduler.alphas_cumprod.to(device)
    metrics = MetricsLog(run_dir / "metrics.csv", start_step, cfg["wandb"], cfg) if accelerator.is_main_process else None

    def loss_on(net, images_u8, words, step_seed, drop_p, aug):
        """Weighted MSE of one batch; every random draw comes from ``step_seed``."""
        g = torch.Generator().manual_seed(step_seed)
        n = len(images_u8)
        x0 = images_u8.float() / 127.5 - 1
        x0 = augment(x0, aug, g)
        t = torch.randint(0, cfg["num_train_timesteps"], (n,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        keep = (torch.rand(n, generator=g) >= drop_p).float()[:, None]
        shard = slice(rank, None, world)  # this process's share of the batch
        x0, t, noise, keep, words = x0[shard].to(device), t[shard].to(device), noise[shard].to(device), \
            keep[shard].to(device), words[shard].to(device)
        x0 = x0.contiguous(memory_format=memory_format)
        x_t = scheduler.add_noise(x0, noise, t)
        target = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x0, noise, t), "sample": x0}[cfg["prediction"]]
        with accelerator.autocast():
            out = net(x_t, t, table_dev[words] * keep)
        per_sample = F.mse_loss(out.float(), target, reduction="none").mean(dim=(1, 2, 3))
        weights = min_snr_weight(alphas, t, cfg["min_snr_gamma"], cfg["prediction"])
        return (per_sample * weights).mean()

    table_dev = base_model.word_table

    @torch.no_grad()
    def validate(net) -> float:
        net.eval()
        total, count = 0.0, 0
        for s in range(0, len(val_images), 256):
            idx = torch.arange(s, min(s + 256, len(val_images)))
            words = torch.tensor([word_ids[int(val_labels[i])][int(i) % len(word_ids[int(val_labels[i])])]
                                  for i in idx])
            loss = loss_on(net, val_images[idx], words, derived_seed(cfg["seed"], "val", s), 0.0, "none")
            total += float(loss) * len(idx)
            count += len(idx)
        return total / count

    def save_samples(tag: str) -> None:
        g = torch.Generator().manual_seed(derived_seed(cfg["seed"], "samples"))
        vectors = table.repeat_interleave(cfg["sample_per_word"], dim=0)
        images = sample(ema_model, vectors, sampling_scheduler(scheduler, cfg["sampler"], cfg["sample_steps"]),
                        cfg["guidance"], g)
        save_image_grid(images, run_dir / "samples" / f"{tag}.png", nrow=cfg["sample_per_word"], labels=vocabulary)

    def checkpoint_now(step: int, epoch: int) -> None:
        if accelerator.is_main_process:
            save_checkpoint(run_dir, step, base_model, ema_model, optimizer, {"epoch": epoch, "total_steps": total_steps},
                            keep=cfg["keep_checkpoints"])

    step = start_step
    started = time.perf_counter()
    progress = progress_bar(total=total_steps, initial=start_step, unit="step", disable=not accelerator.is_main_process,
                    desc=f"training {run_dir.name}")
    model.train()
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        plan = epoch_plan(train_labels, word_ids, cfg["batch_size"], cfg["pair_order"], cfg["seed"], epoch)
        for images_idx, words in plan[position:]:
            if step >= total_steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, cfg)
            loss = loss_on(model, train_images[images_idx], words, derived_seed(cfg["seed"], "step", step),
                           cfg["cond_dropout"], cfg["augment"])
            if not torch.isfinite(loss):
                last = latest_checkpoint(run_dir)
                raise InputError(f"training loss became {float(loss.detach())} at step {step}; stopped without saving. "
                                 f"Last good checkpoint: {last if last else 'none'}. Try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if cfg["grad_clip"] > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            optimizer.step()
            ema.update(ema_model, base_model, step)
            step += 1
            progress.update(1)
            if metrics is not None:
                metrics.log(step=step, epoch=epoch, train_loss=f"{float(loss.detach()):.6f}", lr=f"{lr_at(step - 1, total_steps, cfg):.3e}",
                            seconds=f"{time.perf_counter() - started:.1f}")
            end_of_epoch = step % steps_per_epoch == 0
            if step % cfg["checkpoint_every"] == 0 or end_of_epoch or step == total_steps:
                checkpoint_now(step, epoch)
            if end_of_epoch or step == total_steps:
                if accelerator.is_main_process:
                    val, val_ema = validate(base_model), validate(ema_model)
                    model.train()
                    metrics.log(step=step, epoch=epoch, val_loss=f"{val:.6f}", val_loss_ema=f"{val_ema:.6f}",
                                seconds=f"{time.perf_counter() - started:.1f}")
                    plot_losses(run_dir / "metrics.csv", run_dir / "loss.png")
                    done_epochs = step // steps_per_epoch
                    if step == total_steps or (cfg["sample_every"] and done_epochs % cfg["sample_every"] == 0):
                        save_samples(f"epoch-{done_epochs:03d}" if end_of_epoch else f"step-{step:08d}")
                accelerator.wait_for_everyone()
    progress.close()
    if metrics is not None:
        metrics.close()
        elapsed = time.perf_counter() - started
        print(f"trained {step - start_step} steps in {elapsed / 60:.1f} min; run folder: {run_dir}")
    return run_dir


if __name__ == "__main__":
    run_main(main)
