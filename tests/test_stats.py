import math

import pytest

from statistical_auditing.stats import (linear_fit_with_bootstrap, plot_proportions, plot_regression,
                                        proportion_summary, wilson_interval)

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
    assert fit["slope_ci"][0] <= 0.6 <= fit["slope_ci"][1]
    assert 0 <= fit["r2_ci"][0] <= fit["r2_ci"][1] <= 1


def test_perfect_line_has_degenerate_intervals():
    fit = linear_fit_with_bootstrap([0, 1, 2, 3, 4], [1, 3, 5, 7, 9], n_boot=200)
    assert fit["slope_ci"] == pytest.approx((2.0, 2.0)) and fit["r2_ci"] == pytest.approx((1.0, 1.0))
    assert fit["n_boot_dropped"] >= 0


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
