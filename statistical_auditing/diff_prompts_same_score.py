"""Cosine heat-maps of noise predictions across prompts and timesteps (docs/original.md section 7).

For every image x (labelled images, as in fairface.py; labels are not used), one noise draw
eps per image (``scoring.image_noise``, keyed by the image id) is shared by every prompt and
every k (the original drew new noise per timestep for the prompt table and per prompt for
the timestep table); for each k in --k_list the timestep is t = timesteps[-k] (k from the
clean end) of the scheduler's table after ``set_timesteps(--num_inference_steps)``: with
SD's steps_offset 1, 1000 steps give t = k and the original heat-maps' --num_timesteps 100
gives t = 10k - 9. The model predicts eps(x_t, t, p) for every prompt p (words for a
from-scratch run, prompts for Stable Diffusion; --template builds them from the dataset's
class names, e.g. "a blurry photo of a {class}." on CIFAR-10). Two similarity tables, each
averaged over the images:

- prompt x prompt, per k:     C_k[p, q] = cos(eps(x_t, t_k, p), eps(x_t, t_k, q));
- timestep x timestep, per p: D_p[i, j] = cos(eps(x_t_i, t_i, p), eps(x_t_j, t_j, p)),
  computed from that prompt's own predictions only (the original appended to one list
  that was never reset between prompts, so its later prompts mixed in earlier ones).

Outputs in --out: prompt_similarity.csv and timestep_similarity.csv (mean, standard
deviation over images and n per cell), prompt_similarity.png (one annotated panel per k),
timestep_similarity_p{i}.png (one per prompt), config.json (with the prompts).
"""
from __future__ import annotations

import io
import os
import textwrap
from pathlib import Path
from typing import Any, Sequence

import torch

from bias_begets_bias.cli import config_from_constants, constants_of, require, run_main
from bias_begets_bias.utils import (atomic_write_bytes, atomic_write_json, atomic_write_text, csv_text,
                                          progress_bar, require_writable, writable_folder)
from statistical_auditing.sd_audits import cli_common as cc
from statistical_auditing.sd_audits.data_flags import (ATTRIBUTE, CLASSES, DATA, DATA_CHOICES, DATA_CONFIG,  # noqa: F401
                                             IMAGE_COLUMN, IMAGES_ROOT, KIND, LABEL_COLUMN, RESIZE, SELECTION,
                                             SIZE, SKIP_BAD, SPLIT, TEMPLATE)  # data-source flags, shared
from statistical_auditing.sd_audits.model_flags import (DEVICE, DTYPE, MODEL, MODEL_CHOICES,  # noqa: F401
                                              NUM_INFERENCE_STEPS, SCHEDULER)  # model flags, shared
from statistical_auditing.core.score_interface import ScoreModel
from statistical_auditing.core.scoring import batch_noise

NUM_IMAGES = 100  # [1, inf) images averaged over (the original's --num_data)
PROMPTS = ""  # conditions compared, separated by "," or "|" ("" = --template, else base + gender candidates)
PROMPTS_FILE = ""  # or a file with one prompt / word per line (overrides --prompts)
K_LIST = "5,20,100,500"  # list of ints in [1, inf): comma-separated k: timestep = timesteps[-k], counted from the clean end
TIMESTEPS_FILE = ""  # or a file with one k per line (overrides --k_list; the original's --timestep_list_file)
SEED = 0  # [0, 2**63) base seed: image selection, and each image's noise (seeded by (seed, image id))
BATCH_SIZE = 8  # [1, inf) images per UNet call (times the number of prompts)
OUT = "runs/diff_prompts_same_score"  # output folder

CHOICES = {**DATA_CHOICES, **MODEL_CHOICES}
PRESETS = {"smoke": {"num_images": 2, "k_list": "5,50", "batch_size": 2}}


# ----------------------------------------------------------------------------- maths


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities: vectors (..., N, D) -> (..., N, N) in float64, with
    C[i, j] = <v_i, v_j> / (|v_i| |v_j|); a zero vector has cosine 0 with everything
    (and with itself), as ``score_decomp``'s cosine method reports it."""
    v = vectors.double()
    norms = torch.linalg.vector_norm(v, dim=-1)
    unit = v / torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(-1)
    return unit @ unit.transpose(-1, -2)


class RunningMoments:
    """Element-wise mean and standard deviation of a stream of equally shaped tensors (sums of
    x and x^2 in float64: fine for cosines, which lie in [-1, 1])."""

    def __init__(self) -> None:
        self.n, self.total, self.squares = 0, None, None

    def add(self, batch: torch.Tensor) -> None:
        """Add every entry of a batch (B, ...)."""
        batch = batch.double().cpu()
        total, squares = batch.sum(0), (batch ** 2).sum(0)
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.n += batch.shape[0]

    def mean(self) -> torch.Tensor:
        return self.total / self.n

    def std(self) -> torch.Tensor:
        """Sample standard deviation (n - 1 in the denominator; 0 for a single item)."""
        if self.n < 2:
            return torch.zeros_like(self.total)
        variance = (self.squares - self.total ** 2 / self.n) / (self.n - 1)
        return variance.clamp_min(0).sqrt()


@torch.no_grad()
def batch_predictions(score_model: ScoreModel, x0: torch.Tensor, noise: torch.Tensor, timesteps: Sequence[int],
                      prompts: list[str]) -> torch.Tensor:
    """Flattened eps(x_t, t, p) for every timestep and prompt: (B, n_timesteps, n_prompts, D),
    with x_t = add_noise(x0, noise, t) -- the same noise for every t and p."""
    out = []
    for timestep in timesteps:
        t = torch.full((x0.shape[0],), int(timestep), dtype=torch.long, device=x0.device)
        x_t = score_model.add_noise(x0, noise.to(x0.device, x0.dtype), t)
        out.append(score_model.predict_eps(x_t, t, prompts).flatten(2).float().cpu())
    return torch.stack(out, dim=1)


def similarities(predictions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt x prompt per timestep (B, T, P, P), timestep x timestep per prompt (B, P, T, T))
    from predictions (B, T, P, D); each prompt's timestep matrix uses its own predictions only."""
    return cosine_matrix(predictions), cosine_matrix(predictions.transpose(1, 2))


# ----------------------------------------------------------------------------- outputs


def short_labels(prompts: Sequence[str], width: int = 26) -> list[str]:
    """Tick labels: prompts longer than ``width`` keep their end (where candidate prompts
    differ: "..., man"); if two labels would collide, p0, p1, ... (the CSVs hold the text)."""
    labels = [p if len(p) <= width else "…" + p[-(width - 1):] for p in prompts]
    return labels if len(set(labels)) == len(labels) else [f"p{i}" for i in range(len(prompts))]


def heatmap_figure(matrices: Sequence[torch.Tensor], titles: Sequence[str], labels: Sequence[str], path: Path,
                   suptitle: str, caption: str = "") -> Path:
    """One annotated heat-map panel per matrix, saved as a PNG. The colour scale runs from the
    smallest value of all panels to 1, shared by the panels: cosines of noise predictions
    are often all near 1, and a fixed [-1, 1] scale would hide their differences."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    low = min(float(m.min()) for m in matrices)
    low = min(low, 1.0 - 1e-3)  # a non-empty range even when every cosine is 1
    n = len(matrices)
    size = max(3.0, 0.5 * len(labels) + 1.6)
    fig, axes = plt.subplots(1, n, figsize=(size * n + 1.2, size + 0.8), squeeze=False, layout="constrained")
    image = None
    for ax, matrix, title in zip(axes[0], matrices, titles):
        values = matrix.numpy()
        image = ax.imshow(values, vmin=low, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        middle = (low + 1.0) / 2
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", fontsize=6,
                        color="black" if values[i, j] > middle else "white")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="mean cosine similarity")
    fig.suptitle(suptitle, fontsize=10)
    if caption:
        fig.supxlabel(caption, fontsize=6, family="monospace", ha="left", x=0.01)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def resolve_prompts(cfg: dict, score_model: ScoreModel, images) -> list[str]:
    """--prompts_file, else --prompts, else --template over the dataset's classes (--classes),
    else the family's base and gender candidates."""
    if cfg["prompts_file"]:
        prompts = cc.read_list_file(cfg["prompts_file"], "prompts_file")
    elif cfg["prompts"]:
        prompts = cc.split_list(cfg["prompts"], "prompts")
    elif cfg["template"]:
        prompts = cc.template_prompts(cfg["template"], cc.resolve_classes(cfg, images))
    else:
        base, candidates = cc.default_conditions(score_model, "gender")
        prompts = [base, *candidates]
    require(len(set(prompts)) == len(prompts), f"the prompts repeat one: {prompts}")
    cc.check_conditions(score_model, prompts, "--prompts / --prompts_file / --template")
    return prompts


def resolve_ks(cfg: dict) -> list[int]:
    if cfg["timesteps_file"]:
        return cc.parse_k_list(",".join(cc.read_list_file(cfg["timesteps_file"], "timesteps_file")),
                               "timesteps_file")
    return cc.parse_k_list(cfg["k_list"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = config_from_constants(constants_of(globals()), PRESETS, argv, description=__doc__.splitlines()[0],
                                choices=CHOICES)
    ks = resolve_ks(cfg)
    require_writable(Path(cfg["out"]), "out")
    score_model = cc.load_model(cfg)
    timesteps = cc.timesteps_for(score_model, ks)  # a k outside the table stops here, before any image
    images = cc.open_data(cfg, score_model)
    prompts = resolve_prompts(cfg, score_model, images)
    selected = cc.select_records(images, cc.selected_indices(len(images), cfg["num_images"], cfg["selection"],
                                                             cfg["seed"]))
    out = writable_folder(Path(cfg["out"]), "out")
    atomic_write_json(out / "config.json", cfg | {"prompts": prompts,
                                                  "timesteps": {str(k): t for k, t in timesteps.items()}})

    by_prompt, by_timestep = RunningMoments(), RunningMoments()
    progress = progress_bar(total=len(selected), desc="noise predictions", unit="image")
    for chunk, pixels, consumed in cc.decoded_batches(images, selected, cfg["batch_size"]):
        if chunk:
            x0 = score_model.encode(pixels)
            noise = batch_noise(x0.shape[1:], cfg["seed"], [r[1] for r in chunk])
            prompt_sim, timestep_sim = similarities(batch_predictions(score_model, x0, noise,
                                                                      list(timesteps.values()), prompts))
            by_prompt.add(prompt_sim)
            by_timestep.add(timestep_sim)
        progress.update(consumed)
    progress.close()
    require(by_prompt.n > 0, f"--data {cfg['data']}: every selected image was unreadable")

    n = by_prompt.n
    prompt_mean, prompt_std = by_prompt.mean(), by_prompt.std()
    time_mean, time_std = by_timestep.mean(), by_timestep.std()
    ks_t = list(timesteps.items())
    prompt_rows = [{"k": k, "timestep": t, "prompt_a": prompts[a], "prompt_b": prompts[b],
                    "mean_cosine": round(float(prompt_mean[i, a, b]), 6), "std": round(float(prompt_std[i, a, b]), 6),
                    "n": n}
                   for i, (k, t) in enumerate(ks_t) for a in range(len(prompts)) for b in range(len(prompts))]
    time_rows = [{"prompt": prompts[p], "k_a": ks_t[a][0], "timestep_a": ks_t[a][1], "k_b": ks_t[b][0],
                  "timestep_b": ks_t[b][1], "mean_cosine": round(float(time_mean[p, a, b]), 6),
                  "std": round(float(time_std[p, a, b]), 6), "n": n}
                 for p in range(len(prompts)) for a in range(len(ks_t)) for b in range(len(ks_t))]
    atomic_write_text(out / "prompt_similarity.csv", csv_text(prompt_rows, list(prompt_rows[0])))
    atomic_write_text(out / "timestep_similarity.csv", csv_text(time_rows, list(time_rows[0])))

    labels = short_labels(prompts)
    legend = "" if labels == prompts else "\n".join(f"{label}: {textwrap.shorten(p, 110)}"
                                                    for label, p in zip(labels, prompts))
    figures = [heatmap_figure([prompt_mean[i] for i in range(len(ks_t))], [f"k={k} (t={t})" for k, t in ks_t],
                              labels, out / "prompt_similarity.png",
                              f"cosine of noise predictions, prompt x prompt ({n} images, shared noise)", legend)]
    time_labels = [f"k={k} (t={t})" for k, t in ks_t]
    for p, prompt in enumerate(prompts):
        figures.append(heatmap_figure([time_mean[p]], [textwrap.shorten(prompt, 60)], time_labels,
                                      out / f"timestep_similarity_p{p}.png",
                                      f"cosine of noise predictions, timestep x timestep ({n} images)"))
    print(f"{n} images, {len(prompts)} prompts, k = {ks}: heat-maps and CSVs in {out}")
    for i, (k, t) in enumerate(ks_t):
        pairs = ", ".join(f"{labels[a]}~{labels[b]} {float(prompt_mean[i, a, b]):.3f}"
                          for a in range(len(prompts)) for b in range(a + 1, len(prompts)))
        print(f"  k={k} (t={t}): {pairs}")
    return {"prompts": prompts, "timesteps": timesteps, "prompt_mean": prompt_mean, "timestep_mean": time_mean,
            "n": n, "figures": [os.fspath(f) for f in figures]}


if __name__ == "__main__":
    run_main(main)
