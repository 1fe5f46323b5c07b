"""ScoreDecomp on batches of images, and its gender accuracy on labelled images.

``scoredecomp_weights`` is ScoreDecomp (ORIGINAL.md section 4, DESIGN.md "ScoreDecomp")
for a batch: one noise draw per image, x_t = add_noise(x0, noise, t_k), then the model's
noise predictions for the base condition and every candidate at that same (x_t, t_k) in
one ``predict_eps`` call, decomposed by ``score_decomp``. With method "simplex" the
result is the model's view of the mixture: eps(x_t, base) ~ sum_k w_k eps(x_t, c_k),
w >= 0, sum w = 1.

``gender_accuracy_by_k`` is the control that every audit runs first: on images with a
known gender, how often does ScoreDecomp (base "person", candidates "man" / "woman")
name it, for each k (timestep counted from the clean end). Every k sees the same noise
per image (common random numbers), so differences between k are not noise-draw luck.
"""
from __future__ import annotations

from typing import Sequence

import torch

from diffusion_from_scratch.cli import InputError
from diffusion_from_scratch.utils import derived_seed, progress_bar
from statistical_auditing.score_models import ScoreModel
from statistical_auditing.stats import wilson_interval
from statistical_auditing.utils_classifier import score_decomp

Seeds = int | torch.Generator | Sequence[int] | torch.Tensor


def draw_noise(shape: Sequence[int], seed_or_generator: Seeds) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...) on the CPU, float32.

    An int seeds one generator for the batch; a ``torch.Generator`` is used as is; a
    sequence of B ints gives each image its own generator, so an image's noise does not
    depend on which batch it is in (results invariant to the batch size).
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(seed_or_generator, torch.Generator):
        return torch.randn(shape, generator=seed_or_generator, dtype=torch.float32)
    if isinstance(seed_or_generator, int) and not isinstance(seed_or_generator, bool):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed_or_generator), dtype=torch.float32)
    seeds = [int(s) for s in (seed_or_generator.tolist() if torch.is_tensor(seed_or_generator) else seed_or_generator)]
    if len(seeds) != shape[0]:
        raise ValueError(f"got {len(seeds)} per-image seeds for a batch of {shape[0]} images")
    return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(s), dtype=torch.float32)
                        for s in seeds]) if seeds else torch.zeros(shape)


@torch.no_grad()
def scoredecomp_weights(score_model: ScoreModel, x0: torch.Tensor, base: str, candidates: Sequence[str], k: int,
                        seed_or_generator: Seeds, method: str = "simplex") -> torch.Tensor:
    """ScoreDecomp scores (B, K) of ``candidates`` for each clean model-space image of ``x0``.

    t = score_model.timestep_for_k(k) (k steps from the clean end; InputError outside the
    table); x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n with n ~ N(0, I) drawn by
    ``draw_noise``; y = eps(x_t, base), X_k = eps(x_t, c_k) from one ``predict_eps`` call
    over [base] + candidates; scores = ``score_decomp(y, X, method)``. For "simplex" these
    are the weights of min ||sum_k w_k X_k - y||_2 s.t. w >= 0, sum w = 1 (float64, CPU).
    """
    candidates = list(candidates)
    if not candidates:
        raise InputError("ScoreDecomp needs at least one candidate condition")
    if x0.ndim < 2 or len(x0) == 0:
        raise InputError(f"x0 must be a non-empty batch (B, ...) of model-space images; got shape {tuple(x0.shape)}")
    t_value = score_model.timestep_for_k(int(k))
    noise = draw_noise(x0.shape, seed_or_generator).to(device=x0.device, dtype=x0.dtype)
    t = torch.full((len(x0),), t_value, dtype=torch.long, device=x0.device)
    x_t = score_model.add_noise(x0, noise, t)
    eps = score_model.predict_eps(x_t, t, [base] + candidates)
    return score_decomp(eps[:, 0], eps[:, 1:], method=method).cpu()


def calls_from_weights(weights: torch.Tensor, index: int) -> tuple[int, int, float]:
    """Count images whose weight on candidate ``index`` is the largest of the row.

    Returns (successes, n, mean weight on ``index``). Rows where the largest weight is
    shared (an exact tie, e.g. identical predictions) name no candidate and are left out of
    n; the mean weight is over all rows.
    """
    if weights.ndim != 2 or weights.shape[0] == 0:
        raise ValueError(f"weights must be a non-empty (B, K) tensor; got shape {tuple(weights.shape)}")
    top = weights.max(dim=1, keepdim=True).values
    winners = weights == top
    decided = winners.sum(dim=1) == 1
    successes = int((decided & winners[:, index]).sum())
    return successes, int(decided.sum()), float(weights[:, index].double().mean())


def image_seeds(seed: int, tag: str, count: int, start: int = 0) -> list[int]:
    """Per-image noise seeds ``derived_seed(seed, tag, i)`` for images start..start+count-1."""
    return [derived_seed(seed, tag, i) for i in range(start, start + count)]


def choose_k(rows: Sequence[dict]) -> int:
    """The k of the highest accuracy; ties go to the smaller k (less noise, cheaper to trust)."""
    if not rows:
        raise ValueError("no accuracy rows to choose k from")
    return int(min(rows, key=lambda r: (-r["accuracy"], r["k"]))["k"])


@torch.no_grad()
def gender_accuracy_by_k(score_model: ScoreModel, images: torch.Tensor, labels: Sequence[str], k_list: Sequence[int],
                         base: str = "person", candidates: Sequence[str] = ("man", "woman"),
                         candidate_labels: Sequence[str] = ("male", "female"), seed: int = 0, batch_size: int = 64,
                         progress: bool = True) -> list[dict]:
    """ScoreDecomp accuracy on labelled images for each k, with 95% Wilson intervals.

    ``images``: (N, 3, H, W) in [0, 1] (encoded with ``score_model.encode``); ``labels``:
    one of ``candidate_labels`` per image. Image i gets the noise of seed
    ``derived_seed(seed, "accuracy", i)`` at every k. The prediction is the candidate with
    the largest simplex weight (``calls_from_weights``; exact ties count as wrong).
    accuracy = correct / N. Returns one dict per k: k, t, n, correct, accuracy, ci_low,
    ci_high, mean_weight_true (mean weight on the true candidate).
    """
    if len(images) == 0:
        raise InputError("no labelled images to measure ScoreDecomp accuracy on")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    unknown = sorted(set(labels) - set(candidate_labels))
    if unknown:
        raise InputError(f"labels {unknown} are not among the candidate labels {list(candidate_labels)}")
    truth = torch.tensor([list(candidate_labels).index(label) for label in labels])
    for k in k_list:  # every k checked before any work
        score_model.timestep_for_k(int(k))
    seeds = image_seeds(seed, "accuracy", len(images))
    correct = {int(k): 0 for k in k_list}
    weight_true = {int(k): 0.0 for k in k_list}
    steps = [(int(k), start) for start in range(0, len(images), batch_size) for k in k_list]
    x0_cache: tuple[int, torch.Tensor] | None = None
    for k, start in progress_bar(steps, desc="ScoreDecomp accuracy (k x batches)", disable=not progress):
        if x0_cache is None or x0_cache[0] != start:
            x0_cache = (start, score_model.encode(images[start:start + batch_size]))
        x0 = x0_cache[1]
        weights = scoredecomp_weights(score_model, x0, base, candidates, k, seeds[start:start + len(x0)])
        top = weights.max(dim=1, keepdim=True).values
        unique_top = (weights == top).sum(dim=1) == 1
        predicted = weights.argmax(dim=1)
        batch_truth = truth[start:start + len(x0)]
        correct[k] += int(((predicted == batch_truth) & unique_top).sum())
        weight_true[k] += float(weights.gather(1, batch_truth[:, None]).sum())
    rows = []
    n = len(images)
    for k in k_list:
        k = int(k)
        low, high = wilson_interval(correct[k], n)
        rows.append({"k": k, "t": score_model.timestep_for_k(k), "n": n, "correct": correct[k],
                     "accuracy": correct[k] / n, "ci_low": low, "ci_high": high,
                     "mean_weight_true": weight_true[k] / n})
    return rows
