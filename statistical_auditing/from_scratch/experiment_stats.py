"""Statistics of the full experiment: pooling over sampling seeds and runs, regressions whose
intervals cover both words and runs, arm contrasts, held-out prediction, dose-response
slopes and empirical Lipschitz constants. Pure functions (numpy in, numbers out); each
docstring states the formula, and tests/test_experiment_stats.py checks each by hand.

The design the intervals follow: every run of the experiment audits THE SAME unseen words and
draws each seen word from THE SAME sampling seeds (unless its audit seed differs), so words and
seeds are crossed with runs, and runs are nested in arms. The resamples are therefore crossed
("pigeonhole") bootstraps (Owen 2007, "The pigeonhole bootstrap", Ann. Appl. Stat. 1(2),
386-411; McCullagh 2000, "Resampling and exchangeable arrays", Bernoulli 6(2), 285-301): one
draw of runs and ONE draw of word (or seed) indices, the same indices applied to every drawn
run. Index draws come from ``numpy.random.default_rng([*seed, stream])`` with one stream per
factor (``draw_indices``), so a result is a function of its arguments, and fits given the same
word draws are paired replicate by replicate.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as _scipy_stats

from bias_begets_bias.cli import InputError
from statistical_auditing.core.stats import finite_percentile_interval, ols, percentile_interval, wilson_interval
from statistical_auditing.from_scratch.variance_components import repeated_cv_r2

# A regressor whose standard deviation is below this (in cosine-gap units) has no spread to
# fit a slope on: hard-debiasing sets every profession's gap to ~1e-10 before the
# projection, and a "slope" on that is rounding noise (it printed 4.5e+07 once).
MIN_X_SD = 1e-3
# The random streams of the crossed resamples: one per factor, so that the word draws do not
# depend on how many runs an arm has (and two arms can share them while drawing runs apart).
RUN_STREAM, WORD_STREAM, SEED_STREAM = 0, 1, 2
STATISTIC_COLUMN = {"slope": 0, "r2": 1}  # the columns of a fit's "replicates"


# ----------------------------------------------------------------------------- resampling


def _entropy(seed) -> list[int]:
    """A seed (an int, or a sequence of ints such as [seed, arm key]) as a list of ints."""
    values = [seed] if np.isscalar(seed) else list(seed)
    if not values or any(int(v) != v or v < 0 for v in values):
        raise InputError(f"seed: expected a non-negative integer or a sequence of them, got {seed!r}")
    return [int(v) for v in values]


def draw_indices(size: int, n_boot: int, seed, stream: int) -> np.ndarray:
    """(n_boot, size) indices in [0, size) drawn uniformly with replacement (row b: resample b),
    by numpy.random.default_rng([*seed, stream]): each factor (runs, words, seeds) has its own
    stream, so its draws are independent of the others' and of their sizes."""
    if int(size) < 1 or int(n_boot) < 1:
        raise InputError(f"draw_indices: expected size >= 1 and n_boot >= 1, got {size} and {n_boot}")
    rng = np.random.default_rng([*_entropy(seed), int(stream)])
    return rng.integers(0, int(size), size=(int(n_boot), int(size)))


def word_draws(n_words: int, n_boot: int, seed) -> np.ndarray:
    """The word indices of n_boot crossed resamples, (n_boot, n_words): ``draw_indices`` on the
    word stream. Pass the same array to every fit whose replicates must be paired over words."""
    return draw_indices(n_words, n_boot, seed, WORD_STREAM)


def crossed_resample(cells: np.ndarray, runs: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Pigeonhole resamples of a runs x columns array (Owen 2007): resample b is
    cells[runs[b, i], columns[b, j]] for i = 1..R', j = 1..C' -- the SAME column (word or seed)
    indices in every drawn run. cells (R, C, ...), runs (B, R'), columns (B, C') -> (B, R', C', ...)."""
    return np.asarray(cells)[np.asarray(runs)[:, :, None], np.asarray(columns)[:, None, :]]


def _checked_draws(draws, n_boot: int, size: int, what: str) -> np.ndarray:
    draws = np.asarray(draws)
    if draws.shape != (int(n_boot), int(size)) or not np.issubdtype(draws.dtype, np.integer) or \
            draws.min() < 0 or draws.max() >= size:
        raise InputError(f"{what}: expected ({n_boot}, {size}) integer indices in [0, {size}) (one row of "
                         f"{what} per resample), got shape {draws.shape}")
    return draws


def _aligned(arrays: Sequence[np.ndarray], what: str, unit: str = "words") -> np.ndarray:
    """Runs' per-word (or per-seed) arrays stacked (R, C): a crossed resample needs column j to be
    the same word in every run, so unequal lengths cannot be aligned and are an error."""
    sizes = sorted({a.size for a in arrays})
    if len(sizes) > 1:
        raise InputError(f"{what}: the runs have {', '.join(map(str, sizes))} {unit}; a crossed resample needs "
                         f"the same {unit} in the same order in every run (align them by name: align_rows)")
    return np.stack(arrays)


def align_rows(tables: Mapping[str, Mapping], what: str = "word") -> tuple[list, list[list]]:
    """Each run's rows in one order, so that position j is the same word (or seed) in every run.

    ``tables``: run name -> {key (a word or seed index): row}. The order is the first run's.
    A run that lacks a key another run has is an InputError naming both: the runs of a crossed
    design must all have measured the same words. Returns (keys, per run the rows in that order).
    """
    if not tables:
        return [], []
    names = list(tables)
    keys = list(tables[names[0]])
    for name in names[1:]:
        missing = [k for k in keys if k not in tables[name]]
        extra = [k for k in tables[name] if k not in tables[names[0]]]
        if missing or extra:
            lacking, holder, key = (name, names[0], missing[0]) if missing else (names[0], name, extra[0])
            raise InputError(f"{lacking} has no usable row for the {what} {key!r}, which {holder} has: the runs "
                             f"are crossed with their {what}s, so every run must have measured every {what}")
    return keys, [[tables[name][k] for k in keys] for name in names]


# ----------------------------------------------------------------------------- shares


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
    """Mean female share over runs (models), with an interval over runs AND samples, for counts
    whose sampling noise is independent between runs (the dose-response points; seen words with
    one sampling seed per run).

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


RESAMPLE_TEXT = {"crossed": "runs x sampling seeds, crossed (the same seed draws in every run)",
                 "nested": "runs, then each run's sampling seeds (nested)",
                 "binomial": "runs, then binomial counts (one sampling seed per run)"}


def pooled_over_runs_and_seeds(successes: Sequence[Sequence[int]], n: Sequence[Sequence[int]], shared: bool,
                               n_boot: int = 2000, seed=0, level: float = 0.95) -> dict:
    """Mean female share over runs of one seen word, with an interval over runs AND sampling seeds.

    ``successes[r][k]``, ``n[r][k]``: run r's count for sampling seed k (the audit's seeds.csv
    rows). Run r's share is p_r = sum_k s_rk / sum_k n_rk; the estimate is mean_r p_r. Each cell
    is resampled as it was observed (no binomial redraw). With ``shared`` (every run sampled
    from the same audit seed, so seed k is the same noise scored in every run) the seeds are
    crossed with the runs and resample b is a pigeonhole draw (Owen 2007): runs r*_1..r*_R and
    ONE draw of seeds k*_1..k*_K for all of them, p*_b = mean_i sum_j s[r*_i, k*_j] / sum_j
    n[r*_i, k*_j] (the runs must list the same seeds, aligned by seed index). Otherwise (per-run
    audit seeds: independent noise) each drawn run redraws its own seeds: the nested two-stage
    bootstrap (Davison & Hinkley 1997, sec. 3.8). With 4 seeds the seed part is coarse: a draw
    of 4 takes one of only 35 distinct multisets, and a bootstrap over K units gives (K - 1) / K
    of the usual variance of their mean. With a single seed in some run nothing can be redrawn
    at the seed level, so the interval falls back to ``pooled_over_runs`` (binomial counts).
    Returns dict(share, ci_low, ci_high, n_runs, run_sd, n_seeds, resample: a key of RESAMPLE_TEXT).
    """
    s = [np.asarray(v, dtype=np.float64) for v in successes]
    m = [np.asarray(v, dtype=np.float64) for v in n]
    if len(s) != len(m) or any(a.shape != b.shape or a.ndim != 1 for a, b in zip(s, m)):
        raise InputError("successes, n: expected one list of per-seed counts per run, the same length in both")
    if any(((a < 0) | (a > b)).any() for a, b in zip(s, m)):
        raise InputError("successes, n: expected 0 <= successes <= n for every seed")
    kept = [(a, b) for a, b in zip(s, m) if b.sum() > 0]
    if shared and kept:  # seed k must be one seed in every run, whatever the fallback below
        _aligned([a for a, _ in kept], "successes", "sampling seeds")
    if not kept:
        return {"share": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n_runs": 0, "run_sd": math.nan,
                "n_seeds": 0, "resample": "binomial"}
    shares = np.array([a.sum() / b.sum() for a, b in kept])
    n_seeds = min(a.size for a, _ in kept)
    result = {"share": float(shares.mean()), "ci_low": math.nan, "ci_high": math.nan, "n_runs": len(kept),
              "run_sd": float(shares.std(ddof=1)) if len(kept) > 1 else math.nan, "n_seeds": n_seeds}
    if n_seeds < 2:
        pooled = pooled_over_runs([(int(a.sum()), int(b.sum())) for a, b in kept], n_boot, _entropy(seed)[0], level)
        return result | {"ci_low": pooled["ci_low"], "ci_high": pooled["ci_high"], "resample": "binomial"}
    replicates = run_seed_replicates([a for a, _ in kept], [b for _, b in kept], shared, n_boot, seed)
    low, high = finite_percentile_interval(replicates, level)
    return result | {"ci_low": low, "ci_high": high, "resample": "crossed" if shared else "nested"}


def run_seed_replicates(successes: Sequence[np.ndarray], n: Sequence[np.ndarray], shared: bool, n_boot: int,
                        seed) -> np.ndarray:
    """The n_boot resampled means over runs of ``pooled_over_runs_and_seeds`` (its formula):
    runs from ``draw_indices`` on the run stream; seeds on the seed stream, one (n_boot, K)
    draw shared by every drawn run when ``shared`` (``crossed_resample``), else each drawn run
    its own K_r seeds. NaN where a drawn run's drawn seeds hold no image."""
    runs = draw_indices(len(successes), n_boot, seed, RUN_STREAM)
    if shared:
        s_all, m_all = _aligned(list(successes), "successes", "sampling seeds"), np.stack(n)
        seeds = draw_indices(s_all.shape[1], n_boot, seed, SEED_STREAM)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (crossed_resample(s_all, runs, seeds).sum(axis=2)
                    / crossed_resample(m_all, runs, seeds).sum(axis=2)).mean(axis=1)
    rng = np.random.default_rng([*_entropy(seed), SEED_STREAM])
    replicates = np.empty(int(n_boot))
    for b in range(int(n_boot)):
        shares = []
        for r in runs[b]:
            idx = rng.integers(0, successes[r].size, size=successes[r].size)  # this run's own seed draw
            total = n[r][idx].sum()
            shares.append(successes[r][idx].sum() / total if total > 0 else math.nan)
        replicates[b] = np.mean(shares)
    return replicates


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
                           seed=0, level: float = 0.95, words: np.ndarray | None = None) -> dict:
    """``between_word_sd`` averaged over runs, with a crossed (pigeonhole) bootstrap interval.

    ``groups``: one (successes, n) pair of per-word arrays per run, ALIGNED: position j is the
    same word in every run (``align_rows``). The estimates are the means over runs of sd and
    tau; min and max are the lowest and highest share over all runs. Resample b draws the runs
    r*_1..r*_R with replacement and ONE draw of word indices w*_b (``words[b]``, default
    ``word_draws(m, n_boot, seed)``) used in every drawn run (Owen 2007; McCullagh 2000), and
    recomputes mean_i tau(run r*_i on words w*_b) and the mean sd; percentile intervals. With
    one run it is the bootstrap over words.
    """
    groups = [(np.asarray(s, dtype=np.float64), np.asarray(n, dtype=np.float64)) for s, n in groups]
    groups = [(s, n) for s, n in groups if s.size >= 2]
    if not groups:
        return {"sd": math.nan, "sd_ci": (math.nan, math.nan), "tau": math.nan, "tau_ci": (math.nan, math.nan),
                "noise_sd": math.nan, "n_runs": 0, "min": math.nan, "max": math.nan}
    successes = _aligned([s for s, _ in groups], "groups")
    sizes = np.stack([n for _, n in groups])
    per_run = [between_word_sd(s, n) for s, n in groups]
    runs = draw_indices(len(groups), n_boot, seed, RUN_STREAM)
    words = word_draws(successes.shape[1], n_boot, seed) if words is None else \
        _checked_draws(words, n_boot, successes.shape[1], "words")
    replicates = np.empty((int(n_boot), 2))
    for b in range(int(n_boot)):
        drawn = [between_word_sd(successes[r, words[b]], sizes[r, words[b]]) for r in runs[b]]
        replicates[b] = (np.mean([d["sd"] for d in drawn]), np.mean([d["tau"] for d in drawn]))
    return {"sd": float(np.mean([r["sd"] for r in per_run])), "sd_ci": finite_percentile_interval(replicates[:, 0], level),
            "tau": float(np.mean([r["tau"] for r in per_run])), "tau_ci": finite_percentile_interval(replicates[:, 1], level),
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
            "n_points": n_points, "replicates": np.empty((0, 2)), "word_draws": None}


def _batch_ols(x: np.ndarray, y: np.ndarray, min_sd: float) -> np.ndarray:
    """(slope, r^2) of each row's least-squares line (the formulas of core.stats.ols), rows
    (B, N) -> (B, 2); NaN where the row's x has sample sd below ``min_sd``."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    sxx, syy, sxy = (xc * xc).sum(axis=1), (yc * yc).sum(axis=1), (xc * yc).sum(axis=1)
    ok = np.sqrt(sxx / (x.shape[1] - 1)) >= min_sd
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(ok, sxy / sxx, np.nan)
        r2 = np.where(ok, np.where(syy > 0, sxy * sxy / (sxx * syy), 0.0), np.nan)
    return np.column_stack([slope, r2])


def hierarchical_regression(groups: Sequence[tuple[Sequence[float], Sequence[float]]], n_boot: int = 2000,
                            seed=0, level: float = 0.95, min_sd: float = MIN_X_SD,
                            words: np.ndarray | None = None) -> dict:
    """Least-squares line of y on x pooled over runs, with intervals over runs and words, which
    are crossed (every run measured the same words).

    ``groups``: one (x, y) pair of arrays per run (x = a word's cosine gap, y = its female
    share in that run), ALIGNED: point j is the same word in every run (``align_rows``). The
    estimate is the OLS line through all (run, word) points. The interval is a pigeonhole
    bootstrap (Owen 2007; McCullagh 2000): resample b draws the runs r*_1..r*_R with
    replacement (``draw_indices`` on ``seed``'s run stream) and ONE draw of word indices w*_b
    (``words[b]``; default ``word_draws(m, n_boot, seed)``), the same words in every drawn run,
    and refits on {(x[r*_i, w*_bj], y[r*_i, w*_bj])}. A word's shares in all runs travel
    together, so a word effect common to the runs counts once per word, not once per run (the
    nested draw, words redrawn inside each run, treated it as independent and was too narrow).
    Owen shows the pigeonhole variance is mildly conservative; McCullagh that no resampling of
    a crossed array is exactly unbiased. With one run it is the pairs bootstrap over words.
    Fits given the same ``words`` are paired replicate by replicate (``paired_contrast``).
    Resamples whose x has less spread than ``min_sd`` are dropped (NaN rows, counted in
    ``n_dropped``). When the data's own x has less spread than ``min_sd`` the slope is
    UNDEFINED: defined = False and a reason instead of a number.
    Returns dict(defined, slope, intercept, r2, slope_ci, r2_ci, n_runs, n_points, n_boot,
    n_dropped, replicates (n_boot, 2) of (slope, r2), word_draws).
    """
    groups = [(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)) for x, y in groups]
    groups = [(x, y) for x, y in groups if x.size]
    n_points = sum(x.size for x, _ in groups)
    if n_points < 3:
        return undefined_fit(f"only {n_points} points (a line with an interval needs 3)", len(groups), n_points)
    x_all = _aligned([x for x, _ in groups], "groups")
    y_all = _aligned([y for _, y in groups], "groups")
    if x_all.shape != y_all.shape or not (np.isfinite(x_all).all() and np.isfinite(y_all).all()):
        raise InputError("groups: expected finite x and y, one y per x, in every run")
    if not x_has_spread(x_all.ravel(), min_sd):
        return undefined_fit(f"x has no spread (sd {x_all.std(ddof=1):.2g} < {min_sd:g}): every word has the "
                             f"same embedding bias, so there is no slope to estimate", len(groups), n_points)
    slope, intercept, r2 = ols(x_all.ravel(), y_all.ravel())
    n_words = x_all.shape[1]
    runs = draw_indices(len(groups), n_boot, seed, RUN_STREAM)
    words = word_draws(n_words, n_boot, seed) if words is None else _checked_draws(words, n_boot, n_words, "words")
    replicates = _batch_ols(crossed_resample(x_all, runs, words).reshape(int(n_boot), -1),
                            crossed_resample(y_all, runs, words).reshape(int(n_boot), -1), min_sd)
    kept = int(np.isfinite(replicates[:, 0]).sum())
    if not kept:
        return undefined_fit("every bootstrap resample lacked spread in x", len(groups), n_points)
    return {"defined": True, "reason": "", "slope": slope, "intercept": intercept, "r2": r2,
            "slope_ci": finite_percentile_interval(replicates[:, 0], level), "r2_ci": finite_percentile_interval(replicates[:, 1], level),
            "n_runs": len(groups), "n_points": n_points, "n_boot": int(n_boot), "n_dropped": int(n_boot) - kept,
            "replicates": replicates, "word_draws": words}


def paired_contrast(fit: dict, reference: dict, statistic: str = "slope", level: float = 0.95) -> dict:
    """statistic(fit) - statistic(reference), statistic "slope" or "r2", with the percentile
    interval of the replicate-wise differences d_b = theta*_b(fit) - theta*_b(reference)
    (Efron & Tibshirani 1993, ch. 13). The two fits must have been resampled with the SAME word
    draws (``words`` of ``hierarchical_regression``), so that replicate b of both uses the same
    words: the contrast is paired over the words the arms (or regressors) share, and a word
    effect common to both cancels. Runs are whatever the fits drew: independently for two arms
    (different models, different run seeds), the same runs for two regressors of one arm (same
    seed). Replicates dropped in either fit are left out. Undefined when either fit is.
    """
    if statistic not in STATISTIC_COLUMN:
        raise InputError(f"statistic: expected one of {', '.join(STATISTIC_COLUMN)}, got {statistic!r}")
    if not (fit.get("defined") and reference.get("defined")):
        return {"defined": False, "difference": math.nan, "ci": (math.nan, math.nan)}
    if fit["word_draws"].shape != reference["word_draws"].shape or \
            not np.array_equal(fit["word_draws"], reference["word_draws"]):
        raise InputError("paired_contrast: the two fits were resampled with different word draws, so their "
                         "replicates are not paired; give both fits the same words= (word_draws)")
    column = STATISTIC_COLUMN[statistic]
    differences = fit["replicates"][:, column] - reference["replicates"][:, column]
    return {"defined": True, "difference": fit[statistic] - reference[statistic],
            "ci": finite_percentile_interval(differences, level), "replicates": differences}


def slope_contrast(fit: dict, reference: dict, level: float = 0.95) -> dict:
    """slope(arm) - slope(reference), paired over the shared word draws: ``paired_contrast``."""
    return paired_contrast(fit, reference, "slope", level)


def held_out_prediction(x: Sequence[float], y: Sequence[float], folds: int = 2, repeats: int = 200, seed: int = 0,
                        level: float = 0.95, groups: Sequence | None = None) -> dict:
    """Held-out prediction by a line y = a + b x under repeated random K-fold cross-validation:
    variance_components.repeated_cv_r2 (Hastie, Tibshirani & Friedman 2009, sec. 7.10). Per
    repeat the points, or with ``groups`` the labels (the words, so that no word is predicted
    from its own shares in other runs), are split at random into ``folds`` groups, each
    predicted by the least-squares line of the others: R^2_cv = 1 - sum (y_i - yhat_i)^2 /
    sum (y_i - ybar_(-i))^2, RMSE = sqrt(mean_i (y_i - yhat_i)^2), MAE = mean_i |y_i - yhat_i|,
    each averaged over repeats. The intervals are the percentile ranges over repeats: how much
    the answer depends on the split and NOTHING else (not words, runs or JL draws; Bengio &
    Grandvalet 2004). Undefined (defined = False) when x has no spread (``x_has_spread``) or
    there are too few points or labels for the folds.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n_units = x.size if groups is None else len(set(groups))
    empty = {"defined": False, "r2_out": math.nan, "r2_out_ci": (math.nan, math.nan), "rmse": math.nan,
             "rmse_ci": (math.nan, math.nan), "mae": math.nan, "n": int(x.size), "folds": int(folds),
             "repeats": int(repeats)}
    if n_units < 2 * folds or not x_has_spread(x):
        return empty
    cv = repeated_cv_r2(x, y, folds=folds, repeats=repeats, seed=seed, level=level,
                        groups=None if groups is None else np.asarray(groups))
    return {"defined": True, "r2_out": cv["r2"], "r2_out_ci": cv["ci"], "rmse": float(cv["rmse_by_repeat"].mean()),
            "rmse_ci": finite_percentile_interval(cv["rmse_by_repeat"], level), "mae": float(cv["mae_by_repeat"].mean()),
            "n": int(x.size), "folds": int(folds), "repeats": int(repeats), "r2_by_repeat": cv["r2_by_repeat"],
            "rmse_by_repeat": cv["rmse_by_repeat"]}


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
