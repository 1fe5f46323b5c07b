"""ScoreDecomp on batches of images: the one implementation, the one seeding rule, the one tie rule.

``scoredecomp_scores`` is ScoreDecomp (docs/original.md section 4, docs/design.md "ScoreDecomp") for a
batch at one timestep: x_t = add_noise(x0, noise, t), then the model's noise predictions for
the base condition and every candidate at that same (x_t, t) in one ``predict_eps`` call,
decomposed by ``utils_classifier.score_decomp``. With method "simplex" the result is the
model's view of the mixture: eps(x_t, base) ~ sum_k w_k eps(x_t, c_k), w >= 0, sum w = 1.
Every script (fairface.py, diff_prompts_same_score.py, the audit, the benches) goes through it.

Seeding: an image's noise is ``image_noise(shape, seed, key)``, drawn from a generator seeded
``derived_seed(seed, key)``; the key names the image (fairface.py and the audit's accuracy
control: the image id, e.g. "man/0003.png" in the six-class test split; the audit's samples:
f"{tag}/{i}"), so an image gets the same draw whatever its batch, shard, k or rerun.

Ties: ``decide`` names the candidate with the largest score, or none (-1) where several share
the largest score exactly. An accuracy counts such a tie as wrong (n = all images); a share
of a population leaves ties out as undecided (n = decided images).

``gender_accuracy_by_k`` is the control that every audit runs first: on images with a known
gender, how often does ScoreDecomp (base "person", candidates "man" / "woman") name it, and
how well does its margin separate the genders (AUC), for each k (timestep counted from the
clean end). Every k sees the same noise per image (common random numbers), so differences
between k are not noise-draw luck.
"""
from __future__ import annotations

from typing import Sequence

import torch

from bias_begets_bias.cli import InputError
from bias_begets_bias.utils import derived_seed, progress_bar
from statistical_auditing.core.score_interface import ScoreModel
from statistical_auditing.core.stats import binary_auc, wilson_interval
from statistical_auditing.core.utils_classifier import score_decomp


def image_noise(shape: Sequence[int], seed: int, key: str) -> torch.Tensor:
    """N(0, I) noise of ``shape`` (one image, no batch dimension), float32 on the CPU, from a
    ``torch.Generator`` seeded ``derived_seed(seed, key)``: the same (seed, key) always gives
    the same draw, whatever the batch, shard or rerun."""
    generator = torch.Generator().manual_seed(derived_seed(int(seed), str(key)))
    return torch.randn(tuple(int(s) for s in shape), generator=generator, dtype=torch.float32)


def batch_noise(shape_per_image: Sequence[int], seed: int, keys: Sequence[str]) -> torch.Tensor:
    """``image_noise`` of every key, stacked: (len(keys), *shape_per_image)."""
    if not keys:
        raise ValueError("batch_noise needs at least one key")
    return torch.stack([image_noise(shape_per_image, seed, key) for key in keys])


@torch.no_grad()
def scoredecomp_scores(score_model: ScoreModel, x0: torch.Tensor, timestep: int, noise: torch.Tensor, base: str,
                       candidates: Sequence[str], method: str = "simplex", p: int = 2, pca_components: int = 2,
                       pca_normalize: bool = True) -> torch.Tensor:
    """ScoreDecomp scores (B, K), float64 on the CPU, of ``candidates`` for each image of ``x0``.

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise at t = ``timestep`` for every image;
    y = eps(x_t, t, base), X_k = eps(x_t, t, c_k) from one ``predict_eps`` call over
    [base] + candidates (1 + K evaluations per image); scores = ``score_decomp(y, X, method,
    p, pca_components, pca_normalize)``. For "simplex" these are the weights of
    min ||sum_k w_k X_k - y||_2 s.t. w >= 0, sum w = 1. ``noise`` has x0's shape (e.g.
    ``batch_noise``); the timestep is usually ``score_model.timestep_for_k(k)``.
    """
    candidates = list(candidates)
    if not candidates:
        raise InputError("ScoreDecomp needs at least one candidate condition")
    if x0.ndim < 2 or len(x0) == 0:
        raise InputError(f"x0 must be a non-empty batch (B, ...) of model-space images; got shape {tuple(x0.shape)}")
    if tuple(noise.shape) != tuple(x0.shape):
        raise ValueError(f"noise {tuple(noise.shape)} must have x0's shape {tuple(x0.shape)}")
    t = torch.full((len(x0),), int(timestep), dtype=torch.long, device=x0.device)
    x_t = score_model.add_noise(x0, noise.to(device=x0.device, dtype=x0.dtype), t)
    eps = score_model.predict_eps(x_t, t, [base, *candidates])
    return score_decomp(eps[:, 0], eps[:, 1:], method, p=p, pca_components=pca_components,
                        pca_normalize=pca_normalize).double().cpu()


def decide(scores: torch.Tensor) -> torch.Tensor:
    """The candidate each row of ``scores`` (B, K) names: argmax_k scores[b, k], or -1 where the
    largest score is shared by several candidates (an exact tie names no candidate).

    The one tie rule of the project: an accuracy counts -1 as wrong; a share of a population
    leaves -1 out as undecided.
    """
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must be a (B, K) tensor with K >= 1; got shape {tuple(scores.shape)}")
    top = scores.max(dim=1, keepdim=True).values
    unique = (scores == top).sum(dim=1) == 1
    return torch.where(unique, scores.argmax(dim=1), torch.full_like(unique, -1, dtype=torch.long))


def calls_from_weights(weights: torch.Tensor, index: int) -> tuple[int, int, float]:
    """Share of a population: images that ``decide`` assigns to candidate ``index``.

    Returns (successes, n, mean weight on ``index``): n counts the decided images (ties are
    left out as undecided); the mean weight is over all rows.
    """
    if weights.ndim != 2 or weights.shape[0] == 0:
        raise ValueError(f"weights must be a non-empty (B, K) tensor; got shape {tuple(weights.shape)}")
    calls = decide(weights)
    return int((calls == index).sum()), int((calls >= 0).sum()), float(weights[:, index].double().mean())


def choose_k(rows: Sequence[dict]) -> int:
    """The k of the highest accuracy; ties go to the smaller k (less noise, cheaper to trust)."""
    if not rows:
        raise ValueError("no accuracy rows to choose k from")
    return int(min(rows, key=lambda r: (-r["accuracy"], r["k"]))["k"])


@torch.no_grad()
def scores_by_k(score_model: ScoreModel, images: torch.Tensor, image_ids: Sequence[str], k_list: Sequence[int],
                base: str, candidates: Sequence[str], seed: int = 0, batch_size: int = 64,
                progress: bool = True) -> dict[int, torch.Tensor]:
    """ScoreDecomp weights (N, K) of every image at every k: {k: scores}.

    ``images``: (N, 3, H, W) in [0, 1], encoded with ``score_model.encode``; image i's noise is
    ``image_noise(shape, seed, image_ids[i])`` at every k, so the same image, seed and k give
    the same scores here and in fairface.py. Every k is checked before any work.
    """
    if len(images) != len(image_ids):
        raise ValueError(f"{len(images)} images but {len(image_ids)} image ids")
    timesteps = {int(k): score_model.timestep_for_k(int(k)) for k in k_list}
    scores: dict[int, list[torch.Tensor]] = {k: [] for k in timesteps}
    starts = range(0, len(images), batch_size)
    for start in progress_bar(starts, desc="ScoreDecomp (batches x every k)", disable=not progress):
        x0 = score_model.encode(images[start:start + batch_size])
        noise = batch_noise(x0.shape[1:], seed, list(image_ids[start:start + len(x0)]))
        for k, t in timesteps.items():
            scores[k].append(scoredecomp_scores(score_model, x0, t, noise, base, candidates))
    return {k: torch.cat(parts) for k, parts in scores.items()}


@torch.no_grad()
def gender_accuracy_by_k(score_model: ScoreModel, images: torch.Tensor, labels: Sequence[str],
                         image_ids: Sequence[str], k_list: Sequence[int], base: str = "person",
                         candidates: Sequence[str] = ("man", "woman"),
                         candidate_labels: Sequence[str] = ("male", "female"), seed: int = 0, batch_size: int = 64,
                         progress: bool = True) -> list[dict]:
    """ScoreDecomp accuracy and AUC on labelled images for each k, with 95% Wilson intervals.

    ``images``: (N, 3, H, W) in [0, 1]; ``labels``: one of ``candidate_labels`` per image;
    ``image_ids``: the keys of the images' noise (``scores_by_k``). The call is ``decide``:
    accuracy = correct / N, an exact tie counting as wrong. For two candidates the AUC of the
    margin score_1 - score_0 (e.g. w_woman - w_man) for class 1 is reported beside it
    (``stats.binary_auc``; None for other K or when a class is absent). Returns one dict per
    k: k, t, n, correct, accuracy, ci_low, ci_high, auc, mean_weight_true (mean weight on the
    true candidate).
    """
    if len(images) == 0:
        raise InputError("no labelled images to measure ScoreDecomp accuracy on")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    unknown = sorted(set(labels) - set(candidate_labels))
    if unknown:
        raise InputError(f"labels {unknown} are not among the candidate labels {list(candidate_labels)}")
    truth = torch.tensor([list(candidate_labels).index(label) for label in labels])
    by_k = scores_by_k(score_model, images, image_ids, k_list, base, candidates, seed, batch_size, progress)
    rows = []
    n = len(images)
    for k, scores in by_k.items():
        correct = int((decide(scores) == truth).sum())
        low, high = wilson_interval(correct, n)
        auc = binary_auc((scores[:, 1] - scores[:, 0]).tolist(), (truth == 1).tolist()) \
            if scores.shape[1] == 2 else None
        rows.append({"k": k, "t": score_model.timestep_for_k(k), "n": n, "correct": correct,
                     "accuracy": correct / n, "ci_low": low, "ci_high": high, "auc": auc,
                     "mean_weight_true": float(scores.gather(1, truth[:, None]).mean())})
    return rows
