import math

import numpy as np

import pytest

from statistical_auditing.core.stats import (binary_auc, calibrated_threshold, linear_fit_with_bootstrap,
                                        plot_proportions, plot_regression, proportion_summary, wilson_interval)

Z95 = 1.959963984540054
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_wilson_zero_and_all_successes_by_hand():
    # 0 of n: [0, z^2 / (n + z^2)]; for n = 10 that is 3.8415 / 13.8415 = 0.27753.
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(Z95 ** 2 / (10 + Z95 ** 2), abs=1e-12)
    assert high == pytest.approx(0.27753, abs=1e-5)
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(1 - 0.27753, abs=1e-5)


def test_wilson_two_of_four_by_hand():
    # p = 1/2: centre 1/2; half = z / (1 + z^2/4) * sqrt(1/16 + z^2/64) = 0.34997.
    low, high = wilson_interval(2, 4)
    assert low == pytest.approx(0.5 - 0.34997, abs=1e-5)
    assert high == pytest.approx(0.5 + 0.34997, abs=1e-5)


def test_wilson_symmetry_and_level():
    low, high = wilson_interval(3, 17)
    low_c, high_c = wilson_interval(14, 17)
    assert low == pytest.approx(1 - high_c) and high == pytest.approx(1 - low_c)
    narrow = wilson_interval(3, 17, level=0.5)
    assert low < narrow[0] < 3 / 17 < narrow[1] < high


def test_wilson_rejects_bad_counts():
    with pytest.raises(ValueError, match="n = 0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match="level"):
        wilson_interval(1, 4, level=1.0)


def test_proportion_summary():
    summary = proportion_summary(2, 4)
    assert summary["share"] == 0.5 and summary["n"] == 4 and summary["successes"] == 2
    assert (summary["low"], summary["high"]) == wilson_interval(2, 4)


def test_linear_fit_by_hand():
    # x = 0..3, y = (0, 1, 1, 2): Sxy = 3, Sxx = 5, Syy = 2 -> slope 0.6, intercept
    # 1 - 0.6 * 1.5 = 0.1, r^2 = 9 / 10.
    fit = linear_fit_with_bootstrap([0, 1, 2, 3], [0, 1, 1, 2], n_boot=500, seed=1)
    assert fit["slope"] == pytest.approx(0.6) and fit["intercept"] == pytest.approx(0.1)
    assert fit["r2"] == pytest.approx(0.9) and fit["r"] == pytest.approx(math.sqrt(0.9))
    assert fit["n"] == 4 and 0 < fit["p_value"] < 1


def test_bootstrap_intervals_of_a_hand_worked_case():
    """x = 0..3, y = (0, 1, 1, 2): y never falls as x grows, so every resample's slope lies in [0, 1]
    (an OLS slope is a weighted mean of pairwise slopes, here all in [0, 1]). Of the 4^4 = 256
    equally likely resamples, 4 have a constant x (dropped: 1/64), 14 use only the two points
    with y = 1 (slope 0, r^2 0 by convention: 5.5% > 2.5%), 28 only (0,0),(1,1) or (2,1),(3,2)
    (slope 1: 10.9%), and 70 exactly two points of different y (r^2 = 1: 27%). So the exact 95%
    percentile intervals are slope [0, 1] and r^2 [0, 1], and about n_boot / 64 resamples drop."""
    fit = linear_fit_with_bootstrap([0, 1, 2, 3], [0, 1, 1, 2], n_boot=20000, seed=3)
    assert fit["slope_ci"] == pytest.approx((0.0, 1.0), abs=1e-12)
    assert fit["r2_ci"] == pytest.approx((0.0, 1.0), abs=1e-12)
    expected, sd = 20000 / 64, math.sqrt(20000 * (1 / 64) * (63 / 64))  # binomial: 312.5 +- 17.5
    assert abs(fit["n_boot_dropped"] - expected) < 5 * sd


def test_bootstrap_intervals_agree_with_scipy_percentile_bootstrap():
    """scipy.stats.bootstrap (paired resampling of the (x, y) pairs, percentile method, its own
    random draws) on the same data: both 100,000-resample intervals agree to 4% of their width
    (the Monte-Carlo spread measured over six seed pairs was at most 1.1%)."""
    from scipy import stats

    def centred(x, y, axis):
        return x - x.mean(axis=axis, keepdims=True), y - y.mean(axis=axis, keepdims=True)

    def slope(x, y, axis=-1):
        xc, yc = centred(x, y, axis)
        return (xc * yc).sum(axis) / (xc * xc).sum(axis)

    def r2(x, y, axis=-1):
        xc, yc = centred(x, y, axis)
        return (xc * yc).sum(axis) ** 2 / ((xc * xc).sum(axis) * (yc * yc).sum(axis))

    x = np.array([0.1, 0.5, 0.9, 1.3, 2.0, 2.2, 3.1, 3.3])
    y = np.array([0.0, 0.7, 0.4, 1.9, 1.5, 2.8, 2.0, 3.9])
    fit = linear_fit_with_bootstrap(x, y, n_boot=100_000, seed=0)
    for key, statistic in (("slope_ci", slope), ("r2_ci", r2)):
        reference = stats.bootstrap((x, y), statistic, paired=True, vectorized=True, n_resamples=100_000,
                                    method="percentile", random_state=np.random.default_rng(100)).confidence_interval
        width = reference.high - reference.low
        assert fit[key] == pytest.approx((reference.low, reference.high), abs=0.04 * width), key


def test_perfect_line_has_degenerate_intervals():
    fit = linear_fit_with_bootstrap([0, 1, 2, 3, 4], [1, 3, 5, 7, 9], n_boot=200)
    assert fit["slope_ci"] == pytest.approx((2.0, 2.0)) and fit["r2_ci"] == pytest.approx((1.0, 1.0))
    # 5 distinct x: a resample has a constant x with probability 5 (1/5)^5 = 1/625 (binomial: 32 +- 5.7 of 20,000)
    dropped = linear_fit_with_bootstrap([0, 1, 2, 3, 4], [1, 3, 5, 7, 9], n_boot=20000)["n_boot_dropped"]
    assert abs(dropped - 20000 / 625) < 5 * math.sqrt(20000 / 625 * (624 / 625))


def test_bootstrap_is_seeded():
    x = [0.1, 0.5, 0.9, 1.3, 2.0, 2.2, 3.1, 3.3]
    y = [0.0, 0.7, 0.4, 1.9, 1.5, 2.8, 2.0, 3.9]
    a = linear_fit_with_bootstrap(x, y, n_boot=300, seed=5)
    b = linear_fit_with_bootstrap(x, y, n_boot=300, seed=5)
    c = linear_fit_with_bootstrap(x, y, n_boot=300, seed=6)
    assert a["slope_ci"] == b["slope_ci"] and a["r2_ci"] == b["r2_ci"]
    assert a["slope_ci"] != c["slope_ci"]


def test_linear_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 3"):
        linear_fit_with_bootstrap([0, 1], [0, 1])
    with pytest.raises(ValueError, match="constant"):
        linear_fit_with_bootstrap([1, 1, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="same length"):
        linear_fit_with_bootstrap([0, 1, 2], [0, 1])


def test_plots_are_pngs_written_atomically(tmp_path):
    x, y = [0, 1, 2, 3], [0, 1, 1, 2]
    fit = linear_fit_with_bootstrap(x, y, n_boot=50)
    path = tmp_path / "sub" / "fit.png"
    path.parent.mkdir()
    path.write_bytes(b"old")
    plot_regression(x, y, ["a", "b", "c", "d"], fit, path, "x", "y", "title")
    assert path.read_bytes()[:8] == PNG_MAGIC
    rows = [dict(label="nurse", **proportion_summary(3, 10)), dict(label="philosopher", **proportion_summary(8, 10))]
    bars = plot_proportions(rows, tmp_path / "bars.png", ylabel="share of women")
    assert bars.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bars.png", "sub"]
    assert [p.name for p in path.parent.iterdir()] == ["fit.png"]  # no temporary left behind
    with pytest.raises(ValueError, match="labels"):
        plot_regression(x, y, ["a"], fit, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="low <= share <= high"):
        plot_proportions([{"label": "x", "share": 0.9, "low": 0.1, "high": 0.5}], tmp_path / "bad.png")


def test_binary_auc_by_hand_with_ties():
    # positives 0.9, 0.4; negatives 0.5, 0.4: pairs (0.9 > 0.5) 1, (0.9 > 0.4) 1, (0.4 < 0.5) 0, tie 1/2 -> 2.5 / 4
    assert binary_auc([0.9, 0.4, 0.5, 0.4], [True, True, False, False]) == 0.625
    # all positives above all negatives, and the reverse
    assert binary_auc([3, 2, 1], [True, True, False]) == 1.0 and binary_auc([1, 2, 3], [True, True, False]) == 0.0
    assert binary_auc([1.0, 2.0], [True, True]) is None and binary_auc([1.0], [False]) is None


def test_binary_auc_is_the_mann_whitney_u_over_the_pairs():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=40), 1)  # rounded: many ties
    positive = rng.random(40) < 0.4
    u = mannwhitneyu(scores[positive], scores[~positive]).statistic
    assert binary_auc(scores, positive) == pytest.approx(u / (positive.sum() * (~positive).sum()))


def test_calibrated_threshold_by_hand():
    # margins -0.5 (neg), -0.4 (neg), -0.2 (pos), 0.1 (pos); "positive" means margin > threshold.
    # candidates: -1.5 (all positive, 2/4), -0.45 (3/4), -0.3 (4/4), -0.05 (3/4), 1.1 (none positive, 2/4)
    assert calibrated_threshold([-0.5, -0.4, -0.2, 0.1], [False, False, True, True]) == pytest.approx(-0.3)
    # margins -0.6 (neg), -0.2 (pos), 0.4 (neg): -1.6 -> 1/3, -0.4 -> 2/3, 0.1 -> 1/3, 1.4 -> 2/3;
    # the tie between -0.4 and 1.4 goes to the threshold nearest 0
    assert calibrated_threshold([-0.6, -0.2, 0.4], [False, True, False]) == pytest.approx(-0.4)
    # equal margins count once: 0.3, 0.3 (pos) and -0.1 (neg) -> midpoint 0.1, accuracy 3/3
    assert calibrated_threshold([0.3, -0.1, 0.3], [True, False, True]) == pytest.approx(0.1)
    # one class only: every threshold below the margins is right; the nearest 0 is u_1 - 1 = -0.5 (not 1.5)
    assert calibrated_threshold([0.5], [True]) == pytest.approx(-0.5)
    # margins -1 (neg), 0 (pos), 0 (neg), 1 (pos): -2 -> 2/4, -0.5 -> 3/4, 0.5 -> 3/4, 2 -> 2/4;
    # -0.5 and 0.5 tie in accuracy and in distance to 0: the smaller is returned
    assert calibrated_threshold([-1.0, 0.0, 0.0, 1.0], [False, True, False, True]) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="at least one"):
        calibrated_threshold([], [])
    with pytest.raises(ValueError, match="2 margins for 1 labels"):
        calibrated_threshold([0.1, 0.2], [True])


def test_plots_follow_the_umask_like_any_plain_write(tmp_path):
    import os
    import stat

    from statistical_auditing.core.stats import plot_proportions

    old = os.umask(0o022)
    try:
        path = plot_proportions([{"label": "a", "share": 0.5, "low": 0.4, "high": 0.6}], tmp_path / "bars.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp alone would leave 0o600
    assert not [p for p in tmp_path.iterdir() if p.name != "bars.png"]
