"""Uncertainty for the audits: proportions with Wilson intervals, regressions with a
bootstrap, and the two plots the reports use (PNG, matplotlib Agg, written atomically)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats as _scipy_stats


def _z_value(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be strictly between 0 and 1; got {level!r}")
    return float(_scipy_stats.norm.ppf(0.5 + level / 2.0))


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927; Agresti & Coull 1998).

    With p = successes / n and z the two-sided normal quantile for ``level``:

        centre = (p + z^2 / (2n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))

    and the interval is [centre - half, centre + half] (clipped to [0, 1] against rounding).
    Unlike the Wald interval it stays inside [0, 1] and is not degenerate at p = 0 or 1:
    0 of 10 gives [0, z^2 / (n + z^2)] = [0, 0.2775] at 95%.

    n = 0 raises ValueError: there is no proportion to bound, and callers report that
    case explicitly instead of printing a meaningless interval.
    """
    if isinstance(successes, bool) or isinstance(n, bool):
        raise ValueError("successes and n must be integer counts, not booleans")
    if int(successes) != successes or int(n) != n:
        raise ValueError(f"successes and n must be integer counts; got {successes!r} and {n!r}")
    successes, n = int(successes), int(n)
    if n == 0:
        raise ValueError("wilson_interval: n = 0 trials, the proportion is undefined (no interval)")
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0; got successes={successes}, n={n}")
    z = _z_value(level)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
    # At p = 0 (p = 1) the bound equals 0 (1) exactly; set it so rounding cannot move it.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def proportion_summary(successes: int, n: int, level: float = 0.95) -> dict:
    """share = successes / n with its Wilson interval: dict(share, low, high, n, successes, level)."""
    low, high = wilson_interval(successes, n, level)
    return {"share": int(successes) / int(n), "low": low, "high": high, "n": int(n),
            "successes": int(successes), "level": level}


def binary_auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for the ``positive`` class (Hanley & McNeil 1982).

    AUC = P(score of a random positive > score of a random negative) + 1/2 P(equal), i.e.
    the Mann-Whitney U statistic over n_pos * n_neg:

        AUC = (#{(i, j): s_i > s_j} + 1/2 #{(i, j): s_i = s_j}) / (n_pos n_neg),  i positive, j negative.

    None when either class is absent. Threshold-free: it says whether the scores separate
    the classes even when a shifted decision threshold (a biased model) spoils the accuracy.
    Computed from ranks (mid-ranks for ties) in O(n log n).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos = np.asarray(positive, dtype=bool).ravel()
    if s.shape != pos.shape:
        raise ValueError(f"got {s.size} scores for {pos.size} labels")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _scipy_stats.rankdata(s)  # mid-ranks: a tie between a positive and a negative counts 1/2
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def calibrated_threshold(margins: Sequence[float], positives: Sequence[bool]) -> float:
    """The threshold on a margin that maximises accuracy on labelled images.

    An image is called positive when its margin is > the threshold. The accuracy is constant
    between consecutive distinct margins u_1 < ... < u_m, so one threshold per interval is
    tried: the midpoints (u_i + u_(i+1)) / 2, plus u_1 - 1 (every image positive) and
    u_m + 1 (none positive). Among the thresholds of highest accuracy the one nearest 0 is
    returned (0 is the argmax call of a two-candidate margin), the smaller one if two are
    equally near. ``margins`` e.g. score_female - score_male of held-out images whose
    ``positives`` say which are female.
    """
    m = np.asarray(margins, dtype=np.float64).ravel()
    pos = np.asarray(positives, dtype=bool).ravel()
    if m.shape != pos.shape:
        raise ValueError(f"got {m.size} margins for {pos.size} labels")
    if m.size == 0:
        raise ValueError("calibrated_threshold needs at least one labelled margin")
    if not np.isfinite(m).all():
        raise ValueError("margins must be finite")
    u = np.unique(m)
    candidates = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2.0, [u[-1] + 1.0]])
    correct = ((m[None, :] > candidates[:, None]) == pos[None, :]).sum(axis=1)
    best = candidates[correct == correct.max()]
    return float(min(best, key=lambda c: (abs(c), c)))


def _fit_arrays(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length; got {x.size} and {y.size}")
    if x.size < 3:
        raise ValueError(f"a linear fit with an uncertainty needs at least 3 points; got {x.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite (no NaN or infinity)")
    if np.ptp(x) == 0:
        raise ValueError("x is constant: the slope of y on x is undefined")
    return x, y


def ols(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """(slope, intercept, r^2) of the least-squares line y = a + b x (e.g. Draper & Smith 1998, ch. 1):
    b = S_xy / S_xx, a = mean(y) - b mean(x), r^2 = S_xy^2 / (S_xx S_yy) (0 when y is constant),
    with S_uv = sum_i (u_i - mean(u)) (v_i - mean(v)). A constant x has no slope: (nan, nan, nan)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    sxx, syy, sxy = float(xc @ xc), float(yc @ yc), float(xc @ yc)
    if sxx == 0:
        return math.nan, math.nan, math.nan
    slope = sxy / sxx
    return slope, float(y.mean() - slope * x.mean()), (sxy * sxy / (sxx * syy) if syy > 0 else 0.0)


def percentile_interval(values: Sequence[float], level: float) -> tuple[float, float]:
    """The bootstrap percentile interval (Efron & Tibshirani 1993, ch. 13): the (1 - level) / 2 and
    (1 + level) / 2 quantiles of ``values`` (numpy's linear interpolation between order statistics)."""
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def finite_percentile_interval(values: Sequence[float], level: float) -> tuple[float, float]:
    """``percentile_interval`` of the finite values only (NaN marks a dropped resample); (NaN, NaN)
    when none is finite."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return percentile_interval(values, level) if values.size else (math.nan, math.nan)


def linear_fit_with_bootstrap(x: Sequence[float], y: Sequence[float], n_boot: int = 1000, seed: int = 0,
                              level: float = 0.95) -> dict:
    """Least-squares line y = slope x + intercept with bootstrap intervals.

    The point estimates, r, r^2 and the p-value (t-test of slope = 0, n - 2 degrees of
    freedom) come from ``scipy.stats.linregress``. The intervals are percentile intervals
    of the pairs bootstrap (Efron & Tibshirani 1993, ch. 9.5): n_boot resamples of the n
    (x, y) pairs with replacement drawn by ``numpy.random.default_rng(seed)``; each
    resample's slope and r^2 come from ``ols``; resamples whose x is constant have no slope
    and are dropped (their number is returned as ``n_boot_dropped``).
    Returns dict(slope, intercept, r, r2, p_value, slope_ci, r2_ci, n, n_boot,
    n_boot_dropped, seed, level).
    """
    x, y = _fit_arrays(x, y)
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer; got {n_boot!r}")
    _z_value(level)  # validates level
    fit = _scipy_stats.linregress(x, y)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(int(n_boot), x.size))
    replicates = np.array([ols(x[i], y[i]) for i in idx])
    slopes, r2s = replicates[:, 0], replicates[:, 2]
    keep = np.isfinite(slopes)
    if not keep.any():
        raise ValueError("every bootstrap resample had a constant x; too few distinct x values")
    slope_ci = percentile_interval(slopes[keep], level)
    r2_ci = percentile_interval(r2s[keep], level)
    return {
        "slope": float(fit.slope), "intercept": float(fit.intercept), "r": float(fit.rvalue),
        "r2": float(fit.rvalue ** 2), "p_value": float(fit.pvalue), "slope_ci": slope_ci, "r2_ci": r2_ci,
        "n": int(x.size), "n_boot": int(n_boot), "n_boot_dropped": int((~keep).sum()), "seed": seed,
        "level": level,
    }


def save_figure_atomically(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG beside ``path`` and rename it into place
    (``utils.atomic_write_bytes``: the file gets the mode the umask gives, as any plain write)."""
    import io

    from bias_begets_bias.utils import atomic_write_bytes

    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def pyplot():
    """matplotlib.pyplot with the Agg backend (PNG files, no display)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_regression(x: Sequence[float], y: Sequence[float], labels: Sequence[str] | None, fit: Mapping,
                    path: str | os.PathLike, xlabel: str = "x", ylabel: str = "y", title: str = "") -> Path:
    """Scatter of (x, y) annotated with ``labels``, the fitted line of ``fit`` (from
    ``linear_fit_with_bootstrap``) and R^2 with its bootstrap interval in the legend; PNG."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length; got {x.size} and {y.size}")
    if labels is not None and len(labels) != x.size:
        raise ValueError(f"got {len(labels)} labels for {x.size} points")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    try:
        ax.scatter(x, y, s=18, alpha=0.8, label=f"data (n = {x.size})")
        xs = np.linspace(x.min(), x.max(), 100) if x.size else np.array([0.0, 1.0])
        lo, hi = fit["r2_ci"]
        level = int(round(100 * fit.get("level", 0.95)))
        ax.plot(xs, fit["slope"] * xs + fit["intercept"], color="C3",
                label=(f"y = {fit['slope']:.3g} x {'-' if fit['intercept'] < 0 else '+'} {abs(fit['intercept']):.3g}\n"
                       f"$R^2$ = {fit['r2']:.3f} [{lo:.3f}, {hi:.3f}] ({level}% bootstrap CI)"))
        for xi, yi, text in zip(x, y, labels or []):
            ax.annotate(str(text), (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(loc="best", fontsize=8)
        return save_figure_atomically(fig, path)
    finally:
        plt.close(fig)


def plot_proportions(rows: Iterable[Mapping], path: str | os.PathLike, xlabel: str = "", ylabel: str = "share",
                     title: str = "", reference: float | None = 0.5) -> Path:
    """Bar chart of shares with their confidence intervals as error bars; PNG.

    ``rows``: mappings with keys label, share, low, high (e.g. ``proportion_summary`` plus a
    label). ``reference`` draws a dashed horizontal line (parity at 0.5 by default; None
    for no line).
    """
    rows = list(rows)
    if not rows:
        raise ValueError("plot_proportions needs at least one row")
    missing = [key for key in ("label", "share", "low", "high") if key not in rows[0]]
    if missing:
        raise ValueError(f"each row needs label, share, low and high; missing {missing}")
    share = np.array([float(r["share"]) for r in rows])
    low = np.array([float(r["low"]) for r in rows])
    high = np.array([float(r["high"]) for r in rows])
    if ((low > share + 1e-12) | (high < share - 1e-12)).any():
        raise ValueError("every row needs low <= share <= high")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 2.0), 4.5))
    try:
        positions = np.arange(len(rows))
        ax.bar(positions, share, color="C0", alpha=0.8)
        ax.errorbar(positions, share, yerr=np.vstack([share - low, high - share]), fmt="none", ecolor="black",
                    capsize=4)
        if reference is not None:
            ax.axhline(reference, color="gray", linestyle="--", linewidth=1)
        ax.set_xticks(positions)
        ax.set_xticklabels([str(r["label"]) for r in rows], rotation=30, ha="right")
        ax.set_ylim(0, 1.05 if high.max() <= 1 else high.max() * 1.05)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        return save_figure_atomically(fig, path)
    finally:
        plt.close(fig)
