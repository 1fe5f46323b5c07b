"""Whose bias is it? Split the female share of unseen words into the word's own effect, the
JL draw's, the training draw's and sampling noise, for one arm audited in a crossed design.

Layout: ``shares[w, j, t]`` is word w's female share (successes / n) in the run trained with
JL matrix j and training seed t; every word is audited in every run (words crossed with runs,
runs nested in the arm). The model, for one arm:

    y[w, j, t] = mu + r[j, t] + a[w] + b[w, j] + c[w, t] + e[w, j, t]

r: the run's overall lean (a fixed shift; removed, see ``decompose``); a: the word's own
effect, var s2_word; b: word x JL draw, var s2_word_x_jl; c: word x training draw, var
s2_word_x_train; e: binomial sampling noise plus any word x JL x training interaction.

Pure functions (numpy arrays in, numbers out). Bad arguments raise
``bias_begets_bias.cli.InputError`` naming the argument. Every function needs a
complete array: the closed-form ANOVA estimators below hold for balanced data only
(Searle, Casella & McCulloch 1992, ch. 4), so a word missing from any run must be dropped by
the caller (or the run left out) rather than passed as NaN.

Bootstraps redraw words with replacement, the same word indices in every run (a word's
shares in the six runs travel together), and with ``resample="pigeonhole"`` also the arm's
JL draws and training draws, independently (Owen 2007, "The pigeonhole bootstrap", Ann.
Appl. Stat. 1(2), 386-411). All draws come from ``numpy.random.default_rng(seed)``, so a
result is a function of its arguments.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as _scipy_stats

from bias_begets_bias.cli import InputError
from statistical_auditing.core.stats import finite_percentile_interval

VARIANCE_KEYS = ("word", "word_x_jl", "word_x_train", "interaction", "train_within_jl", "word_x_run", "sampling",
                 "residual")
RESAMPLE_CHOICES = ("words", "pigeonhole")
STATISTICS = ("slope", "r2", "fraction", "word_variance")
# Resamples are evaluated this many at a time: (chunk, words, J, T) float64 arrays stay a few MB.
_CHUNK = 256


# ----------------------------------------------------------------------------- checks


def _shares_array(shares, name: str = "shares", min_words: int = 2) -> np.ndarray:
    y = np.asarray(shares, dtype=np.float64)
    if y.ndim != 3:
        raise InputError(f"{name}: expected a 3-D array words x JL draws x training draws, got shape {y.shape}")
    n_words, n_jl, n_train = y.shape
    if n_words < min_words or n_jl < 2 or n_train < 2:
        raise InputError(f"{name}: expected at least {min_words} words, 2 JL draws and 2 training draws, "
                         f"got shape {y.shape}")
    return _checked_values(y, name)


def _checked_values(y: np.ndarray, name: str) -> np.ndarray:
    bad = int((~np.isfinite(y)).sum())
    if bad:
        raise InputError(f"{name}: {bad} cells are missing or not finite; expected a complete array "
                         "(drop the words that are missing from any run)")
    if (y < 0).any() or (y > 1).any():
        raise InputError(f"{name}: expected shares in [0, 1], got values from {y.min():g} to {y.max():g}")
    return y


def _sample_sizes(n, shape: tuple[int, ...]) -> np.ndarray:
    sizes = np.asarray(n, dtype=np.float64)
    if sizes.shape not in ((), shape):
        raise InputError(f"n: expected a number or an array of shape {shape}, got shape {sizes.shape}")
    sizes = np.broadcast_to(sizes, shape)
    if not np.isfinite(sizes).all() or (sizes != np.round(sizes)).any() or (sizes < 2).any():
        raise InputError("n: expected whole numbers of images >= 2 per cell")
    return sizes


def _check_bootstrap(n_boot: int, level: float, resample: str, min_boot: int = 0) -> None:
    if int(n_boot) != n_boot or n_boot < min_boot:
        raise InputError(f"n_boot: expected a whole number >= {min_boot}, got {n_boot!r}")
    if not 0.0 < level < 1.0:
        raise InputError(f"level: expected a value in (0, 1), got {level!r}")
    if resample not in RESAMPLE_CHOICES:
        raise InputError(f"resample: expected one of {', '.join(RESAMPLE_CHOICES)}, got {resample!r}")


def _predictor(x, n_words: int, name: str = "x") -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.shape != (n_words,):
        raise InputError(f"{name}: expected one value per word ({n_words}), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError(f"{name}: expected finite values")
    if float(np.ptp(x)) == 0.0:
        raise InputError(f"{name}: every word has the same value; a slope needs spread")
    return x


# ----------------------------------------------------------------------------- the ANOVA


def _mean_squares(y: np.ndarray) -> dict[str, np.ndarray]:
    """Mean squares of the words x JL x training layout, one observation per cell, over the
    last three axes of y (leading axes are a batch of resamples).

    Each run's mean over words is removed first (z = y - mean_w y[., j, t]); after that the
    JL, training and run margins are 0, so with m_w, m_wj, m_wt the means of z over the
    omitted axes:

        MS_W   = J T sum_w m_w^2                            / (W - 1)
        MS_WJ  = T   sum_wj (m_wj - m_w)^2                  / ((W - 1)(J - 1))
        MS_WT  = J   sum_wt (m_wt - m_w)^2                  / ((W - 1)(T - 1))
        MS_WJT =     sum_wjt (z - m_wj - m_wt + m_w)^2      / ((W - 1)(J - 1)(T - 1))

    These are the word rows of the three-way ANOVA table (Searle, Casella & McCulloch 1992,
    Variance Components, ch. 4; Montgomery, Design and Analysis of Experiments, the
    three-factor layout with one replicate): a run's shift cancels in every one of them.
    """
    n_words, n_jl, n_train = y.shape[-3:]
    axes = (-3, -2, -1)
    z = y - y.mean(axis=-3, keepdims=True)
    m_w = z.mean(axis=(-2, -1), keepdims=True)
    m_wj = z.mean(axis=-1, keepdims=True)
    m_wt = z.mean(axis=-2, keepdims=True)
    return {
        "word": n_jl * n_train * (m_w ** 2).sum(axis=axes) / (n_words - 1),
        "word_x_jl": n_train * ((m_wj - m_w) ** 2).sum(axis=axes) / ((n_words - 1) * (n_jl - 1)),
        "word_x_train": n_jl * ((m_wt - m_w) ** 2).sum(axis=axes) / ((n_words - 1) * (n_train - 1)),
        "residual": ((z - m_wj - m_wt + m_w) ** 2).sum(axis=axes) / ((n_words - 1) * (n_jl - 1) * (n_train - 1)),
    }


def _components(ms: Mapping[str, np.ndarray], sampling: np.ndarray, n_jl: int, n_train: int) -> dict[str, np.ndarray]:
    """Method-of-moments components from the mean squares (see ``decompose``) and the word
    share of the non-sampling variance (components truncated at 0 for the share only)."""
    var = {
        "word": (ms["word"] - ms["word_x_jl"] - ms["word_x_train"] + ms["residual"]) / (n_jl * n_train),
        "word_x_jl": (ms["word_x_jl"] - ms["residual"]) / n_train,
        "word_x_train": (ms["word_x_train"] - ms["residual"]) / n_jl,
        "interaction": ms["residual"] - sampling,
        "sampling": sampling,
        "residual": ms["residual"],
    }
    # the nested reading: everything particular to one training given its JL matrix (see decompose),
    # and everything particular to a run (its JL matrix and its training), the model's part
    var["train_within_jl"] = var["word_x_train"] + var["interaction"]
    var["word_x_run"] = var["word_x_jl"] + var["train_within_jl"]
    parts = [np.maximum(var[key], 0.0) for key in ("word", "word_x_jl", "word_x_train", "interaction")]
    total = parts[0] + parts[1] + parts[2] + parts[3]
    with np.errstate(invalid="ignore", divide="ignore"):
        var["word_share"] = np.where(total > 0, parts[0] / np.where(total > 0, total, 1.0), np.nan)
    return var


def sampling_variance(shares, n) -> np.ndarray:
    """Per-cell binomial sampling variance of a share p_hat = s / n: p_hat (1 - p_hat) / (n - 1).

    This is the unbiased estimate of the variance p (1 - p) / n of p_hat: E[p_hat (1 - p_hat)]
    = p (1 - p) (n - 1) / n for a binomial count (the sample variance of n Bernoulli draws
    with divisor n - 1; e.g. Cochran 1977, Sampling Techniques, sec. 3.2). ``n`` is a number
    or an array of the shares' shape.
    """
    y = np.asarray(shares, dtype=np.float64)
    sizes = _sample_sizes(n, y.shape)
    return y * (1.0 - y) / (sizes - 1.0)


def decompose(shares, n, n_boot: int = 0, seed: int = 0, level: float = 0.95, resample: str = "words") -> dict:
    """Variance components of one arm's shares y[w, j, t] (words x JL draws x training draws).

    Model: y[w,j,t] = mu + r[j,t] + a[w] + b[w,j] + c[w,t] + e[w,j,t], a, b, c, e independent
    with variances s2_word, s2_word_x_jl, s2_word_x_train, s2_residual. r is the run's overall
    lean, a fixed shift: it is removed (each run's mean over words subtracted, returned as
    ``run_shift``) because a run that draws every word a little more female says something
    about that training or JL draw, not about any word; the estimators below are contrasts
    within runs, so a shift leaves them unchanged.

    With W words, J JL draws, T training draws and the mean squares of ``_mean_squares``,
    the expected mean squares of the crossed layout with one observation per cell are
    (Searle, Casella & McCulloch 1992, Variance Components, ch. 4, balanced data):

        E[MS_WJT] = s2_residual
        E[MS_WT]  = s2_residual + J s2_word_x_train
        E[MS_WJ]  = s2_residual + T s2_word_x_jl
        E[MS_W]   = s2_residual + T s2_word_x_jl + J s2_word_x_train + J T s2_word

    and the ANOVA (method-of-moments) estimates solve them:

        s2_residual     = MS_WJT
        s2_word_x_jl    = (MS_WJ - MS_WJT) / T
        s2_word_x_train = (MS_WT - MS_WJT) / J
        s2_word         = (MS_W - MS_WJ - MS_WT + MS_WJT) / (J T)

    The residual holds binomial sampling noise plus any word x JL x training interaction.
    Because the layout is balanced, each cell has the same weight in MS_WJT, so
    E[MS_WJT] = s2_interaction + mean over cells of p (1 - p) / n even when p differs by cell;
    hence s2_sampling = mean of ``sampling_variance`` and s2_interaction = MS_WJT - s2_sampling.

    Training draws nested in JL draws. A training seed shared by runs with different JL
    matrices starts from the same initialisation, data order and noise, but the network sees
    other conditioning vectors, so nothing guarantees that its effect on a word, c[w, t], is the
    same under both matrices; if it is not, the seed's effect is nested in the JL draw,
    c'[w, j, t], and the crossed c and the interaction are one thing. ``train_within_jl`` =
    s2_word_x_train + s2_interaction estimates its variance either way: it is the nested
    layout's own estimate (MS_T(J) - s2_sampling, with MS_T(J) = (SS_WT + SS_WJT) / ((W - 1)
    J (T - 1)) = (MS_WT + (J - 1) MS_WJT) / J; Searle, Casella & McCulloch 1992, sec. 4.3), and
    under the nested model s2_word and s2_word_x_jl above stay unbiased while s2_word_x_train
    estimates 0. It is the training draw's part to compare with the JL draw's. ``word_x_run`` =
    s2_word_x_jl + s2_train_within_jl is everything particular to a run: the trained model's
    part beside the word's.

    Estimates can be negative (sampling error); ``variance`` keeps the raw values, ``sd``
    is sqrt(max(0, variance)), and ``word_share`` = s2_word+ / (s2_word+ + s2_word_x_jl+ +
    s2_word_x_train+ + s2_interaction+) uses the parts truncated at 0 (NaN when all are 0):
    the word's share of the variance that is not sampling noise.

    With n_boot > 0, ``intervals`` gives percentile intervals (Efron & Tibshirani 1993,
    ch. 13) of every variance, sd and the word share over n_boot resamples: words redrawn
    with replacement, the same indices in every run; ``resample="pigeonhole"`` also redraws
    the JL and training draws (Owen 2007). With two or three draws a redraw often repeats one
    draw, whose copies then agree exactly, which shrinks that factor's spread in the
    resample; so the pigeonhole intervals of the components are biased low for the
    interactions, and the words-only default is the one that matches the model above (its
    b, c and e are independent between words).

    Returns dict(variance, sd, word_share, mean_squares, df, run_shift, arm_mean, n_words,
    n_jl, n_train[, intervals, n_boot, seed, level, resample]).
    """
    y = _shares_array(shares)
    _check_bootstrap(n_boot, level, resample)
    v = sampling_variance(y, n)
    n_words, n_jl, n_train = y.shape
    ms = _mean_squares(y)
    comp = _components(ms, v.mean(), n_jl, n_train)
    variance = {key: float(comp[key]) for key in VARIANCE_KEYS}
    run_means = y.mean(axis=0)
    result = {
        "variance": variance,
        "sd": {key: math.sqrt(max(value, 0.0)) for key, value in variance.items()},
        "word_share": float(comp["word_share"]),
        "mean_squares": {key: float(value) for key, value in ms.items()},
        "df": {"word": n_words - 1, "word_x_jl": (n_words - 1) * (n_jl - 1),
               "word_x_train": (n_words - 1) * (n_train - 1),
               "residual": (n_words - 1) * (n_jl - 1) * (n_train - 1)},
        "run_shift": run_means - run_means.mean(), "arm_mean": float(y.mean()),
        "n_words": n_words, "n_jl": n_jl, "n_train": n_train,
    }
    if n_boot:
        rng = np.random.default_rng(seed)
        draws = _draw_indices(y.shape, int(n_boot), resample, rng, _draw_words(n_words, int(n_boot), rng))
        keys = VARIANCE_KEYS + ("word_share",)
        reps = {key: np.empty(int(n_boot)) for key in keys}
        for lo in range(0, int(n_boot), _CHUNK):
            part = tuple(d[lo:lo + _CHUNK] for d in draws)
            boot = _components(_mean_squares(_take(y, part)), _take(v, part).mean(axis=(-3, -2, -1)), n_jl, n_train)
            for key in keys:
                reps[key][lo:lo + _CHUNK] = boot[key]
        intervals = {key: finite_percentile_interval(reps[key], level) for key in keys}
        intervals.update({f"sd_{key}": tuple(math.sqrt(max(bound, 0.0)) for bound in intervals[key])
                          for key in VARIANCE_KEYS})
        result.update(intervals=intervals, n_boot=int(n_boot), seed=seed, level=level, resample=resample)
    return result


def decompose_runs(shares, n, n_boot: int = 0, seed: int = 0, level: float = 0.95) -> dict:
    """Variance components of one arm's shares y[w, r] (words x runs) when each run has its own
    JL draw and training draw (one training seed per JL seed, as in results/experiment/): the
    word's own effect against everything particular to a run.

    Model: y[w,r] = mu + s[r] + a[w] + d[w,r] + e[w,r]; s: the run's overall lean (removed, as
    in ``decompose``); a: the word's own effect, var s2_word; d: word x run, var s2_word_x_run
    (word x JL + word x training + their interaction, which this layout cannot tell apart);
    e: binomial sampling noise. With z = y - mean_w y[., r], m_w = mean_r z[w, .] and R runs,
    the two-way layout with one observation per cell (Searle, Casella & McCulloch 1992, ch. 4)
    gives

        MS_W  = R sum_w m_w^2 / (W - 1),                     E[MS_W]  = s2_e + s2_word_x_run + R s2_word
        MS_WR = sum_wr (z - m_w)^2 / ((W - 1)(R - 1)),       E[MS_WR] = s2_e + s2_word_x_run

    so s2_word = (MS_W - MS_WR) / R and s2_word_x_run = MS_WR - s2_sampling, with s2_sampling
    the mean of ``sampling_variance`` (balanced layout, as in ``decompose``). ``word_share`` =
    s2_word+ / (s2_word+ + s2_word_x_run+). With n_boot > 0, percentile intervals over
    resamples that redraw the words, the same indices in every run (words crossed with runs).

    Returns dict(variance, sd, word_share, mean_squares, n_words, n_runs, correlations (Pearson r
    of the shares of every pair of runs)[, intervals, n_boot, seed, level]).
    """
    y = np.asarray(shares, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] < 3 or y.shape[1] < 2:
        raise InputError(f"shares: expected a 2-D array words x runs with at least 3 words and 2 runs, "
                         f"got shape {y.shape}")
    _checked_values(y, "shares")
    _check_bootstrap(n_boot, level, "words")
    v = sampling_variance(y, n)
    n_words, n_runs = y.shape

    def components(batch: np.ndarray, sampling: np.ndarray) -> dict[str, np.ndarray]:
        z = batch - batch.mean(axis=-2, keepdims=True)
        m_w = z.mean(axis=-1, keepdims=True)
        ms_w = n_runs * (m_w ** 2).sum(axis=(-2, -1)) / (n_words - 1)
        ms_wr = ((z - m_w) ** 2).sum(axis=(-2, -1)) / ((n_words - 1) * (n_runs - 1))
        var = {"word": (ms_w - ms_wr) / n_runs, "word_x_run": ms_wr - sampling, "sampling": sampling,
               "ms_word": ms_w, "ms_word_x_run": ms_wr}
        parts = np.maximum(var["word"], 0.0), np.maximum(var["word_x_run"], 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            var["word_share"] = np.where(parts[0] + parts[1] > 0, parts[0] / (parts[0] + parts[1]), np.nan)
        return var

    keys = ("word", "word_x_run", "sampling")
    comp = components(y, v.mean())
    variance = {key: float(comp[key]) for key in keys}
    result = {"variance": variance, "sd": {key: math.sqrt(max(value, 0.0)) for key, value in variance.items()},
              "word_share": float(comp["word_share"]),
              "mean_squares": {"word": float(comp["ms_word"]), "word_x_run": float(comp["ms_word_x_run"])},
              "n_words": n_words, "n_runs": n_runs,
              "correlations": [float(np.corrcoef(y[:, a], y[:, b])[0, 1])
                               for a in range(n_runs) for b in range(a + 1, n_runs)]}
    if n_boot:
        words = _draw_words(n_words, int(n_boot), np.random.default_rng(seed))
        boot = components(y[words], v[words].mean(axis=(-2, -1)))
        intervals = {key: finite_percentile_interval(boot[key], level) for key in keys + ("word_share",)}
        intervals.update({f"sd_{key}": tuple(math.sqrt(max(bound, 0.0)) for bound in intervals[key]) for key in keys})
        result.update(intervals=intervals, n_boot=int(n_boot), seed=seed, level=level)
    return result


# ----------------------------------------------------------------------------- resampling


def _draw_words(n_words: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, n_words, size=(n_boot, n_words))


def _draw_indices(shape: tuple[int, int, int], n_boot: int, resample: str, rng: np.random.Generator,
                  words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(words, JL, training) index arrays of n_boot resamples: the given word draws (shared
    by every run, and by both arms in ``paired_difference``), and JL and training draws
    redrawn with replacement under "pigeonhole" (Owen 2007), kept as they are otherwise."""
    _, n_jl, n_train = shape
    if resample == "pigeonhole":
        jl = rng.integers(0, n_jl, size=(n_boot, n_jl))
        train = rng.integers(0, n_train, size=(n_boot, n_train))
    else:
        jl = np.broadcast_to(np.arange(n_jl), (n_boot, n_jl))
        train = np.broadcast_to(np.arange(n_train), (n_boot, n_train))
    return words, jl, train


def _take(y: np.ndarray, draws: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """y[words[b], jl[b], train[b]] for every resample b: shape (B, W, J, T)."""
    words, jl, train = draws
    return y[words[:, :, None, None], jl[:, None, :, None], train[:, None, None, :]]


# ----------------------------------------------------------------------------- word effects


def word_effects(shares, n) -> dict:
    """Each word's estimated effect, its standard error and its shrunken (BLUP) value.

    effect[w] = mean over runs of (y[w, j, t] - mean over words of y[., j, t]): the word's mean
    share minus the arm's, after each run's lean is removed. Given a[w], its variance is

        se[w]^2 = s2_word_x_jl / J + s2_word_x_train / T + (s2_interaction + v[w]) / (J T)

    with the components of ``decompose`` truncated at 0 and v[w] the word's own mean binomial
    variance (``sampling_variance`` averaged over its runs), so a word near 0 or 1 gets a
    smaller error. This is the crossed-design form of "s2_rest / m" (m = J T runs): the JL
    and training parts average over J and T draws only. (The run-mean removal adds O(1/W),
    ignored.)

    shrunk[w] = shrinkage[w] * effect[w], shrinkage[w] = s2_word / (s2_word + se[w]^2): the
    best linear unbiased predictor of a[w] when the variances are known (Robinson 1991,
    "That BLUP is a good thing", Statist. Sci. 6(1), 15-51, sec. 2; Searle, Casella &
    McCulloch 1992, ch. 7), with prediction error sd shrunk_se[w] = sqrt(shrinkage[w] se[w]^2).
    Regress ``effect``, not ``shrunk``, on a predictor: the noise in effect is independent of
    the predictor, so its slope is unbiased for the slope of a, whereas shrinking toward the
    arm's mean (not toward the line) multiplies the slope by the shrinkage.

    Returns dict(effect, se, shrinkage, shrunk, shrunk_se: arrays over words;
    s2_word, s2_word_truncated).
    """
    y = _shares_array(shares)
    parts = decompose(y, n)["variance"]
    n_words, n_jl, n_train = y.shape
    word_sampling = sampling_variance(y, n).mean(axis=(1, 2))
    plus = {key: max(value, 0.0) for key, value in parts.items()}
    se2 = (plus["word_x_jl"] / n_jl + plus["word_x_train"] / n_train
           + (plus["interaction"] + word_sampling) / (n_jl * n_train))
    denominator = plus["word"] + se2
    shrinkage = np.divide(plus["word"], denominator, out=np.zeros(n_words), where=denominator > 0)
    effect = (y - y.mean(axis=0, keepdims=True)).mean(axis=(1, 2))
    return {"effect": effect, "se": np.sqrt(se2), "shrinkage": shrinkage, "shrunk": shrinkage * effect,
            "shrunk_se": np.sqrt(shrinkage * se2), "s2_word": parts["word"], "s2_word_truncated": plus["word"]}


# ----------------------------------------------------------------------------- predictors


def _on_predictor(y: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
    """Slope, R^2, word variance and fraction of it explained by x, batched over leading axes.

    e = the word effects of ``word_effects`` (mean 0 over words); with xc = x - mean(x):
        slope = S_xe / S_xx,  R^2 = S_xe^2 / (S_xx S_ee)  (ordinary least squares)
    fraction = (s2_word - s2_word|x) / s2_word, where s2_word|x is s2_word computed from the
    words' residuals about the line: MS_W|x = J T (S_ee - S_xe^2 / S_xx) / (W - 2) replaces
    MS_W (the line uses one more degree of freedom), so fraction = (MS_W - MS_W|x) / (J T s2_word).
    This is the proportion reduction in the word-level variance (Raudenbush & Bryk 2002,
    Hierarchical Linear Models, 2nd ed., ch. 4): unlike R^2, it is not diluted by the JL,
    training and sampling noise left in each word's mean. NaN where x has no spread or
    s2_word <= 0.
    """
    n_words, n_jl, n_train = y.shape[-3:]
    e = (y - y.mean(axis=-3, keepdims=True)).mean(axis=(-2, -1))
    xc = x - x.mean(axis=-1, keepdims=True)
    sxx, sxe, see = (xc * xc).sum(-1), (xc * e).sum(-1), (e * e).sum(-1)
    ms = _mean_squares(y)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(sxx > 0, sxe / sxx, np.nan)
        r2 = np.where((sxx > 0) & (see > 0), sxe * sxe / (sxx * see), np.nan)
        ms_given_x = n_jl * n_train * (see - slope * sxe) / (n_words - 2)
        word_variance = (ms["word"] - ms["word_x_jl"] - ms["word_x_train"] + ms["residual"]) / (n_jl * n_train)
        fraction = np.where(word_variance > 0, (ms["word"] - ms_given_x) / (n_jl * n_train * word_variance), np.nan)
    return {"slope": slope, "r2": r2, "fraction": fraction, "word_variance": word_variance}


def slope_on_predictor(shares, x, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                       resample: str = "pigeonhole") -> dict:
    """Slope and R^2 of the word effects on a word-level predictor x (e.g. word2vec's cosine
    gap), and ``fraction_of_word_variance_explained``: how much of the word's own variance
    s2_word follows x (formulas in ``_on_predictor``). The word effects are those of
    ``word_effects`` (not shrunk), computed from the per-run array because the bootstrap must
    redraw words jointly across runs. ``intercept`` is on the share scale: the arm's mean
    share minus slope * mean(x).

    Intervals: percentile, over n_boot resamples that redraw words (the same indices in every
    run, x travelling with its word) and, for slope and R^2 with the default "pigeonhole",
    the arm's JL and training draws too (Owen 2007: slope and R^2 are smooth functions of
    means, the setting of that paper; a JL or training draw that tilts every word's share
    along x is then part of the interval); "words" redraws words only. The fraction rests on
    variance components, whose pigeonhole replicates are biased low for the interactions
    when a factor has 2-3 draws (see ``decompose``), so ``fraction_ci`` always comes from
    words-only resamples (the same word draws). Resamples with a constant x or a word
    variance <= 0 give no value for the statistics that need them and are counted in
    ``n_boot_dropped``.

    Returns dict(slope, intercept, r2, fraction_of_word_variance_explained, word_variance,
    slope_ci, r2_ci, fraction_ci, n_words, n_boot, n_boot_dropped, seed, level, resample).
    """
    y = _shares_array(shares, min_words=3)
    x = _predictor(x, y.shape[0])
    _check_bootstrap(n_boot, level, resample, min_boot=1)
    fit = _on_predictor(y, x)
    rng = np.random.default_rng(seed)
    words = _draw_words(y.shape[0], int(n_boot), rng)
    reps = _bootstrap_statistics(y, x, _draw_indices(y.shape, int(n_boot), resample, rng, words))
    if resample != "words":
        by_words = _bootstrap_statistics(y, x, _draw_indices(y.shape, int(n_boot), "words", rng, words))
        reps.update(fraction=by_words["fraction"], word_variance=by_words["word_variance"])
    return {
        "slope": float(fit["slope"]), "intercept": float(y.mean() - fit["slope"] * x.mean()),
        "r2": float(fit["r2"]), "fraction_of_word_variance_explained": float(fit["fraction"]),
        "word_variance": float(fit["word_variance"]),
        "slope_ci": finite_percentile_interval(reps["slope"], level), "r2_ci": finite_percentile_interval(reps["r2"], level),
        "fraction_ci": finite_percentile_interval(reps["fraction"], level),
        "n_words": y.shape[0], "n_boot": int(n_boot),
        "n_boot_dropped": {key: int((~np.isfinite(value)).sum()) for key, value in reps.items()},
        "seed": seed, "level": level, "resample": resample,
    }


def _bootstrap_statistics(y: np.ndarray, x: np.ndarray | None,
                          draws: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    n_boot = draws[0].shape[0]
    reps = {key: np.empty(n_boot) for key in STATISTICS}
    for lo in range(0, n_boot, _CHUNK):
        part = tuple(d[lo:lo + _CHUNK] for d in draws)
        # a statistic that needs no predictor gets a dummy one; only its word_variance is read
        x_part = x[part[0]] if x is not None else part[0].astype(np.float64)
        values = _on_predictor(_take(y, part), x_part)
        for key in STATISTICS:
            reps[key][lo:lo + _CHUNK] = values[key]
    return reps


def paired_difference(shares_a, x_a, shares_b=None, x_b=None, statistic: str = "slope", n_boot: int = 2000,
                      seed: int = 0, level: float = 0.95, resample: str = "pigeonhole") -> dict:
    """Difference A - B of one statistic between two analyses that share their words (the same
    words in the same order), with an interval paired over words.

    statistic: "slope", "r2", "fraction" (fraction of the word variance explained), as in
    ``slope_on_predictor``, on predictor x_a for A and x_b for B; or "word_variance" (s2_word
    of ``decompose``; x_a and x_b must be None).
    - Two arms: shares_a and shares_b are the two arms' arrays (e.g. slope of w2v minus slope
      of debiased on word2vec's gap: x_b = x_a).
    - One arm, two predictors: shares_b=None; B is A's runs (e.g. R^2 on the after-JL gap
      minus R^2 on word2vec's gap).

    Each resample draws one set of word indices and applies it to both A and B, so the words'
    own variation, common to both, largely cancels in the difference; with "pigeonhole" each
    arm's JL and training draws are redrawn independently (the arms' runs are different
    models), and with shares_b=None B reuses A's run draws. "fraction" and "word_variance"
    rest on variance components and are always resampled over words only (see
    ``slope_on_predictor``); ``resample`` in the result says which was used. Percentile
    interval over n_boot resamples (Owen 2007; Efron & Tibshirani 1993, ch. 13).

    Returns dict(difference, a, b, ci, n_boot, n_boot_dropped, statistic, seed, level, resample).
    """
    if statistic not in STATISTICS:
        raise InputError(f"statistic: expected one of {', '.join(STATISTICS)}, got {statistic!r}")
    _check_bootstrap(n_boot, level, resample, min_boot=1)
    y_a = _shares_array(shares_a, "shares_a", min_words=3)
    y_b = y_a if shares_b is None else _shares_array(shares_b, "shares_b", min_words=3)
    if y_b.shape[0] != y_a.shape[0]:
        raise InputError(f"shares_b: expected the same {y_a.shape[0]} words as shares_a, got {y_b.shape[0]}")
    predictors = []
    for name, x in (("x_a", x_a), ("x_b", x_b)):
        if statistic == "word_variance":
            if x is not None:
                raise InputError(f"{name}: word_variance uses no predictor; expected None")
            predictors.append(None)
        else:
            predictors.append(_predictor(x, y_a.shape[0], name))
    if statistic in ("fraction", "word_variance"):
        resample = "words"
    rng = np.random.default_rng(seed)
    words = _draw_words(y_a.shape[0], int(n_boot), rng)
    draws_a = _draw_indices(y_a.shape, int(n_boot), resample, rng, words)
    draws_b = draws_a if shares_b is None else _draw_indices(y_b.shape, int(n_boot), resample, rng, words)
    point, reps = [], []
    for y, x, draws in ((y_a, predictors[0], draws_a), (y_b, predictors[1], draws_b)):
        point.append(float(_on_predictor(y, x if x is not None else np.arange(y.shape[0], dtype=float))[statistic]))
        reps.append(_bootstrap_statistics(y, x, draws)[statistic])
    differences = reps[0] - reps[1]
    return {"difference": point[0] - point[1], "a": point[0], "b": point[1],
            "ci": finite_percentile_interval(differences, level), "n_boot": int(n_boot),
            "n_boot_dropped": int((~np.isfinite(differences)).sum()), "statistic": statistic, "seed": seed,
            "level": level, "resample": resample}


COMPONENT_KEYS = ("word", "word_x_jl", "word_x_train", "train_within_jl")
_NEEDS_SAMPLING = ("train_within_jl",)  # components that subtract the binomial sampling variance


def component_difference(shares_a, key_a: str, shares_b=None, key_b: str | None = None, n_boot: int = 2000,
                         seed: int = 0, level: float = 0.95, n=None, n_b=None) -> dict:
    """Difference A - B of two variance components (``decompose``'s method-of-moments estimates,
    variances, not sd), with a percentile interval from resamples that redraw words jointly.

    - One arm, two components: shares_b=None, e.g. key_a="word_x_jl", key_b="word_x_train":
      does the JL draw move a word more than the training draw? (E[MS_WJ] - E[MS_WT] =
      T s2_word_x_jl - J s2_word_x_train, so the difference is a contrast of mean squares.)
    - Two arms sharing their words (same words, same order), one component each: key_b
      defaults to key_a, e.g. word_x_jl of the projected arm minus that of the debiased arm.
      Each resample applies one set of word indices to both arms, so the words' own variation,
      common to both, largely cancels.
    - ``train_within_jl`` (the training draw nested in the JL draw, see ``decompose``) subtracts
      the binomial sampling variance, so it needs ``n`` (images per cell of A: a number or an
      array of its shape; ``n_b`` for B, default ``n``); the other components need none.

    Words only are redrawn (the JL and training draws stay): with 2-3 draws a redrawn factor
    repeats a draw and biases the interaction components low (see ``decompose``).

    Returns dict(difference, a, b, ci, key_a, key_b, n_boot, seed, level).
    """
    key_b = key_a if key_b is None else key_b
    for name, key in (("key_a", key_a), ("key_b", key_b)):
        if key not in COMPONENT_KEYS:
            raise InputError(f"{name}: expected one of {', '.join(COMPONENT_KEYS)}, got {key!r}")
    if shares_b is None and key_a == key_b:
        raise InputError("key_b: with one arm, expected a component other than key_a")
    if n is None and {key_a, key_b} & set(_NEEDS_SAMPLING):
        raise InputError(f"n: {' and '.join(sorted({key_a, key_b} & set(_NEEDS_SAMPLING)))} subtracts the sampling "
                         "variance; expected the number of images per cell")
    _check_bootstrap(n_boot, level, "words", min_boot=1)
    y_a = _shares_array(shares_a, "shares_a")
    y_b = y_a if shares_b is None else _shares_array(shares_b, "shares_b")
    if y_b.shape[0] != y_a.shape[0]:
        raise InputError(f"shares_b: expected the same {y_a.shape[0]} words as shares_a, got {y_b.shape[0]}")
    rng = np.random.default_rng(seed)
    words = _draw_words(y_a.shape[0], int(n_boot), rng)
    point, reps = [], []
    for y, key, sizes in ((y_a, key_a, n), (y_b, key_b, n if n_b is None else n_b)):
        _, n_jl, n_train = y.shape
        v = sampling_variance(y, sizes) if sizes is not None else np.zeros(y.shape)
        point.append(float(_components(_mean_squares(y), v.mean(), n_jl, n_train)[key]))
        draws = _draw_indices(y.shape, int(n_boot), "words", rng, words)
        values = np.empty(int(n_boot))
        for lo in range(0, int(n_boot), _CHUNK):
            part = tuple(d[lo:lo + _CHUNK] for d in draws)
            values[lo:lo + _CHUNK] = _components(_mean_squares(_take(y, part)), _take(v, part).mean(axis=(-3, -2, -1)),
                                                 n_jl, n_train)[key]
        reps.append(values)
    return {"difference": point[0] - point[1], "a": point[0], "b": point[1],
            "ci": finite_percentile_interval(reps[0] - reps[1], level), "key_a": key_a, "key_b": key_b,
            "n_boot": int(n_boot), "seed": seed, "level": level}


# ----------------------------------------------------------------------------- checks beside the bootstrap


def per_run_t_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Student t interval of the mean of a per-run statistic (e.g. each run's slope), the check
    beside the bootstrap when an arm has only 3-6 runs:

        mean +- t_{(1 + level) / 2, k - 1} * s / sqrt(k),   s = sample sd (ddof 1) of the k values

    (Student 1908; any introductory text, e.g. Casella & Berger 2002, sec. 9.2). It treats
    the runs as independent draws, so with JL matrices shared by two runs it is optimistic.
    Returns dict(mean, sd, se, ci, k, df, level).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size < 2:
        raise InputError(f"values: expected a 1-D list of at least 2 per-run values, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise InputError("values: expected finite per-run values")
    if not 0.0 < level < 1.0:
        raise InputError(f"level: expected a value in (0, 1), got {level!r}")
    k = v.size
    sd = float(v.std(ddof=1))
    se = sd / math.sqrt(k)
    half = float(_scipy_stats.t.ppf(0.5 + level / 2.0, k - 1)) * se
    mean = float(v.mean())
    return {"mean": mean, "sd": sd, "se": se, "ci": (mean - half, mean + half), "k": k, "df": k - 1, "level": level}


def repeated_cv_r2(x, y, folds: int = 2, repeats: int = 200, seed: int = 0, level: float = 0.95,
                   groups=None) -> dict:
    """Held-out R^2 of a least-squares line (or plane, for 2-D x) by repeated K-fold
    cross-validation (Hastie, Tibshirani & Friedman 2009, The Elements of Statistical
    Learning, 2nd ed., sec. 7.10).

    Each repeat splits the points at random into ``folds`` groups of near-equal size; each
    group is predicted by the least-squares fit (with intercept) to the others, and

        R^2_cv = 1 - sum_i (y_i - yhat_i)^2 / sum_i (y_i - ybar_(-i))^2

    where ybar_(-i) is the mean of the training groups that predicted point i: 1 is perfect,
    0 is no better than the training mean, below 0 is worse. ``r2`` is the mean over repeats;
    on the same splits RMSE = sqrt(mean_i (y_i - yhat_i)^2) and MAE = mean_i |y_i - yhat_i|.

    ``groups`` (one label per point, e.g. the word of each run x word point) keeps every point
    of a label in the same fold, so that a word is never predicted from its own shares in other
    runs (grouped K-fold; Hastie et al. 2009, sec. 7.10.2 on what the held-out set must exclude).
    The labels are then split as points are without it (same draws: ``groups=None`` is one
    label per point).

    ``ci`` is the percentile range of the per-repeat values: it shows how much the answer
    depends on the random split, and nothing else. It is NOT a confidence interval for the
    predictive R^2: every repeat uses the same words and runs, so it leaves out the variation
    from drawing other words, JL matrices or trainings, and repeats overlap so heavily that no
    unbiased estimate of that variance exists from them (Bengio & Grandvalet 2004, "No
    unbiased estimator of the variance of K-fold cross-validation", JMLR 5, 1089-1105).
    With folds equal to the number of points it is leave-one-out and every repeat agrees.

    Returns dict(r2, ci, r2_by_repeat, rmse_by_repeat, mae_by_repeat, folds, repeats, seed, level,
    n_units (points, or labels with ``groups``)).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if y.ndim != 1 or x.ndim != 2 or x.shape[0] != y.size:
        raise InputError(f"x, y: expected one row of x per value of y, got shapes {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InputError("x, y: expected finite values")
    n_points, n_predictors = x.shape
    if groups is None:
        unit = np.arange(n_points)
    else:
        labels = np.asarray(groups)
        if labels.shape != (n_points,):
            raise InputError(f"groups: expected one label per point ({n_points}), got shape {labels.shape}")
        unit = np.unique(labels, return_inverse=True)[1].reshape(-1)
    n_units = int(unit.max()) + 1 if n_points else 0
    what = "points" if groups is None else "groups"
    if int(folds) != folds or folds < 2 or folds > n_units:
        raise InputError(f"folds: expected a whole number in [2, {n_units}] ({what}), got {folds!r}")
    # The fewest points a fit can get: the units outside the largest fold, each with the fewest points.
    fewest_train = (n_units - math.ceil(n_units / folds)) * int(np.bincount(unit).min())
    if fewest_train < n_predictors + 1:
        raise InputError(f"folds: {folds} folds of {n_units} {what} leave too few to fit {n_predictors + 1} coefficients")
    if int(repeats) != repeats or repeats < 1:
        raise InputError(f"repeats: expected a whole number >= 1, got {repeats!r}")
    if not 0.0 < level < 1.0:
        raise InputError(f"level: expected a value in (0, 1), got {level!r}")
    design = np.column_stack([np.ones(n_points), x])
    rng = np.random.default_rng(seed)
    values, rmse, mae = (np.empty(int(repeats)) for _ in range(3))
    for r in range(int(repeats)):
        unit_fold = np.empty(n_units, dtype=int)
        unit_fold[rng.permutation(n_units)] = np.arange(n_units) % folds
        fold = unit_fold[unit]
        errors, baseline = np.empty(n_points), np.empty(n_points)
        for f in range(int(folds)):
            test, train = fold == f, fold != f
            coef = np.linalg.lstsq(design[train], y[train], rcond=None)[0]
            errors[test], baseline[test] = y[test] - design[test] @ coef, y[test] - y[train].mean()
        sst = float(baseline @ baseline)
        values[r] = 1.0 - float(errors @ errors) / sst if sst > 0 else math.nan
        rmse[r], mae[r] = math.sqrt(float(np.mean(errors ** 2))), float(np.mean(np.abs(errors)))
    return {"r2": float(np.nanmean(values)) if np.isfinite(values).any() else math.nan,
            "ci": finite_percentile_interval(values, level), "r2_by_repeat": values, "rmse_by_repeat": rmse,
            "mae_by_repeat": mae, "folds": int(folds), "repeats": int(repeats), "seed": seed, "level": level,
            "n_units": n_units}


# ----------------------------------------------------------------------------- neighbours


def female_side_from_direction(vectors: Mapping[str, np.ndarray], female_direction) -> dict[str, bool]:
    """Which side of word2vec's gender direction each word lies on: True when
    v . d > 0, with d pointing from the male to the female side (e.g. v_she - v_he; Gonen &
    Goldberg 2019 use the projection on he - she, whose negative side this is). Pass the
    ORIGINAL word2vec vectors: the label is the bias the word came with. A projection of
    exactly 0 counts as not female."""
    direction = np.asarray(female_direction, dtype=np.float64)
    out = {}
    for word, vector in vectors.items():
        v = np.asarray(vector, dtype=np.float64)
        if v.shape != direction.shape:
            raise InputError(f"vectors[{word!r}]: expected shape {direction.shape} like female_direction, got {v.shape}")
        out[word] = bool(float(v @ direction) > 0.0)
    return out


def bias_by_neighbours(vectors: Mapping[str, np.ndarray], words: Sequence[str], female_side: Mapping[str, bool],
                       k: int = 100) -> dict[str, float]:
    """Gonen & Goldberg (2019), "Lipstick on a Pig" (NAACL-HLT), sec. 4: the share of a word's
    k nearest neighbours that word2vec puts on the female side.

    Neighbours are the k vocabulary words with the largest cosine similarity
    u . v / (|u| |v|) to the word, the word itself left out, in ``vectors`` (the space the arm
    gives the model: debiased, projected, ...). ``vectors``' keys are the vocabulary; ties
    are broken by its order. ``female_side`` labels every vocabulary word by the ORIGINAL
    word2vec (see ``female_side_from_direction``). A debiasing that only hides the bias leaves
    this share where it was: the neighbours still cluster by their original gender.

    Returns {word: share of its k neighbours with female_side True}.
    """
    vocabulary = list(vectors)
    if int(k) != k or not 1 <= k <= len(vocabulary) - 1:
        raise InputError(f"k: expected a whole number in [1, {len(vocabulary) - 1}] (vocabulary size - 1), got {k!r}")
    missing = [w for w in vocabulary if w not in female_side]
    if missing:
        raise InputError(f"female_side: expected a label for every vocabulary word; missing {missing[:5]}")
    rows = [np.asarray(vectors[w], dtype=np.float64) for w in vocabulary]
    if len({row.shape for row in rows}) != 1 or rows[0].ndim != 1:
        raise InputError("vectors: expected 1-D vectors of one common length")
    matrix = np.stack(rows)
    norms = np.linalg.norm(matrix, axis=1)
    if not (np.isfinite(matrix).all() and (norms > 0).all()):
        raise InputError("vectors: expected finite, non-zero vectors (a cosine needs a length)")
    unit = matrix / norms[:, None]
    female = np.array([bool(female_side[w]) for w in vocabulary])
    index = {w: i for i, w in enumerate(vocabulary)}
    out = {}
    for word in words:
        if word not in index:
            raise InputError(f"words: {word!r} is not in the vocabulary (the keys of vectors)")
        cosine = unit @ unit[index[word]]
        cosine[index[word]] = -np.inf
        nearest = np.argsort(-cosine, kind="stable")[:int(k)]
        out[word] = float(female[nearest].mean())
    return out
