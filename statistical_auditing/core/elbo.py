"""Zero-shot classification with a conditional diffusion model's own likelihood (the method of
statistical_auditing/diffusion_classifier.py, also fairface.py's and the audit's baseline).

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

from bias_begets_bias.cli import InputError
from bias_begets_bias.utils import progress_bar
from statistical_auditing.core.score_interface import ScoreModel
from statistical_auditing.core.scoring import decide

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


def check_prune_schedule(prune_schedule, n_samples: int, n_conditions: int) -> list[tuple[int, int]]:
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
    stages = check_prune_schedule(prune_schedule, n, K)
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
