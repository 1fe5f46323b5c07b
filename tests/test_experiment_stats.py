"""The experiment's statistics on cases whose answers are worked out by hand."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from statistical_auditing.from_scratch import experiment_stats as E
from statistical_auditing.core.stats import wilson_interval


def test_pooled_share_by_hand():
    # 3/10 and 7/10: pooled 10/20; per-seed shares 0.3 and 0.7 have sd sqrt(0.08) = 0.28284;
    # chi2 = (3 - 5)^2 / 2.5 + (7 - 5)^2 / 2.5 = 3.2 on 1 degree of freedom.
    pooled = E.pooled_share([(3, 10), (7, 10)])
    assert pooled["share"] == 0.5 and pooled["n"] == 20 and pooled["n_seeds"] == 2
    assert (pooled["ci_low"], pooled["ci_high"]) == wilson_interval(10, 20)
    assert pooled["seed_sd"] == pytest.approx(math.sqrt(0.08))
    assert pooled["homogeneity_p"] == pytest.approx(0.073638, abs=1e-6)
    assert (pooled["seed_min"], pooled["seed_max"]) == (0.3, 0.7)
    assert math.isnan(E.pooled_share([])["share"])


def test_pooled_share_identical_seeds_are_homogeneous():
    assert E.pooled_share([(5, 10), (5, 10), (5, 10)])["homogeneity_p"] == pytest.approx(1.0)


def test_pooled_over_runs_degenerate_and_spread():
    # every image of every run female: no resample can move the share
    all_female = E.pooled_over_runs([(10, 10), (20, 20)])
    assert (all_female["share"], all_female["ci_low"], all_female["ci_high"]) == (1.0, 1.0, 1.0)
    # runs at 0 and 1 exactly: resampled means are 0, 1/2 or 1, so the 95% interval is [0, 1]
    split = E.pooled_over_runs([(0, 50), (50, 50)], n_boot=4000)
    assert split["share"] == 0.5 and split["ci_low"] == 0.0 and split["ci_high"] == 1.0
    assert split["run_sd"] == pytest.approx(math.sqrt(0.5))


def test_ols_by_hand():
    assert E.ols([0, 1, 2, 3], [0, 1, 1, 2]) == pytest.approx((0.6, 0.1, 0.9))


def test_hierarchical_regression_exact_line_has_no_uncertainty():
    x = np.linspace(-0.1, 0.2, 8)
    fit = E.hierarchical_regression([(x, 1 + 2 * x)], n_boot=300)
    assert fit["defined"] and fit["slope"] == pytest.approx(2) and fit["intercept"] == pytest.approx(1)
    assert fit["slope_ci"] == pytest.approx((2, 2)) and fit["r2"] == pytest.approx(1)


def test_hierarchical_regression_interval_covers_the_runs():
    # run A: y = x, run B: y = 3x on the same words. Pooled slope 2. A resample of two runs is
    # AA (slope 1, prob 1/4), BB (3, 1/4) or a mix (2, 1/2), so the 95% interval is [1, 3].
    x = np.array([-0.1, 0.0, 0.1, 0.2])
    fit = E.hierarchical_regression([(x, x), (x, 3 * x)], n_boot=2000, seed=3)
    assert fit["slope"] == pytest.approx(2)
    assert fit["slope_ci"][0] == pytest.approx(1, abs=1e-9) and fit["slope_ci"][1] == pytest.approx(3, abs=1e-9)


def test_regression_without_spread_is_undefined():
    x = np.full(20, 1e-10) + np.random.default_rng(0).normal(0, 1e-9, 20)
    fit = E.hierarchical_regression([(x, np.random.default_rng(1).uniform(size=20))])
    assert not fit["defined"] and math.isnan(fit["slope"]) and "no spread" in fit["reason"]
    assert not E.x_has_spread([0.0, 0.0005, -0.0005]) and E.x_has_spread([0.0, 0.01, -0.01])


def test_slope_contrast_by_hand():
    x = np.linspace(0, 1, 6)
    steep, flat = E.hierarchical_regression([(x, 2 * x)], n_boot=200), E.hierarchical_regression([(x, x)], n_boot=200)
    contrast = E.slope_contrast(steep, flat)
    assert contrast["difference"] == pytest.approx(1) and contrast["ci"] == pytest.approx((1, 1))
    assert not E.slope_contrast(E.undefined_fit("no spread", 1, 6), flat)["defined"]


def test_held_out_prediction_by_hand():
    # folds 0: (0,0),(2,1) -> y = x/2; fold 1: (1,1),(3,2) -> y = 0.5 + x/2; every held-out error
    # is 0.5 in size; mean-only errors are 0.5, 1.5, -1.5, -0.5 (SS 5), so r2_out = 1 - 1/5.
    result = E.held_out_prediction([0, 1, 2, 3], [0, 1, 1, 2], [0, 1, 0, 1])
    assert result["rmse"] == pytest.approx(0.5) and result["mae"] == pytest.approx(0.5)
    assert result["r2_out"] == pytest.approx(0.8)


def test_alternating_folds_follow_the_ranks():
    # ranks of (0.3, 0.1, 0.2, 0.0) are (3, 1, 2, 0): odd ranks form fold 1
    assert E.alternating_folds([0.3, 0.1, 0.2, 0.0]).tolist() == [1, 1, 0, 0]


def test_logistic_fit_saturated_two_groups_by_hand():
    # x = 0: 1 of 4, x = 1: 3 of 4. Saturated: a = logit(1/4) = -ln 3, b = 2 ln 3;
    # Var(b) = 1/(4 * 1/4 * 3/4) + 1/(4 * 3/4 * 1/4) = 8/3.
    fit = E.logistic_fit([0, 1], [1, 3], [4, 4])
    assert fit["converged"]
    assert fit["intercept"] == pytest.approx(-math.log(3)) and fit["slope"] == pytest.approx(2 * math.log(3))
    assert fit["slope_se"] == pytest.approx(math.sqrt(8 / 3))


def test_logistic_fit_matches_an_independent_newton_free_check():
    # The MLE solves sum_i (s_i - n_i p_i) x_i = 0 and sum_i (s_i - n_i p_i) = 0: check the score.
    x, s, n = np.array([-0.4, -0.2, 0, 0.2, 0.4]), np.array([2, 5, 9, 14, 17]), np.array([20] * 5)
    fit = E.logistic_fit(x, s, n)
    p = 1 / (1 + np.exp(-(fit["intercept"] + fit["slope"] * x)))
    assert abs((s - n * p).sum()) < 1e-8 and abs(((s - n * p) * x).sum()) < 1e-8


def test_logistic_fit_separated_data_is_flagged():
    assert not E.logistic_fit([0, 1], [0, 5], [5, 5])["converged"]


def test_lipschitz_ratio_of_a_linear_map_is_its_gain_along_the_move():
    # f(x, y) = A y with A = diag(3, 1): moving y along e1 scales by 3, along e2 by 1; no move
    # can exceed the operator norm 3.
    A = np.diag([3.0, 1.0])
    y1 = np.array([[0.5, 0.5], [0.5, 0.5], [0.0, 0.0]])
    y2 = np.array([[1.5, 0.5], [0.5, -1.5], [1.0, 1.0]])
    ratios = E.lipschitz_ratios(y1 @ A.T, y2 @ A.T, y1, y2)
    assert ratios == pytest.approx([3.0, 1.0, math.sqrt(10) / math.sqrt(2)])
    with pytest.raises(ValueError):
        E.lipschitz_ratios(y1 @ A.T, y1 @ A.T, y1, y1)


def test_conditionings_equal_up_to_rounding_are_one_and_have_no_ratio():
    # (3, 4) has norm 5, so the tolerance is 5e-4: a move of 1e-6 (float32 rounding of the same
    # vector computed two ways) is the same conditioning, a move of 0.01 is not.
    y = np.array([[3.0, 4.0], [3.0, 4.0 + 1e-6], [3.0, 4.01], [0.0, 1.0], [3.0 + 1e-6, 4.0]])
    assert E.same_conditioning_distance(y[0], y[3]) == pytest.approx(5e-4)
    assert E.distinct_rows(y) == [0, 2, 3]
    with pytest.raises(ValueError, match="rounding"):
        E.lipschitz_ratios(np.zeros((1, 2)), np.ones((1, 2)), y[0], y[1])
    # a real move of 0.01 keeps its ratio: f(y) = 2 y doubles it
    assert E.lipschitz_ratios(2 * y[:1], 2 * y[2:3], y[0], y[2]) == pytest.approx([2.0])


def test_hierarchical_bootstrap_with_one_run_matches_scipy_pairs_bootstrap_roughly():
    rng = np.random.default_rng(5)
    x = rng.uniform(-0.2, 0.2, 25)
    y = 0.5 + 2 * x + rng.normal(0, 0.05, 25)
    fit = E.hierarchical_regression([(x, y)], n_boot=4000, seed=1)
    reference = scipy_stats.bootstrap((x, y), lambda a, b: E.ols(a, b)[0], paired=True, vectorized=False,
                                      n_resamples=4000, method="percentile", random_state=2)
    low, high = reference.confidence_interval
    assert fit["slope_ci"][0] == pytest.approx(low, abs=0.08) and fit["slope_ci"][1] == pytest.approx(high, abs=0.08)


def test_between_word_sd_by_hand():
    """p = 1/4, 3/4 with n = 4: var(p) = 0.125, noise = mean(p(1-p)/(n-1)) = 0.0625, tau = 0.25."""
    r = E.between_word_sd([1, 3], [4, 4])
    assert r["sd"] == pytest.approx(math.sqrt(0.125))
    assert r["noise_sd"] == pytest.approx(0.25)
    assert r["tau"] == pytest.approx(0.25)
    assert (r["min"], r["max"], r["n_words"]) == (0.25, 0.75, 2)
    # equal shares: no spread at all, and tau is clipped at 0 (noise exceeds the observed variance)
    assert E.between_word_sd([2, 2, 2], [4, 4, 4])["tau"] == 0.0
    assert E.between_word_sd([2, 3, 2], [4, 4, 4])["tau"] == 0.0
    assert math.isnan(E.between_word_sd([1], [4])["tau"])


def test_between_word_sd_separates_noise_from_real_spread():
    """20 words at p = 0.5 (n = 64) differ by noise only; words at 0.3 / 0.7 differ by 0.2 (sd)."""
    rng = np.random.default_rng(0)
    noise_only = [E.between_word_sd(rng.binomial(64, 0.5, size=20), [64] * 20)["tau"] for _ in range(200)]
    real = [E.between_word_sd(rng.binomial(64, np.repeat([0.3, 0.7], 10)), [64] * 20)["tau"] for _ in range(200)]
    assert np.mean(noise_only) < 0.03
    assert abs(np.mean(real) - math.sqrt(0.04 * 20 / 19)) < 0.02  # sd (ddof 1) of ten 0.3s and ten 0.7s


def test_pooled_between_word_sd_averages_runs_by_hand():
    r = E.pooled_between_word_sd([([1, 3], [4, 4]), ([2, 2], [4, 4])], n_boot=200)
    assert r["tau"] == pytest.approx(0.125)  # (0.25 + 0) / 2
    assert r["sd"] == pytest.approx(math.sqrt(0.125) / 2)
    assert r["n_runs"] == 2 and r["tau_ci"][0] >= 0.0 and r["tau_ci"][1] <= 0.25 + 1e-12
    assert (r["min"], r["max"]) == (0.25, 0.75)
    flat = E.pooled_between_word_sd([([2, 2, 2], [4, 4, 4])], n_boot=50)
    assert flat["tau"] == 0.0 and flat["tau_ci"] == (0.0, 0.0)
