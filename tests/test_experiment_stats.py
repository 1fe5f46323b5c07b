"""The experiment's statistics on cases whose answers are worked out by hand."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from bias_begets_bias.cli import InputError
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
    # 4 points fall into 2 + 2 in three ways, each as likely:
    #   {0, 2} | {1, 3}: lines y = x/2 and y = 0.5 + x/2, every error 0.5: RMSE 0.5, R^2 1 - 1/5 = 0.8
    #   {0, 1} | {2, 3}: lines y = x and y = x - 1, every error 1: RMSE 1, SST 2.5 + 2.5: R^2 0.2
    #   {0, 3} | {1, 2}: lines y = 2x/3 and y = 1, errors +-1/3, +-1: RMSE sqrt(5)/3, SST 2: R^2 -1/9
    result = E.held_out_prediction([0, 1, 2, 3], [0, 1, 1, 2], folds=2, repeats=3000, seed=4)
    assert set(np.round(result["rmse_by_repeat"], 9)) == {0.5, 1.0, round(math.sqrt(5) / 3, 9)}
    assert set(np.round(result["r2_by_repeat"], 9)) == {0.8, 0.2, round(-1 / 9, 9)}
    assert result["r2_out_ci"] == pytest.approx((-1 / 9, 0.8)) and result["rmse_ci"] == pytest.approx((0.5, 1.0))
    assert result["r2_out"] == pytest.approx((0.8 + 0.2 - 1 / 9) / 3, abs=0.02)
    assert result["rmse"] == pytest.approx((0.5 + 1 + math.sqrt(5) / 3) / 3, abs=0.01)
    # a line predicts its own points exactly; no spread in x: undefined
    exact = E.held_out_prediction(np.arange(10.0), 1 + 2 * np.arange(10.0), repeats=20)
    assert exact["rmse"] == pytest.approx(0, abs=1e-12) and exact["r2_out"] == pytest.approx(1)
    assert not E.held_out_prediction(np.full(10, 0.1), np.arange(10.0))["defined"]


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


# ----------------------------------------------------------------------------- crossed (pigeonhole) resamples


def test_crossed_resample_applies_one_word_draw_to_every_drawn_run():
    cells = 100 * np.arange(3)[:, None] + np.arange(5)[None, :]  # cell (r, w) holds 100 r + w
    runs, words = E.draw_indices(3, 50, 7, E.RUN_STREAM), E.word_draws(5, 50, 7)
    drawn = E.crossed_resample(cells, runs, words)
    assert drawn.shape == (50, 3, 5)
    assert (drawn % 100 == words[:, None, :]).all()  # the same word indices in every drawn run
    assert (drawn // 100 == runs[:, :, None]).all()
    # the word draws come from their own stream: they do not depend on how many runs there are
    assert (E.word_draws(5, 50, 7) == words).all() and not (E.draw_indices(5, 50, 7, E.RUN_STREAM) == words).all()


def test_hierarchical_regression_replicate_is_the_line_through_the_crossed_resample():
    rng = np.random.default_rng(2)
    x = rng.uniform(-0.2, 0.2, size=(3, 8))
    y = 0.5 + 2 * x + rng.normal(0, 0.1, size=(3, 8))
    words = E.word_draws(8, 40, 11)
    fit = E.hierarchical_regression(list(zip(x, y)), n_boot=40, seed=5, words=words)
    runs = E.draw_indices(3, 40, 5, E.RUN_STREAM)
    for b in (0, 17, 39):
        xb, yb = x[runs[b]][:, words[b]].ravel(), y[runs[b]][:, words[b]].ravel()
        assert fit["replicates"][b] == pytest.approx(E.ols(xb, yb)[::2])
    assert fit["word_draws"] is words or (fit["word_draws"] == words).all()


def test_runs_must_be_aligned_by_word():
    with pytest.raises(InputError, match="the same words in the same order"):
        E.hierarchical_regression([(np.arange(4.0), np.arange(4.0)), (np.arange(3.0), np.arange(3.0))])
    with pytest.raises(InputError, match=r"\(8, 4\) integer indices"):
        E.hierarchical_regression([(np.arange(4.0), np.arange(4.0))], n_boot=8, words=np.zeros((8, 3), int))
    words, rows = E.align_rows({"a": {"nurse": 1, "pilot": 2}, "b": {"pilot": 3, "nurse": 4}})
    assert words == ["nurse", "pilot"] and rows == [[1, 2], [4, 3]]
    with pytest.raises(InputError, match="b has no usable row for the word 'pilot', which a has"):
        E.align_rows({"a": {"nurse": 1, "pilot": 2}, "b": {"nurse": 4}})
    with pytest.raises(InputError, match="a has no usable row for the word 'baker', which b has"):
        E.align_rows({"a": {"nurse": 1}, "b": {"nurse": 4, "baker": 5}})


def test_arms_with_identical_data_differ_by_exactly_zero_in_every_replicate():
    rng = np.random.default_rng(3)
    x = rng.uniform(-0.2, 0.2, 12)
    y = 0.5 + 2 * x + rng.normal(0, 0.1, 12)
    words = E.word_draws(12, 300, 0)
    # one run per arm, runs drawn with different seeds (different models): the words pair them
    arm_a = E.hierarchical_regression([(x, y)], n_boot=300, seed=[0, 1], words=words)
    arm_b = E.hierarchical_regression([(x, y)], n_boot=300, seed=[0, 2], words=words)
    contrast = E.slope_contrast(arm_a, arm_b)
    assert (contrast["replicates"] == 0).all() and contrast["ci"] == (0.0, 0.0) and contrast["difference"] == 0
    # two runs per arm drawn with the same run seed: identical replicates too
    two = [(x, y), (x, 1 - y)]
    same = E.slope_contrast(*(E.hierarchical_regression(two, n_boot=300, seed=4, words=words) for _ in range(2)))
    assert (same["replicates"] == 0).all()
    # unpaired replicates (other word draws) are refused rather than subtracted
    with pytest.raises(InputError, match="not paired"):
        E.slope_contrast(arm_a, E.hierarchical_regression([(x, y)], n_boot=300, seed=1))


def test_r2_contrast_is_paired_over_runs_and_words():
    # one arm, two regressors, the same run and word draws: R^2 on x minus R^2 on x is exactly 0, and
    # the difference of two regressors is the replicate-wise difference of their R^2
    rng = np.random.default_rng(6)
    x1, noise = rng.uniform(-0.2, 0.2, size=(3, 10)), rng.normal(0, 0.05, size=(3, 10))
    x2 = x1 + rng.normal(0, 0.1, size=(3, 10))
    y = 0.5 + 2 * x1 + noise
    words = E.word_draws(10, 200, 0)
    on_x1, on_x2 = (E.hierarchical_regression(list(zip(x, y)), n_boot=200, seed=9, words=words) for x in (x1, x2))
    assert (E.paired_contrast(on_x1, on_x1, "r2")["replicates"] == 0).all()
    contrast = E.paired_contrast(on_x2, on_x1, "r2")
    assert contrast["difference"] == pytest.approx(on_x2["r2"] - on_x1["r2"])
    assert contrast["replicates"] == pytest.approx(on_x2["replicates"][:, 1] - on_x1["replicates"][:, 1])
    with pytest.raises(InputError, match="statistic"):
        E.paired_contrast(on_x1, on_x2, "intercept")


def test_crossed_interval_is_wider_than_nested_when_runs_share_word_effects():
    # 3 runs x 20 words; each word has its own effect a_w (sd 0.1), the same in every run, plus small
    # run-specific noise. Redrawing words inside each run (nested) treats a_w as independent per run
    # and understates the slope's uncertainty; the crossed draw keeps a word's runs together.
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(4):
        x = rng.uniform(-0.15, 0.15, 20)
        a = rng.normal(0, 0.1, 20)
        y = 0.5 + 2 * x + a + rng.normal(0, 0.02, size=(3, 20))
        crossed = E.hierarchical_regression([(x, row) for row in y], n_boot=1000, seed=1)["slope_ci"]
        draw = np.random.default_rng(1)
        nested = []
        for _ in range(1000):
            picks = [(r, draw.integers(0, 20, 20)) for r in draw.integers(0, 3, 3)]
            xb, yb = np.concatenate([x[w] for _, w in picks]), np.concatenate([y[r, w] for r, w in picks])
            nested.append(E.ols(xb, yb)[0])
        low, high = np.percentile(nested, [2.5, 97.5])
        ratios.append((crossed[1] - crossed[0]) / (high - low))
    assert min(ratios) > 1.2 and np.mean(ratios) > 1.4  # about sqrt(3) when word effects dominate


def test_seen_word_crossed_resample_of_two_runs_and_two_seeds_by_hand():
    # seed 0 drew no female image and seed 1 only female ones, in both runs (the same noise scored
    # twice). Crossed: one seed draw for both runs, (0,0) -> 0, (1,1) -> 1, mixed -> 1/2, with
    # probabilities 1/4, 1/4, 1/2. Nested (seeds redrawn per run) also gives 1/4 and 3/4.
    s, n = [np.array([0, 10]), np.array([0, 10])], [np.array([10, 10]), np.array([10, 10])]
    crossed = E.run_seed_replicates(s, n, True, 4000, 0)
    values, counts = np.unique(crossed, return_counts=True)
    assert values.tolist() == [0.0, 0.5, 1.0]
    assert counts / 4000 == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    nested = E.run_seed_replicates(s, n, False, 4000, 0)
    assert set(np.unique(nested)) == {0.0, 0.25, 0.5, 0.75, 1.0}
    # replicate b is the mean over drawn runs of their counts on the shared drawn seeds
    s2, n2 = [np.array([1, 4]), np.array([6, 9])], [np.array([10, 20]), np.array([10, 10])]
    runs, seeds = E.draw_indices(2, 5, 3, E.RUN_STREAM), E.draw_indices(2, 5, 3, E.SEED_STREAM)
    expected = [np.mean([s2[r][seeds[b]].sum() / n2[r][seeds[b]].sum() for r in runs[b]]) for b in range(5)]
    assert E.run_seed_replicates(s2, n2, True, 5, 3) == pytest.approx(expected)
    pooled = E.pooled_over_runs_and_seeds(s2, n2, True, n_boot=5, seed=3)
    assert pooled["share"] == pytest.approx((5 / 30 + 15 / 20) / 2) and pooled["resample"] == "crossed"
    assert (pooled["n_seeds"], pooled["n_runs"]) == (2, 2)
    with pytest.raises(InputError, match="the same sampling seeds in the same order"):
        E.pooled_over_runs_and_seeds([[1, 2], [1]], [[10, 10], [10]], True)
    # one seed per run: nothing to redraw at the seed level, so the counts are redrawn binomially
    assert E.pooled_over_runs_and_seeds([[3], [5]], [[10], [10]], True, n_boot=50)["resample"] == "binomial"
