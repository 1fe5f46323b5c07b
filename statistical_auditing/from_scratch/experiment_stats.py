"""Statistics of the full experiment: pooling over sampling seeds and runs, regressions whose
intervals cover both words and runs, arm contrasts, held-out prediction, dose-response
slopes and empirical Lipschitz constants. Pure functions (numpy in, numbers out); each
docstring states the formula, and tests/test_experiment_stats.py checks each by hand.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats as _scipy_stats

from statistical_auditing.core.stats import ols, percentile_interval, wilson_interval

# A regressor whose standard deviation is below this (in cosine-gap units) has no spread to
# fit a slope on: hard-debiasing sets every profession's gap to ~1e-10 before the
# projection, and a "slope" on that is rounding noise (it printed 4.5e+07 once).
MIN_X_SD = 1e-3


# ----------------------------------------------------------------------------- shares


def _two_stage_draw(sizes: Sequence[int], rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
    """One resample of a two-stage (hierarchical) bootstrap (Davison & Hinkley 1997, sec. 3.8):
    draw len(sizes) groups (runs) with replacement, then within each drawn group draw its
    sizes[r] members (words) with replacement. Returns (group index, member indices) pairs."""
    return [(int(r), rng.integers(0, sizes[r], size=sizes[r])) for r in rng.integers(0, len(sizes), size=len(sizes))]


def pooled_share(counts: Sequence[tuple[int, int]], level: float = 0.95) -> dict:
    """Pool (successes, n) counts of several sampling seeds of ONE model.

    Every seed draws independent samples from the same model, so the pooled count is
    binomial: share = sum s_i / sum n_i with its Wilson interval. The seed-to-seed spread is
    the sample standard deviation of the per-seed shares s_i / n_i (ddof 1), and
    ``homogeneity_p`` is the p-value of Pearson's chi-square test that all seeds share one
    proportion (chi2 = sum_i (s_i - n_i p)^2 / (n_i p (1 - p)), m - 1 degrees of freedom): a
    small p says the seeds differ by more than sampling noise (a bug, not luck).
    """
    counts = [(int(s), int(n)) for s, n in counts if int(n) > 0]
    if not counts:
        return {"share": math.nan, "ci_low": math.nan, "ci_high": math.nan, "successes": 0, "n": 0,
                "n_seeds": 0, "seed_sd": math.nan, "seed_min": math.nan, "seed_max": math.nan,
                "homogeneity_p": math.nan}
    successes = sum(s for s, _ in counts)
    n = sum(m for _, m in counts)
    share = successes / n
    low, high = wilson_interval(successes, n, level)
    per_seed = np.array([s / m for s, m in counts])
    if len(counts) > 1 and 0 < share < 1:
        chi2 = sum((s - m * share) ** 2 / (m * share * (1 - share)) for s, m in counts)
        p_value = float(_scipy_stats.chi2.sf(chi2, len(counts) - 1))
    else:
        p_value = math.nan if len(counts) == 1 else 1.0
    return {"share": share, "ci_low": low, "ci_high": high, "successes": successes, "n": n,
            "n_seeds": len(counts), "seed_sd": float(per_seed.std(ddof=1)) if len(counts) > 1 else math.nan,
            "seed_min": float(per_seed.min()), "seed_max": float(per_seed.max()), "homogeneity_p": p_value}


def pooled_over_runs(counts: Sequence[tuple[int, int]], n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Mean female share over runs (models), with an interval over runs AND samples.

    Each run r contributes (s_r, n_r) and share p_r = s_r / n_r; the estimate is the mean of
    the p_r (each model counts once). The interval is a two-stage (hierarchical) percentile
    bootstrap (Davison & Hinkley 1997, sec. 3.8): resample the runs with replacement, then
    within each drawn run resample its n_r images (s* ~ Binomial(n_r, p_r)); the statistic is
    the mean of the resampled shares. With one run it reduces to the binomial bootstrap.
    """
    counts = [(int(s), int(n)) for s, n in counts if int(n) > 0]
    if not counts:
        return {"share": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n_runs": 0, "run_sd": math.nan}
    shares = np.array([s / n for s, n in counts])
    sizes = np.array([n for _, n in counts])
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(counts), size=(n_boot, len(counts)))
    draws = rng.binomial(sizes[pick], shares[pick]) / sizes[pick]
    low, high = percentile_interval(draws.mean(axis=1), level)
    return {"share": float(shares.mean()), "ci_low": low, "ci_high": high, "n_runs": len(counts),
            "run_sd": float(shares.std(ddof=1)) if len(counts) > 1 else math.nan}


def between_word_sd(successes: Sequence[int], n: Sequence[int]) -> dict:
    """How much the words' female shares differ beyond their sampling noise, in ONE run.

    With p_i = s_i / n_i for words i = 1..m, the observed spread is the sample standard
    deviation sd(p) (ddof 1). Each p_i carries binomial noise of variance p(1 - p) / n_i,
    estimated without bias by p_i (1 - p_i) / (n_i - 1); the between-word standard deviation
    is the method-of-moments estimate (DerSimonian & Laird 1986)
    tau = sqrt(max(0, var(p) - mean_i p_i (1 - p_i) / (n_i - 1))).
    tau = 0 means the words differ no more than sampling noise alone would make them.
    Returns dict(sd, tau, noise_sd = sqrt(mean noise variance), min, max, n_words).
    """
    s = np.asarray(successes, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    if s.shape != n.shape or ((s < 0) | (s > n)).any():
        raise ValueError("between_word_sd: expected 0 <= successes <= n for every word")
    keep = n > 1
    s, n = s[keep], n[keep]
    if s.size < 2:
        return {"sd": math.nan, "tau": math.nan, "noise_sd": math.nan, "min": math.nan, "max": math.nan,
                "n_words": int(s.size)}
    p = s / n
    variance = float(p.var(ddof=1))
    noise = float(np.mean(p * (1.0 - p) / (n - 1.0)))
    return {"sd": math.sqrt(variance), "tau": math.sqrt(max(0.0, variance - noise)), "noise_sd": math.sqrt(noise),
            "min": float(p.min()), "max": float(p.max()), "n_words": int(s.size)}


def pooled_between_word_sd(groups: Sequence[tuple[Sequence[int], Sequence[int]]], n_boot: int = 2000,
                           seed: int = 0, level: float = 0.95) -> dict:
    """``between_word_sd`` averaged over runs, with a two-stage percentile bootstrap interval.

    ``groups``: one (successes, n) pair of per-word arrays per run. The estimates are the means
    over runs of sd and tau; the interval resamples the runs, then the words within each drawn
    run (as ``hierarchical_regression`` does), and recomputes the mean tau and mean sd; min and
    max are the lowest and highest share over all runs.
    """
    groups = [(np.asarray(s, dtype=np.float64), np.asarray(n, dtype=np.float64)) for s, n in groups]
    groups = [(s, n) for s, n in groups if s.size >= 2]
    if not groups:
        return {"sd": math.nan, "sd_ci": (math.nan, math.nan), "tau": math.nan, "tau_ci": (math.nan, math.nan),
                "noise_sd": math.nan, "n_runs": 0, "min": math.nan, "max": math.nan}
    per_run = [between_word_sd(s, n) for s, n in groups]
    rng = np.random.default_rng(seed)
    replicates = np.empty((int(n_boot), 2))
    for b in range(int(n_boot)):
        drawn = [between_word_sd(groups[r][0][idx], groups[r][1][idx])
                 for r, idx in _two_stage_draw([s.size for s, _ in groups], rng)]
        replicates[b] = (np.mean([d["sd"] for d in drawn]), np.mean([d["tau"] for d in drawn]))
    return {"sd": float(np.mean([r["sd"] for r in per_run])), "sd_ci": percentile_interval(replicates[:, 0], level),
            "tau": float(np.mean([r["tau"] for r in per_run])), "tau_ci": percentile_interval(replicates[:, 1], level),
            "noise_sd": float(np.mean([r["noise_sd"] for r in per_run])), "n_runs": len(groups),
            "min": min(r["min"] for r in per_run), "max": max(r["max"] for r in per_run)}


# ----------------------------------------------------------------------------- regressions


def x_has_spread(x: Sequence[float], min_sd: float = MIN_X_SD) -> bool:
    """True when the sample standard deviation of x reaches ``min_sd`` (a slope is defined)."""
    x = np.asarray(x, dtype=np.float64)
    return x.size >= 2 and bool(np.isfinite(x).all()) and float(x.std(ddof=1)) >= min_sd


def undefined_fit(reason: str, n_runs: int, n_points: int) -> dict:
    return {"defined": False, "reason": reason, "slope": math.nan, "slope_ci": (math.nan, math.nan),
            "intercept": math.nan, "r2": math.nan, "r2_ci": (math.nan, math.nan), "n_runs": n_runs,
            "n_points": n_points, "replicates": np.empty((0, 2))}


def hierarchical_regression(groups: Sequence[tuple[Sequence[float], Sequence[float]]], n_boot: int = 2000,
                            seed: int = 0, level: float = 0.95, min_sd: float = MIN_X_SD) -> dict:
    """Least-squares line of y on x pooled over runs, with intervals over runs and words.

    ``groups``: one (x, y) pair of arrays per run (x = a word's cosine gap, y = its female
    share in that run). The estimate is the OLS line through all (run, word) points. The
    interval is a two-stage percentile bootstrap: draw the runs with replacement, then
    within each drawn run draw its words with replacement, and refit on the union (Davison
    & Hinkley 1997, sec. 3.8; with one run it is the pairs bootstrap over words). Resamples
    whose x has less spread than ``min_sd`` are dropped (counted in ``n_dropped``). When
    the data's own x has less spread than ``min_sd`` the slope is UNDEFINED: the result has
    defined = False and a reason instead of a number.
    Returns dict(defined, slope, intercept, r2, slope_ci, r2_ci, n_runs, n_points, n_boot,
    n_dropped, replicates (n_kept, 2) array of (slope, r2)).
    """
    groups = [(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)) for x, y in groups]
    groups = [(x, y) for x, y in groups if x.size]
    n_points = sum(x.size for x, _ in groups)
    if n_points < 3:
        return undefined_fit(f"only {n_points} points (a line with an interval needs 3)", len(groups), n_points)
    x_all = np.concatenate([x for x, _ in groups])
    y_all = np.concatenate([y for _, y in groups])
    if not (np.isfinite(x_all).all() and np.isfinite(y_all).all()):
        raise ValueError("x and y must be finite")
    if not x_has_spread(x_all, min_sd):
        return undefined_fit(f"x has no spread (sd {x_all.std(ddof=1):.2g} < {min_sd:g}): every word has the "
                             f"same embedding bias, so there is no slope to estimate", len(groups), n_points)
    slope, intercept, r2 = ols(x_all, y_all)
    rng = np.random.default_rng(seed)
    replicates = []
    for _ in range(int(n_boot)):
        draws = _two_stage_draw([x.size for x, _ in groups], rng)
        xb = np.concatenate([groups[r][0][idx] for r, idx in draws])
        yb = np.concatenate([groups[r][1][idx] for r, idx in draws])
        if x_has_spread(xb, min_sd):
            replicates.append(ols(xb, yb)[::2])
    replicates = np.asarray(replicates, dtype=np.float64).reshape(-1, 2)
    if not len(replicates):
        return undefined_fit("every bootstrap resample lacked spread in x", len(groups), n_points)
    return {"defined": True, "reason": "", "slope": slope, "intercept": intercept, "r2": r2,
            "slope_ci": percentile_interval(replicates[:, 0], level),
            "r2_ci": percentile_interval(replicates[:, 1], level),
            "n_runs": len(groups), "n_points": n_points, "n_boot": int(n_boot),
            "n_dropped": int(n_boot) - len(replicates), "replicates": replicates}


def slope_contrast(fit: dict, reference: dict, level: float = 0.95) -> dict:
    """slope(arm) - slope(reference) with a percentile interval from the two fits' independent
    bootstrap replicates (paired by index; the arms are different models, so their resamples
    are independent). Undefined when either slope is."""
    if not (fit.get("defined") and reference.get("defined")):
        return {"defined": False, "difference": math.nan, "ci": (math.nan, math.nan)}
    m = min(len(fit["replicates"]), len(reference["replicates"]))
    differences = fit["replicates"][:m, 0] - reference["replicates"][:m, 0]
    return {"defined": True, "difference": fit["slope"] - reference["slope"],
            "ci": percentile_interval(differences, level)}


def held_out_prediction(x: Sequence[float], y: Sequence[float], fold: Sequence[int]) -> dict:
    """Fit y = a + b x on the points of one fold and predict the other (two-fold cross-validation).

    ``fold`` is 0 or 1 per point. For each direction the line is fitted on one fold and the
    squared errors are taken on the other; returned: rmse (root mean of all held-out
    squared errors), mae, and r2_out = 1 - SSE / SS_tot, where SS_tot uses the training
    fold's mean as the prediction (so r2_out <= 0 means the line predicts no better than
    the mean share of the other words).
    """
    x, y, fold = (np.asarray(v, dtype=np.float64) for v in (x, y, fold))
    errors, baseline = [], []
    for train in (0, 1):
        fit_mask, test_mask = fold == train, fold != train
        if fit_mask.sum() < 2 or test_mask.sum() < 1 or not x_has_spread(x[fit_mask]):
            return {"defined": False, "rmse": math.nan, "mae": math.nan, "r2_out": math.nan, "n": int(x.size)}
        slope, intercept, _ = ols(x[fit_mask], y[fit_mask])
        errors.append(y[test_mask] - (intercept + slope * x[test_mask]))
        baseline.append(y[test_mask] - y[fit_mask].mean())
    errors, baseline = np.concatenate(errors), np.concatenate(baseline)
    sst = float(baseline @ baseline)
    return {"defined": True, "rmse": float(np.sqrt(np.mean(errors ** 2))), "mae": float(np.mean(np.abs(errors))),
            "r2_out": 1 - float(errors @ errors) / sst if sst > 0 else math.nan, "n": int(x.size)}


def alternating_folds(order_key: Sequence[float]) -> np.ndarray:
    """Fold 0/1 by alternating ranks of ``order_key`` (e.g. the cosine gap), so both folds span
    its whole range."""
    ranks = np.argsort(np.argsort(np.asarray(order_key, dtype=np.float64), kind="stable"), kind="stable")
    return (ranks % 2).astype(int)


# ----------------------------------------------------------------------------- dose-response


def logistic_fit(x: Sequence[float], successes: Sequence[int], n: Sequence[int], level: float = 0.95,
                 max_iter: int = 100) -> dict:
    """Binomial logistic regression logit P(success) = a + b x by Newton-Raphson (IRLS; McCullagh &
    Nelder 1989, sec. 4.4), with a Wald interval for b: b +- z SE(b), SE from the inverse
    Fisher information (X^T W X)^-1, W = diag(n_i p_i (1 - p_i)).

    Groups with n_i = 0 are ignored. When the data are (quasi-)separated (all or none of
    every group succeed on each side of a threshold) the maximum-likelihood slope is
    infinite; this is reported as converged = False with the last iterate.
    """
    x, s, m = (np.asarray(v, dtype=np.float64) for v in (x, successes, n))
    keep = m > 0
    x, s, m = x[keep], s[keep], m[keep]
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError("a logistic slope needs at least two distinct x values with samples")
    design = np.column_stack([np.ones_like(x), x])
    beta = np.zeros(2)
    converged = False
    for _ in range(max_iter):
        eta = design @ beta
        p = 1.0 / (1.0 + np.exp(-eta))
        weights = m * p * (1 - p)
        info = design.T @ (design * weights[:, None])
        score = design.T @ (s - m * p)
        try:
            step = np.linalg.solve(info, score)
        except np.linalg.LinAlgError:
            break
        beta = beta + step
        if np.max(np.abs(step)) < 1e-10:
            converged = True
            break
        if np.max(np.abs(beta)) > 1e3:
            break
    p = 1.0 / (1.0 + np.exp(-(design @ beta)))
    info = design.T @ (design * (m * p * (1 - p))[:, None])
    try:
        se = float(np.sqrt(np.linalg.inv(info)[1, 1]))
    except np.linalg.LinAlgError:
        se = math.inf
    z = float(_scipy_stats.norm.ppf(0.5 + level / 2))
    return {"intercept": float(beta[0]), "slope": float(beta[1]), "slope_se": se,
            "slope_ci": (float(beta[1] - z * se), float(beta[1] + z * se)), "converged": converged}


# ----------------------------------------------------------------------------- Lipschitz


SAME_CONDITIONING_RTOL = 1e-4  # ||y1 - y2|| <= this x max(||y1||, ||y2||): the same vector up to float32 rounding


def same_conditioning_distance(y_1: np.ndarray, y_2: np.ndarray) -> np.ndarray:
    """The distance at or below which y_1 and y_2 count as one conditioning:
    SAME_CONDITIONING_RTOL * max(||y_1||, ||y_2||) (per row for (N, d) inputs).

    One vector computed two ways (a dose-response point at alpha = 0 and the word it moves) differs
    by float32 rounding, about 1e-7 of its norm; a ratio over that distance measures the rounding,
    not the model (it gave ratios of 1e4-1e5 where real pairs give about 1).
    """
    y_1, y_2 = np.asarray(y_1, dtype=np.float64), np.asarray(y_2, dtype=np.float64)
    return SAME_CONDITIONING_RTOL * np.maximum(np.linalg.norm(y_1, axis=-1), np.linalg.norm(y_2, axis=-1))


def distinct_rows(vectors: np.ndarray) -> list[int]:
    """Indices of the rows of ``vectors`` (V, d) left when every row within
    ``same_conditioning_distance`` of an earlier kept row is dropped (first occurrences kept)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    kept: list[int] = []
    for i, row in enumerate(vectors):
        if not any(np.linalg.norm(row - vectors[j]) <= same_conditioning_distance(row, vectors[j]) for j in kept):
            kept.append(i)
    return kept


def lipschitz_ratios(eps_1: np.ndarray, eps_2: np.ndarray, y_1: np.ndarray, y_2: np.ndarray) -> np.ndarray:
    """Empirical Lipschitz ratios ||f(x, y1) - f(x, y2)||_2 / ||y1 - y2||_2, one per row.

    eps_1, eps_2: (N, D) outputs of the same inputs x under conditionings y_1, y_2 (N, d)
    (or (d,), broadcast). Each ratio is a lower bound on the Lipschitz constant of f in y
    at x (for any L with ||f(x, a) - f(x, b)|| <= L ||a - b||, L >= ratio). Pairs that are one
    conditioning (``same_conditioning_distance``: equal up to float rounding) are an error.
    """
    eps_1, eps_2 = np.asarray(eps_1, dtype=np.float64), np.asarray(eps_2, dtype=np.float64)
    shape = (eps_1.shape[0], np.asarray(y_1).shape[-1])
    y_1, y_2 = np.broadcast_to(np.asarray(y_1, dtype=np.float64), shape), np.broadcast_to(
        np.asarray(y_2, dtype=np.float64), shape)
    distance = np.linalg.norm(y_1 - y_2, axis=-1)
    if np.any(distance <= same_conditioning_distance(y_1, y_2)):
        raise ValueError("conditionings equal up to float rounding have no Lipschitz ratio (distinct_rows drops them)")
    return np.linalg.norm((eps_1 - eps_2).reshape(len(eps_1), -1), axis=-1) / distance


# ----------------------------------------------------------------------------- projection-only gap shifts


def fixed_order_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` in float64, each entry sum_k a[i, k] b[k, j] added by numpy's own pairwise
    reduction along a contiguous axis: one order of additions whatever the thread count.
    A threaded BLAS splits the sum into blocks that depend on its threads (OMP_NUM_THREADS,
    MKL_NUM_THREADS), and float rounding then changes the last digits."""
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b_t = np.ascontiguousarray(np.asarray(b, dtype=np.float64).T)
    return np.stack([(b_t * row).sum(axis=1) for row in a]).reshape(a.shape[0], b_t.shape[0])


def _fixed_order_units(vectors: np.ndarray) -> np.ndarray:
    norms = np.sqrt((vectors * vectors).sum(axis=1, keepdims=True))
    if np.any(norms == 0):
        raise ValueError("cannot unit-normalise a zero vector")
    return vectors / norms


def jl_gap_shifts(vectors: np.ndarray, female: np.ndarray, male: np.ndarray, matrix: np.ndarray) -> dict:
    """How far a random projection alone moves each word's cosine gap (no training involved).

    For rows u_i of ``vectors`` (n, D), reference vectors f ("woman") and m ("man") and the
    projection P = ``matrix`` (D, d):
        gap_before_i = cos(u_i, f) - cos(u_i, m),
        gap_after_i  = cos(u_i P, f P) - cos(u_i P, m P),   shift_i = gap_after_i - gap_before_i,
    cos(a, b) = a.b / (||a|| ||b||). A Johnson-Lindenstrauss projection keeps inner products of
    unit vectors only up to errors of order 1/sqrt(d) (Johnson & Lindenstrauss 1984; Dasgupta &
    Gupta 2003), so shifts of that size are expected. Computed in float64 with fixed-order sums
    (``fixed_order_matmul``) so the digits do not depend on the maths library's thread count.
    Returns arrays gap_before, gap_after, shift of length n.
    """
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    refs = np.stack([np.asarray(female, dtype=np.float64), np.asarray(male, dtype=np.float64)])

    def gaps(rows: np.ndarray, ref: np.ndarray) -> np.ndarray:
        cosines = fixed_order_matmul(_fixed_order_units(rows), _fixed_order_units(ref).T)
        return cosines[:, 0] - cosines[:, 1]

    before = gaps(vectors, refs)
    after = gaps(fixed_order_matmul(vectors, matrix), fixed_order_matmul(refs, matrix))
    return {"gap_before": before, "gap_after": after, "shift": after - before}
