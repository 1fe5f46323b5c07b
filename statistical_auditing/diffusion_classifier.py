"""Zero-shot classification with a conditional diffusion model's own likelihood.

Li et al. 2023 ("Your Diffusion Model is Secretly a Zero-Shot Classifier", ICCV): the
ELBO of x0 under condition c is, up to constants and weighting, minus
E_{t, eps} || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, c) ||^2, so the
condition whose noise predictions fit best is the most likely class. ``elbo_classify``
estimates that expectation by Monte Carlo on evenly spaced timesteps with one noise draw
per timestep shared by every candidate (a paired comparison, so the noise's own variance
cancels between candidates), and optionally prunes weak candidates in stages.

It works only through the ``ScoreModel`` interface (score_interface.py), so it runs on the
from-scratch pixel model and on Stable Diffusion alike; encoding is the caller's job.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from diffusion_from_scratch.cli import InputError
from diffusion_from_scratch.utils import progress_bar
from statistical_auditing.score_interface import ScoreModel
from statistical_auditing.scoring import decide

ELBO_LOSSES = ("l2", "l1", "huber")


def elbo_timesteps(n_samples: int, num_train_timesteps: int) -> torch.Tensor:
    """n evenly spaced training timesteps: t_i = floor((i + 1/2) T / n), i = 0..n-1.

    Each t_i is the integer part of the midpoint of the i-th of n equal bins of
    [0, T), so 0 <= t_i <= T - 1 always (the original could index one past the table),
    n = T visits every timestep exactly once, and n = 100, T = 1000 gives 5, 15, ..., 995.
    """
    if n_samples < 1:
        raise InputError(f"n_samples must be >= 1; got {n_samples}")
    if num_train_timesteps < 1:
        raise InputError(f"the model's timestep table is empty (T = {num_train_timesteps})")
    i = torch.arange(n_samples, dtype=torch.float64)
    t = torch.floor((i + 0.5) * num_train_timesteps / n_samples).long()
    return t.clamp(0, num_train_timesteps - 1)


def spread_order(n: int) -> torch.Tensor:
    """A permutation of 0..n-1 whose every prefix is spread over the whole range.

    Van der Corput (bit-reversal) order of the next power of two, restricted to indices
    < n (van der Corput 1935). Used with pruning, so that the first n1 evaluated
    timesteps cover all noise levels rather than only the least noisy ones.
    """
    if n < 1:
        return torch.zeros(0, dtype=torch.long)
    bits = max(1, (n - 1).bit_length())
    order = [int(format(i, f"0{bits}b")[::-1], 2) for i in range(1 << bits)]
    return torch.tensor([i for i in order if i < n], dtype=torch.long)


def _check_schedule(prune_schedule, n_samples: int, n_conditions: int) -> list[tuple[int, int]]:
    stages = []
    previous_n, previous_keep = 0, n_conditions
    for entry in prune_schedule or []:
        try:
            n_i, keep_i = (int(v) for v in entry)
        except (TypeError, ValueError):
            raise InputError(f"prune_schedule entries must be (n_samples, keep) pairs; got {entry!r}") from None
        if not previous_n < n_i < n_samples:
            raise InputError(f"prune_schedule: sample counts must increase strictly and stay below "
                             f"n_samples = {n_samples}; got {n_i} after {previous_n}")
        if not 1 <= keep_i <= previous_keep:
            raise InputError(f"prune_schedule: keep counts must be between 1 and the previous keep "
                             f"({previous_keep}); got {keep_i}")
        stages.append((n_i, keep_i))
        previous_n, previous_keep = n_i, keep_i
    return stages


def _per_element_error(eps: torch.Tensor, eps_hat: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean over pixels of the prediction error, one value per (image, candidate)."""
    eps = eps.expand_as(eps_hat)
    if loss == "l2":
        err = (eps - eps_hat) ** 2
    elif loss == "l1":
        err = (eps - eps_hat).abs()
    else:  # huber (delta 1), as in Li et al.'s options
        err = F.huber_loss(eps_hat, eps, reduction="none", delta=1.0)
    return err.flatten(2).mean(-1)


@torch.no_grad()
def elbo_classify(score_model: ScoreModel, x0: torch.Tensor, conditions: Sequence[str], n_samples: int = 100,
                  loss: str = "l2", seed: int = 0, timesteps: Sequence[int] | torch.Tensor | None = None,
                  prune_schedule: Sequence[tuple[int, int]] | None = None, batch_conditions: bool = True,
                  progress: bool = False) -> dict:
    """Monte-Carlo diffusion-likelihood classifier (Li et al. 2023).

    For each image x0 (B, ...) (already in model space: pixels in [-1, 1] or scaled VAE
    latents) and candidate c_k:

        error_k = (1/n) sum_i  mean_pixels  L(eps_i - eps_theta(x_{t_i}, t_i, c_k)),
        x_{t_i} = sqrt(abar_{t_i}) x0 + sqrt(1 - abar_{t_i}) eps_i,

    with t_i = ``elbo_timesteps(n_samples, T)`` (T = len(score_model.alphas_cumprod)) unless
    ``timesteps`` is given, L the squared (l2), absolute (l1) or Huber (delta 1) error, and
    eps_i ~ N(0, I) drawn once per timestep from a CPU ``torch.Generator`` seeded with
    ``seed``; the same eps_i is used for every candidate and every image, so results do not
    depend on how images are batched. score_k = -error_k, probs = softmax(scores), pred =
    ``scoring.decide(scores)`` (argmax; -1 for an exact tie). All candidates of one timestep go
    through one ``predict_eps`` call (``batch_conditions=False`` makes one call per candidate,
    to save memory).

    ``prune_schedule`` [(n1, keep1), (n2, keep2), ...] (Li et al.'s adaptive evaluation):
    timesteps are visited in ``spread_order``; after n1 of them each image keeps its keep1
    candidates of lowest error so far, and so on; survivors are evaluated on all n_samples
    timesteps, so their scores equal the unpruned ones, and pruned candidates get score
    -inf (probability 0).

    Returns CPU tensors (float64 where real-valued): scores (B, K), probs (B, K), pred (B,), n_evals (B,) (UNet
    evaluations spent per image: candidates evaluated summed over timesteps), mean_error
    (B, K) (over the timesteps each candidate was evaluated on), n_evaluated (B, K),
    timesteps (n,).
    """
    conditions = list(conditions)
    if not conditions or not all(isinstance(c, str) for c in conditions):
        raise InputError("conditions must be a non-empty list of strings (words or prompts)")
    if loss not in ELBO_LOSSES:
        raise InputError(f"unknown loss {loss!r}; expected one of {', '.join(ELBO_LOSSES)}")
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise InputError(f"x0 must be a batch (B, ...) of model-space images; got shape {tuple(x0.shape)}")
    T = len(score_model.alphas_cumprod)
    if timesteps is None:
        grid = elbo_timesteps(n_samples, T)
    else:
        grid = torch.as_tensor(timesteps, dtype=torch.long).flatten()
        if grid.numel() == 0 or grid.min() < 0 or grid.max() > T - 1:
            raise InputError(f"timesteps must be a non-empty list of integers in [0, {T - 1}]")
    n = grid.numel()
    K, B, device = len(conditions), x0.shape[0], x0.device
    stages = _check_schedule(prune_schedule, n, K)
    order = spread_order(n) if stages else torch.arange(n)
    prune_at = dict(stages)

    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((n, *x0.shape[1:]), generator=generator, dtype=torch.float32)

    error_sum = torch.zeros(B, K, dtype=torch.float64)
    n_evaluated = torch.zeros(B, K, dtype=torch.long)
    alive = torch.ones(B, K, dtype=torch.bool)
    n_evals = torch.zeros(B, dtype=torch.long)
    for step, i in enumerate(progress_bar(order.tolist(), desc="ELBO timesteps", disable=not progress)):
        if step in prune_at:
            # Every survivor has the same number of evaluations here: sums rank like means.
            masked = torch.where(alive, error_sum, torch.full_like(error_sum, float("inf")))
            best = masked.topk(prune_at[step], dim=1, largest=False).indices
            alive = torch.zeros_like(alive).scatter_(1, best, True)
        t = torch.full((B,), int(grid[i]), dtype=torch.long, device=device)
        eps = noise[i].to(device=device, dtype=x0.dtype).expand_as(x0)
        x_t = score_model.add_noise(x0, eps, t)
        groups, which = torch.unique(alive, dim=0, return_inverse=True)
        for g, survivors in enumerate(groups):
            rows = (which == g).nonzero().squeeze(-1)
            cols = survivors.nonzero().squeeze(-1)
            names = [conditions[k] for k in cols.tolist()]
            rows_dev = rows.to(device)
            if batch_conditions:
                eps_hat = score_model.predict_eps(x_t[rows_dev], t[rows_dev], names)
            else:
                eps_hat = torch.cat([score_model.predict_eps(x_t[rows_dev], t[rows_dev], [name]) for name in names], 1)
            err = _per_element_error(eps[rows_dev].unsqueeze(1).float(), eps_hat.float(), loss)
            error_sum[rows[:, None], cols[None, :]] += err.double().cpu()
            n_evaluated[rows[:, None], cols[None, :]] += 1
            n_evals[rows] += len(names)

    mean_error = error_sum / n_evaluated.clamp_min(1)
    scores = torch.where(alive, -mean_error, torch.full_like(mean_error, float("-inf")))
    return {
        "scores": scores,
        "probs": torch.softmax(scores, dim=1),
        "pred": decide(scores),
        "n_evals": n_evals,
        "mean_error": mean_error,
        "n_evaluated": n_evaluated,
        "timesteps": grid,
    }


# ----------------------------------------------------------------------------- command line
# The script's constants live here, beside main(), so that the library code above stays as it was.
# Usage: python statistical_auditing/diffusion_classifier.py --model RUN_OR_SD --data DATA [flags];
# the data, condition and model flags are those of fairface.py (see its docstring).

from statistical_auditing.data_flags import (ATTRIBUTE, CLASSES, DATA, DATA_CHOICES, DATA_CONFIG,  # noqa: E402,F401
                                             IMAGE_COLUMN, IMAGES_ROOT, KIND, LABEL_COLUMN, RESIZE, SELECTION,
                                             SIZE, SKIP_BAD, SPLIT, TEMPLATE)  # data-source flags, shared
from statistical_auditing.model_flags import DEVICE, DTYPE, MODEL, MODEL_CHOICES, SCHEDULER  # noqa: E402,F401

NUM_IMAGES = 250  # [1, inf) images classified
CANDIDATES = ""  # candidate conditions, candidate i <-> class i ("" = family default for --attribute, or --template)
N_SAMPLES = 100  # [1, inf) Monte-Carlo timesteps per image (Li et al. / the original: 100)
LOSS = "l2"  # prediction error: l2 | l1 | huber
PRUNE = ""  # adaptive evaluation "n1:keep1,n2:keep2" (after n1 timesteps keep the keep1 best candidates, ...)
SEED = 0  # [0, 2**63) seed of the shared noise draws and of --selection random
BATCH_SIZE = 8  # [1, inf) images per UNet call (times the number of candidates)
OUT = "runs/diffusion_classifier"  # output folder: summary.csv, predictions.csv, confusion.csv, config.json


def parse_prune(text: str) -> list[tuple[int, int]]:
    """"20:5,50:1" -> [(20, 5), (50, 1)] (checked against n_samples by ``elbo_classify``)."""
    if not text.strip():
        return []
    stages = []
    for part in text.split(","):
        try:
            n_i, keep_i = (int(v) for v in part.split(":"))
        except ValueError:
            raise InputError(f"--prune: expected n:keep pairs such as 20:5,50:1, got {text!r}") from None
        stages.append((n_i, keep_i))
    return stages


def main(argv: list[str] | None = None) -> dict:
    """Classify labelled images with ``elbo_classify``; print and write accuracy (95% Wilson CI;
    an exact tie counts as wrong) and UNet evaluations per image."""
    import time
    from pathlib import Path

    from diffusion_from_scratch.cli import config_from_constants, constants_of, require
    from diffusion_from_scratch.utils import (atomic_write_json, atomic_write_text, csv_text, require_writable,
                                              writable_folder)
    from statistical_auditing import cli_common as cc
    from statistical_auditing.stats import binary_auc

    cfg = config_from_constants(constants_of(globals()), None, argv,
                                choices={**DATA_CHOICES, **MODEL_CHOICES, "loss": ELBO_LOSSES},
                                description="Zero-shot diffusion ELBO classifier on labelled images (Li et al. 2023).")
    prune = parse_prune(cfg["prune"])
    require_writable(Path(cfg["out"]), "out")
    score_model = cc.load_model(cfg)
    images = cc.open_data(cfg, score_model)
    classes = cc.resolve_classes(cfg, images)
    _, candidates = cc.resolve_conditions(cfg, score_model, classes, need_base=False)
    try:  # a bad schedule fails before any image
        _check_schedule(prune, cfg["n_samples"], len(candidates))
    except InputError as error:
        raise InputError(f"--prune {cfg['prune']!r}: {error}") from None
    selected = cc.select_records(images, cc.selected_indices(len(images), cfg["num_images"], cfg["selection"],
                                                             cfg["seed"]), classes)
    out = writable_folder(Path(cfg["out"]), "out")
    atomic_write_json(out / "config.json", cfg | {"candidates": candidates, "classes": classes})

    predictions, seconds, evals = [], 0.0, 0
    matrix = [[0] * (len(classes) + 1) for _ in classes]  # the last column counts ties (no call)
    progress = progress_bar(total=len(selected), desc="ELBO classifier", unit="image")
    for chunk, pixels, consumed in cc.decoded_batches(images, selected, cfg["batch_size"]):
        if chunk:
            x0 = score_model.encode(pixels)
            began = time.perf_counter()
            result = elbo_classify(score_model, x0, candidates, n_samples=cfg["n_samples"], loss=cfg["loss"],
                                   seed=cfg["seed"], prune_schedule=prune)
            seconds += time.perf_counter() - began
            for i, (_, image_id, _, label) in enumerate(chunk):
                pred = int(result["pred"][i])
                matrix[classes.index(label)][pred] += 1
                evals += int(result["n_evals"][i])
                predictions.append({"image_id": image_id, "label": label, "predicted": classes[pred] if pred >= 0
                                    else "tie", "n_evals": int(result["n_evals"][i]),
                                    **{f"p_{c}": round(float(p), 6) for c, p in zip(classes, result["probs"][i])}})
        progress.update(consumed)
    progress.close()
    require(bool(predictions), f"--data {cfg['data']}: every selected image was unreadable")
    n = len(predictions)
    auc = None
    if len(classes) == 2:  # threshold-free: how well p(class 1) - p(class 0) separates the classes
        auc = binary_auc([p[f"p_{classes[1]}"] - p[f"p_{classes[0]}"] for p in predictions],
                         [p["label"] == classes[1] for p in predictions])
    row = cc.accuracy_row("elbo", "", "", cfg["n_samples"], sum(matrix[i][i] for i in range(len(classes))), n,
                          seconds, evals, auc=auc, ties=sum(r[-1] for r in matrix))
    atomic_write_text(out / "summary.csv", csv_text([row], cc.SUMMARY_COLUMNS))
    atomic_write_text(out / "predictions.csv", csv_text(
        predictions, ["image_id", "label", "predicted", "n_evals"] + [f"p_{c}" for c in classes]))
    atomic_write_text(out / "confusion.csv", cc.confusion_text(matrix, classes))
    print(f"ELBO classifier ({cfg['n_samples']} timesteps, {cfg['loss']}"
          + (f", prune {cfg['prune']}" if prune else "") + f"): accuracy {row['accuracy']:.3f} "
          f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] (95% Wilson, n={n})"
          + ("" if auc is None else f", AUC {auc:.3f}") + f", {row['evals_per_image']:g} UNet "
          f"evaluations and {row['seconds_per_image']:.4f} s per image; results in {out}")
    return {"row": row, "confusion": matrix, "classes": classes, "predictions": predictions,
            "candidates": candidates}


if __name__ == "__main__":
    from diffusion_from_scratch.cli import run_main

    run_main(main)
