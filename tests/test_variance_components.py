"""Variance components of a word's gender share, checked by hand and on simulated crossed designs."""
import math

import numpy as np
import pytest

from bias_begets_bias.cli import InputError
from statistical_auditing.from_scratch import variance_components as V


def orthogonal_array(d=0.0):
    """2 words x 2 JL x 2 training draws built from orthogonal +-1 contrasts, so every mean square
    is worked out by hand: y = 0.5 + 0.1 (-1)^w + 0.05 (-1)^(w+j) + 0.02 (-1)^(w+t) + d (-1)^(w+j+t).
    MS_W = 4 * 2 * 0.1^2 = 0.08, MS_WJ = 2 * 4 * 0.05^2 = 0.02, MS_WT = 2 * 4 * 0.02^2 = 0.0032,
    MS_WJT = 8 d^2 (each on 1 degree of freedom)."""
    w, j, t = np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij")
    return 0.5 + 0.1 * (-1.0) ** w + 0.05 * (-1.0) ** (w + j) + 0.02 * (-1.0) ** (w + t) + d * (-1.0) ** (w + j + t)


def simulate(seed, n_words=120, n_jl=3, n_train=2, s2=(0.02, 0.005, 0.01), n=64, x=None, slope=0.0):
    """Crossed design: uniform word, word x JL and word x train effects with variances s2 (uniform on
    [-h, h] has variance h^2 / 3, and keeps p inside [0, 1] here), a run shift, binomial counts.
    Returns (shares, true p)."""
    rng = np.random.default_rng(seed)
    half = [math.sqrt(3 * v) for v in s2]
    a = rng.uniform(-half[0], half[0], n_words) + (slope * x if x is not None else 0.0)
    b = rng.uniform(-half[1], half[1], (n_words, n_jl))
    c = rng.uniform(-half[2], half[2], (n_words, n_train))
    run_shift = rng.normal(0.0, 0.03, (1, n_jl, n_train))
    p = np.clip(0.5 + a[:, None, None] + b[:, :, None] + c[:, None, :] + run_shift, 0.0, 1.0)
    return rng.binomial(n, p) / n, p


# ----------------------------------------------------------------------------- decompose


def test_sampling_variance_by_hand():
    # 0.5 of 11: 0.25 / 10; 0 of 11: 0
    assert V.sampling_variance([0.5, 0.0], 11) == pytest.approx([0.025, 0.0])


def test_decompose_by_hand_without_residual():
    result = V.decompose(orthogonal_array(), n=101)
    assert result["mean_squares"] == pytest.approx({"word": 0.08, "word_x_jl": 0.02, "word_x_train": 0.0032,
                                                     "residual": 0.0}, abs=1e-12)
    # cells 0.67, 0.63, 0.57, 0.53 and their mirror images: mean p(1 - p) = 0.9484 / 4 = 0.2371
    var = result["variance"]
    assert var["word"] == pytest.approx((0.08 - 0.02 - 0.0032) / 4)  # 0.0142
    assert var["word_x_jl"] == pytest.approx(0.02 / 2)
    assert var["word_x_train"] == pytest.approx(0.0032 / 2)
    assert var["sampling"] == pytest.approx(0.2371 / 100)
    assert var["interaction"] == pytest.approx(-0.2371 / 100)  # kept raw, negative
    assert result["sd"]["interaction"] == 0.0  # truncated at 0 in the sd only
    assert result["sd"]["word"] == pytest.approx(math.sqrt(0.0142))
    assert result["word_share"] == pytest.approx(0.0142 / (0.0142 + 0.01 + 0.0016))
    assert result["df"] == {"word": 1, "word_x_jl": 1, "word_x_train": 1, "residual": 1}


def test_decompose_by_hand_with_residual():
    var = V.decompose(orthogonal_array(d=0.01), n=101)["variance"]
    assert var["residual"] == pytest.approx(8e-4)
    assert var["word_x_jl"] == pytest.approx((0.02 - 8e-4) / 2)
    assert var["word_x_train"] == pytest.approx((0.0032 - 8e-4) / 2)
    assert var["word"] == pytest.approx((0.08 - 0.02 - 0.0032 + 8e-4) / 4)
    # the training draw nested in the JL draw: (SS_WT + SS_WJT) / ((W - 1) J (T - 1)) - sampling
    # = (0.0032 + 8e-4) / 2 - sampling; the run's whole part adds word x JL
    assert var["train_within_jl"] == pytest.approx(0.002 - var["sampling"])
    assert var["train_within_jl"] == pytest.approx(var["word_x_train"] + var["interaction"])
    assert var["word_x_run"] == pytest.approx((0.02 - 8e-4) / 2 + 0.002 - var["sampling"])


def test_run_shifts_do_not_change_the_components():
    y = orthogonal_array(d=0.01)
    shift = np.array([[0.03, -0.02], [0.01, 0.04]])  # one lean per run (j, t)
    plain, shifted = V.decompose(y, 101), V.decompose(y + shift, 101)
    for key in ("word", "word_x_jl", "word_x_train", "residual"):
        assert shifted["variance"][key] == pytest.approx(plain["variance"][key], abs=1e-12)
    assert shifted["run_shift"] == pytest.approx(shift - shift.mean())
    assert V.word_effects(y + shift, 101)["effect"] == pytest.approx([0.1, -0.1])


def test_decompose_recovers_a_simulated_crossed_design():
    truth = {"word": 0.02, "word_x_jl": 0.005, "word_x_train": 0.01, "interaction": 0.0}
    y, p = simulate(seed=0)
    result = V.decompose(y, 64, n_boot=400, seed=0)
    for key, value in truth.items():
        low, high = result["intervals"][key]
        assert low <= value <= high, (key, result["variance"][key], (low, high))
        assert low <= result["variance"][key] <= high
    assert result["variance"]["word"] == pytest.approx(0.02, abs=0.006)
    assert result["variance"]["word_x_jl"] == pytest.approx(0.005, abs=0.0015)
    assert result["variance"]["word_x_train"] == pytest.approx(0.01, abs=0.003)
    true_sampling = float((p * (1 - p) / 64).mean())
    low, high = result["intervals"]["sampling"]
    assert low <= true_sampling <= high
    # the word's share of the non-sampling variance: 0.02 / 0.035
    low, high = result["intervals"]["word_share"]
    assert low <= 0.02 / 0.035 <= high


def test_decompose_intervals_cover_the_truth_in_most_simulated_designs():
    # 95% percentile intervals of variances from 120 words cover a little less than 95% (52, 57,
    # 53 and 58 of these 60 designs); a wrong formula or a resampling that ignores the design
    # would miss far more often than the 20% allowed here
    truth = {"word": 0.02, "word_x_jl": 0.005, "word_x_train": 0.01, "interaction": 0.0}
    covered = dict.fromkeys(truth, 0)
    for seed in range(60):
        intervals = V.decompose(simulate(seed)[0], 64, n_boot=200, seed=seed)["intervals"]
        for key, value in truth.items():
            covered[key] += intervals[key][0] <= value <= intervals[key][1]
    assert min(covered.values()) >= 48, covered


def simulate_nested(seed, n_words=120, n_jl=2, n_train=2, s2=(0.01, 0.008, 0.012), n=64):
    """Training draws nested in JL draws: a training seed's effect on a word is drawn afresh under
    every JL matrix (c[w, j, t]), as when one seed with another matrix trains another network.
    Normal effects with variances s2 (word, word x JL, training within JL), binomial counts."""
    rng = np.random.default_rng(seed)
    sd = [math.sqrt(v) for v in s2]
    p = (0.5 + rng.normal(0, sd[0], (n_words, 1, 1)) + rng.normal(0, sd[1], (n_words, n_jl, 1))
         + rng.normal(0, sd[2], (n_words, n_jl, n_train)) + rng.normal(0, 0.03, (1, n_jl, n_train)))
    p = np.clip(p, 0.0, 1.0)
    return rng.binomial(n, p) / n


def test_decompose_reads_a_nested_design():
    # the crossed term finds nothing a seed carries across matrices; the nested one finds the
    # training draw. Over 60 simulated designs the estimates average to the truth (unbiased under
    # the nested model too) and the words-only intervals cover it about as often as in the crossed
    # case (54-59 of 60 here; at least 48 required, as above)
    truth = {"word": 0.01, "word_x_jl": 0.008, "word_x_train": 0.0, "train_within_jl": 0.012, "word_x_run": 0.02}
    estimates, covered = {key: [] for key in truth}, dict.fromkeys(truth, 0)
    for seed in range(60):
        result = V.decompose(simulate_nested(seed), 64, n_boot=200, seed=seed)
        for key, value in truth.items():
            estimates[key].append(result["variance"][key])
            covered[key] += result["intervals"][key][0] <= value <= result["intervals"][key][1]
    assert min(covered.values()) >= 48, covered
    for key, value in truth.items():  # the mean of 60 estimates has an sd of at most 0.0003 here
        assert np.mean(estimates[key]) == pytest.approx(value, abs=0.001), key
    # JL draw vs training draw, nested: the contrast's interval covers 0.004 - 0.014 in most designs
    hits, differences = 0, []
    for seed in range(20):
        y = simulate_nested(seed=100 + seed, s2=(0.01, 0.004, 0.014))
        contrast = V.component_difference(y, "word_x_jl", key_b="train_within_jl", n=64, n_boot=200, seed=seed)
        hits += contrast["ci"][0] <= -0.010 <= contrast["ci"][1]
        differences.append(contrast["difference"])
    assert hits >= 15 and np.mean(differences) == pytest.approx(-0.010, abs=0.002), (hits, np.mean(differences))
    with pytest.raises(InputError, match="n: train_within_jl"):
        V.component_difference(y, "word_x_jl", key_b="train_within_jl", n_boot=10)


def test_decompose_without_a_word_effect():
    y, _ = simulate(seed=2, s2=(0.0, 0.005, 0.01))
    result = V.decompose(y, 64, n_boot=400, seed=0)
    assert abs(result["variance"]["word"]) < 0.003
    low, high = result["intervals"]["word"]
    assert low <= 0.0 <= high
    assert result["word_share"] < 0.15


def test_decompose_bootstrap_is_deterministic_and_pigeonhole_runs():
    y, _ = simulate(seed=3, n_words=30)
    first = V.decompose(y, 64, n_boot=50, seed=7, resample="pigeonhole")
    assert first["intervals"] == V.decompose(y, 64, n_boot=50, seed=7, resample="pigeonhole")["intervals"]
    assert first["intervals"] != V.decompose(y, 64, n_boot=50, seed=8, resample="pigeonhole")["intervals"]
    assert first["resample"] == "pigeonhole" and first["n_boot"] == 50


@pytest.mark.parametrize("shares, n, message", [
    (np.full((4, 3), 0.5), 64, "3-D array"),
    (np.full((4, 1, 2), 0.5), 64, "at least 2 words, 2 JL draws"),
    (np.where(np.arange(24).reshape(4, 3, 2) == 5, np.nan, 0.5), 64, "1 cells are missing"),
    (np.full((4, 3, 2), 1.5), 64, "shares in [0, 1]"),
    (np.full((4, 3, 2), 0.5), 1, "n: expected whole numbers"),
    (np.full((4, 3, 2), 0.5), np.full((4, 3), 64), "n: expected a number or an array"),
    (np.full((4, 3, 2), 0.5), np.full(2, 64), "n: expected a number or an array"),
])
def test_decompose_rejects_bad_input(shares, n, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        V.decompose(shares, n)


def test_decompose_rejects_unknown_resample():
    with pytest.raises(InputError, match="resample"):
        V.decompose(orthogonal_array(), 64, n_boot=10, resample="runs")


# ----------------------------------------------------------------------------- word effects


def test_word_effects_by_hand():
    # components of test_decompose_by_hand_without_residual: word 0.0142, word x JL 0.01,
    # word x train 0.0016, interaction truncated to 0; each word's mean p(1-p)/(n-1) is 0.002371
    effects = V.word_effects(orthogonal_array(), 101)
    se2 = 0.01 / 2 + 0.0016 / 2 + (0.0 + 0.002371) / 4
    shrinkage = 0.0142 / (0.0142 + se2)
    assert effects["effect"] == pytest.approx([0.1, -0.1])
    assert effects["se"] == pytest.approx([math.sqrt(se2)] * 2)
    assert effects["shrinkage"] == pytest.approx([shrinkage] * 2)
    assert effects["shrunk"] == pytest.approx([0.1 * shrinkage, -0.1 * shrinkage])
    assert effects["shrunk_se"] == pytest.approx([math.sqrt(shrinkage * se2)] * 2)


def test_word_effects_shrink_to_zero_without_a_word_component():
    # two words that differ only through word x JL contrasts: s2_word = (0 - 0.02 - 0 + 0) / 4 < 0
    w, j, t = np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij")
    effects = V.word_effects(0.5 + 0.05 * (-1.0) ** (w + j), 101)
    assert effects["s2_word"] == pytest.approx(-0.005) and effects["s2_word_truncated"] == 0.0
    assert effects["shrinkage"] == pytest.approx([0.0, 0.0]) and effects["shrunk"] == pytest.approx([0.0, 0.0])


# ----------------------------------------------------------------------------- predictors


def line_array():
    """4 words, 2 x 2 runs with a shift each: word part a = 0.2 x + u, x = (-1, 0, 1, 0),
    u = (0, 0.05, 0, -0.05) orthogonal to x and to 1, no interactions.
    S_xx = 2, S_xa = 0.4 -> slope 0.2; S_aa = 0.085 -> R^2 = 0.08 / 0.085;
    s2_word = 0.085 / 3, s2_word|x = 0.005 / 2 -> fraction = 1 - 0.0025 / (0.085 / 3)."""
    x = np.array([-1.0, 0.0, 1.0, 0.0])
    a = 0.2 * x + np.array([0.0, 0.05, 0.0, -0.05])
    shift = np.array([[0.0, 0.02], [-0.01, 0.03]])
    return 0.5 + a[:, None, None] + shift[None], x


def test_slope_on_predictor_by_hand():
    y, x = line_array()
    fit = V.slope_on_predictor(y, x, n_boot=50, seed=0)
    assert fit["slope"] == pytest.approx(0.2)
    assert fit["r2"] == pytest.approx(0.08 / 0.085)
    assert fit["word_variance"] == pytest.approx(0.085 / 3)
    assert fit["fraction_of_word_variance_explained"] == pytest.approx(1 - 0.0025 / (0.085 / 3))
    assert fit["intercept"] == pytest.approx(y.mean())  # mean(x) = 0
    assert fit["n_words"] == 4 and fit["resample"] == "pigeonhole"


def test_slope_on_predictor_recovers_a_simulated_slope():
    # a = 2 x + u, var(2 x) = 4 * 0.06^2 = 0.0144, var(u) = 0.0056: the word part's fraction on x is 0.72
    x = np.random.default_rng(10).normal(0.0, 0.06, 120)
    y, _ = simulate(seed=4, s2=(0.0056, 0.005, 0.01), x=x, slope=2.0)
    fit = V.slope_on_predictor(y, x, n_boot=300, seed=0)
    assert fit["slope_ci"][0] <= 2.0 <= fit["slope_ci"][1]
    assert fit["fraction_ci"][0] <= 0.72 <= fit["fraction_ci"][1]
    # R^2 of the noisy word means is diluted by the JL, training and sampling noise; the fraction is not
    assert fit["r2"] < fit["fraction_of_word_variance_explained"]
    assert fit == V.slope_on_predictor(y, x, n_boot=300, seed=0)


def test_slope_on_predictor_rejects_a_constant_predictor():
    y, _ = line_array()
    with pytest.raises(InputError, match="x: every word has the same value"):
        V.slope_on_predictor(y, np.zeros(4), n_boot=10)
    with pytest.raises(InputError, match=r"x: expected one value per word \(4\)"):
        V.slope_on_predictor(y, np.zeros(3), n_boot=10)


def test_paired_difference_by_hand():
    y, x = line_array()
    # arm B leans half as much: shares 0.5 + (y - 0.5) / 2 -> slope 0.1, the same R^2
    half = 0.5 + (y - 0.5) / 2
    slope = V.paired_difference(y, x, half, x, statistic="slope", n_boot=100, resample="words")
    assert (slope["a"], slope["b"], slope["difference"]) == pytest.approx((0.2, 0.1, 0.1))
    # the same words in both arms: every resample's difference is half arm A's slope, so the
    # interval is half of arm A's words-only slope interval
    alone = V.slope_on_predictor(y, x, n_boot=100, resample="words")["slope_ci"]
    assert slope["ci"] == pytest.approx((alone[0] / 2, alone[1] / 2))
    r2 = V.paired_difference(y, x, half, x, statistic="r2", n_boot=100, resample="words")
    assert r2["difference"] == pytest.approx(0.0, abs=1e-12)
    assert r2["ci"] == pytest.approx((0.0, 0.0), abs=1e-12)


def test_paired_difference_of_two_predictors_in_one_arm():
    y, x = line_array()
    same = V.paired_difference(y, x, None, x, statistic="r2", n_boot=50)
    assert same["difference"] == 0.0 and same["ci"] == (0.0, 0.0)  # B reuses A's run draws
    other = np.array([-1.0, 1.0, 1.0, -1.0])  # x + (0, 1, 0, -1): fits worse
    diff = V.paired_difference(y, x, None, other, statistic="r2", n_boot=50)
    assert diff["a"] == pytest.approx(0.08 / 0.085) and diff["difference"] > 0


def test_paired_difference_of_word_variance_uses_words_only():
    a, _ = simulate(seed=5, n_words=40)
    b, _ = simulate(seed=6, n_words=40, s2=(0.0, 0.005, 0.01))
    diff = V.paired_difference(a, None, b, None, statistic="word_variance", n_boot=200)
    assert diff["resample"] == "words"
    assert diff["difference"] == pytest.approx(V.decompose(a, 64)["variance"]["word"]
                                               - V.decompose(b, 64)["variance"]["word"])
    assert diff["ci"][0] <= 0.02 <= diff["ci"][1]
    with pytest.raises(InputError, match="x_a: word_variance uses no predictor"):
        V.paired_difference(a, np.zeros(40), b, None, statistic="word_variance")
    with pytest.raises(InputError, match="shares_b: expected the same 40 words"):
        V.paired_difference(a, None, b[:30], None, statistic="word_variance")


# ----------------------------------------------------------------------------- checks beside the bootstrap


def test_per_run_t_interval_by_hand():
    # mean 2, sd 1, t_{0.975, 2} = 4.302653: 2 +- 4.302653 / sqrt(3)
    result = V.per_run_t_interval([1.0, 2.0, 3.0])
    assert result["mean"] == 2.0 and result["sd"] == pytest.approx(1.0) and result["df"] == 2
    assert result["ci"] == pytest.approx((2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)), abs=1e-6)
    with pytest.raises(InputError, match="at least 2 per-run values"):
        V.per_run_t_interval([1.0])


def test_repeated_cv_r2_leave_one_out_by_hand():
    # x = 0..3, y = 0, 0, 1, 1; leaving out x=0 the line through the rest is -1/3 + x/2 (error 1/3,
    # baseline 2/3); leaving out x=1 it is 1/14 + 5x/14 (error 3/7, baseline 2/3); x=2, 3 mirror them.
    # R^2 = 1 - (2/9 + 18/49) / (16/9) = 524/784
    result = V.repeated_cv_r2([0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 1.0, 1.0], folds=4, repeats=3)
    assert result["r2_by_repeat"] == pytest.approx([524 / 784] * 3)
    assert result["r2"] == pytest.approx(524 / 784) and result["ci"] == pytest.approx((524 / 784, 524 / 784))


def test_repeated_cv_r2_on_a_line_and_on_noise():
    x = np.arange(10.0)
    assert V.repeated_cv_r2(x, 3 - 2 * x, folds=2, repeats=20)["r2"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    x_noise, y_noise = rng.normal(size=60), rng.normal(size=60)
    noise = V.repeated_cv_r2(x_noise, y_noise, folds=2, repeats=50, seed=1)
    assert noise["r2"] < 0.05  # x unrelated to y predicts no better than the mean
    assert noise["ci"][0] < noise["ci"][1]  # the split matters
    again = V.repeated_cv_r2(x_noise, y_noise, folds=2, repeats=50, seed=1)["r2_by_repeat"]
    assert np.array_equal(noise["r2_by_repeat"], again)
    with pytest.raises(InputError, match="folds"):
        V.repeated_cv_r2(x, x, folds=1)


# ----------------------------------------------------------------------------- neighbours


def test_bias_by_neighbours_by_hand():
    def at(degrees):
        return np.array([math.cos(math.radians(degrees)), math.sin(math.radians(degrees))])

    # on the unit circle: a at 0 deg, b at 10, c at 25, d at 90, e at 180 (scaled: length does not count)
    vectors = {"a": at(0), "b": 3 * at(10), "c": at(25), "d": at(90), "e": at(180)}
    female = {"a": False, "b": True, "c": False, "d": True, "e": True}
    shares = V.bias_by_neighbours(vectors, ["a", "d"], female, k=2)
    assert shares == {"a": 0.5, "d": 0.5}  # a: b (F), c (M); d: c (M, 65 deg), b (F, 80 deg)
    assert V.bias_by_neighbours(vectors, ["e"], female, k=1) == {"e": 1.0}  # d at 90 deg beats c at 155
    with pytest.raises(InputError, match="k: expected a whole number in \\[1, 4\\]"):
        V.bias_by_neighbours(vectors, ["a"], female, k=5)
    with pytest.raises(InputError, match="female_side: expected a label for every vocabulary word"):
        V.bias_by_neighbours(vectors, ["a"], {"a": True}, k=1)
    with pytest.raises(InputError, match="'z' is not in the vocabulary"):
        V.bias_by_neighbours(vectors, ["z"], female, k=1)
    with pytest.raises(InputError, match="vectors: expected 1-D vectors of one common length"):
        V.bias_by_neighbours({**vectors, "f": np.ones(3)}, ["a"], {**female, "f": True}, k=1)


def test_female_side_from_direction_by_hand():
    vectors = {"he": np.array([1.0, 0.0]), "she": np.array([-1.0, 0.0]), "nurse": np.array([-0.2, 1.0]),
               "person": np.array([0.0, 1.0])}
    direction = vectors["she"] - vectors["he"]  # (-2, 0)
    assert V.female_side_from_direction(vectors, direction) == {"he": False, "she": True, "nurse": True,
                                                                "person": False}


def test_component_difference_by_hand_and_on_a_simulated_design():
    # 2 words x 2 JL x 2 training; word 0 moves with the JL draw only, word 1 is its mirror
    y = np.array([[[0.6, 0.6], [0.4, 0.4]], [[0.4, 0.4], [0.6, 0.6]]])
    # z = y (run means 0.5 removed): m_wj = +-0.1, m_wt = 0, m_w = 0 -> MS_WJ = 2 * 4 * 0.01 / 1 = 0.08,
    # MS_WT = 0, MS_WJT = 0 -> s2_word_x_jl = 0.08 / 2 = 0.04, s2_word_x_train = 0
    result = V.component_difference(y, "word_x_jl", key_b="word_x_train", n_boot=50)
    assert result["a"] == pytest.approx(0.04) and result["b"] == pytest.approx(0.0)
    assert result["difference"] == pytest.approx(0.04)
    rng = np.random.default_rng(3)
    truth_jl, truth_train = 0.08, 0.03
    y = (0.5 + rng.normal(0, 0.06, (150, 1, 1)) + rng.normal(0, truth_jl, (150, 3, 1))
         + rng.normal(0, truth_train, (150, 1, 2)) + rng.normal(0, 0.02, (150, 3, 2)))
    result = V.component_difference(y, "word_x_jl", key_b="word_x_train", n_boot=400, seed=1)
    low, high = result["ci"]
    assert low <= truth_jl ** 2 - truth_train ** 2 <= high and low > 0
    other = y + rng.normal(0, 0.05, (150, 3, 1))  # the same words, a larger word x JL part
    assert y.min() > 0 and other.max() < 1
    between = V.component_difference(other, "word_x_jl", shares_b=y, n_boot=400, seed=1)
    assert between["ci"][0] <= 0.05 ** 2 <= between["ci"][1]
    with pytest.raises(InputError, match="key_b"):
        V.component_difference(y, "word", n_boot=10)
    with pytest.raises(InputError, match="key_a"):
        V.component_difference(y, "sampling", key_b="word", n_boot=10)


# ----------------------------------------------------------------------------- words x runs (one training per JL draw)


def test_decompose_runs_by_hand():
    # 3 words x 2 runs; run 2 is run 1 shifted by +0.1 except word c, which moves by a further +0.06.
    y = np.array([[0.2, 0.3], [0.5, 0.6], [0.8, 0.96]])
    n = 1_000_000  # sampling variance ~0: the components are the mean squares' own algebra
    out = V.decompose_runs(y, n)
    # run means 0.5 and 0.62; z = [[-0.3, -0.32], [0, -0.02], [0.3, 0.34]]; m_w = [-0.31, -0.01, 0.32]
    # MS_W = 2 (0.0961 + 0.0001 + 0.1024) / 2 = 0.1986; residuals z - m_w = +-0.01, +-0.01, +-0.02
    # MS_WR = (2 * 0.0001 + 2 * 0.0001 + 2 * 0.0004) / 2 = 0.0006
    assert out["mean_squares"]["word"] == pytest.approx(0.1986)
    assert out["mean_squares"]["word_x_run"] == pytest.approx(0.0006)
    sampling = float(np.mean(y * (1 - y) / (n - 1)))
    assert out["variance"]["word"] == pytest.approx((0.1986 - 0.0006) / 2)
    assert out["variance"]["word_x_run"] == pytest.approx(0.0006 - sampling)
    assert out["correlations"] == [pytest.approx(np.corrcoef(y[:, 0], y[:, 1])[0, 1])]


def test_decompose_runs_recovers_a_simulated_design_and_its_interval_covers_it():
    rng = np.random.default_rng(3)
    n_words, n_runs, n = 150, 3, 64
    word = rng.normal(0, 0.12, size=(n_words, 1))  # small enough that the clip below rarely acts
    p = np.clip(0.5 + word + rng.normal(0, 0.08, size=(n_words, n_runs)) + np.array([0.0, 0.05, -0.03]), 0.02, 0.98)
    y = rng.binomial(n, p) / n
    out = V.decompose_runs(y, n, n_boot=400, seed=0)
    low, high = out["intervals"]["sd_word"]
    assert low <= 0.12 <= high and abs(out["sd"]["word"] - 0.12) < 0.03
    low, high = out["intervals"]["sd_word_x_run"]
    assert low <= 0.08 <= high and abs(out["sd"]["word_x_run"] - 0.08) < 0.03
    assert out["sd"]["sampling"] == pytest.approx(0.06, abs=0.01)


def test_decompose_runs_without_a_word_effect_gives_a_share_near_zero():
    rng = np.random.default_rng(4)
    p = np.clip(0.5 + rng.normal(0, 0.12, size=(150, 3)), 0.02, 0.98)
    out = V.decompose_runs(rng.binomial(64, p) / 64, 64, n_boot=300, seed=1)
    assert out["intervals"]["sd_word"][0] < 0.03 and out["word_share"] < 0.2


@pytest.mark.parametrize("shares, message", [
    (np.full((2, 3), 0.5), "at least 3 words and 2 runs"),
    (np.full((4, 1), 0.5), "at least 3 words and 2 runs"),
    (np.full((4, 2, 2), 0.5), "2-D array"),
    (np.array([[0.1, np.nan], [0.2, 0.3], [0.4, 0.5]]), "not finite"),
    (np.array([[0.1, 1.2], [0.2, 0.3], [0.4, 0.5]]), "in \\[0, 1\\]"),
])
def test_decompose_runs_rejects_bad_input(shares, message):
    with pytest.raises(InputError, match=message):
        V.decompose_runs(shares, 64)


def test_repeated_cv_r2_with_groups_keeps_a_label_in_one_fold():
    # Two runs x 3 words: y is the word's own value plus a run shift. Split by point, a word's
    # share in the other run sits in the training half; split by word (groups) it never does.
    x = np.array([0.0, 1.0, 2.0, 0.0, 1.0, 2.0])
    y = np.array([0.0, 1.0, 2.0, 0.1, 1.1, 2.1])
    words = np.array(["a", "b", "c", "a", "b", "c"])
    grouped = V.repeated_cv_r2(x, y, folds=3, repeats=4, groups=words)
    # leave-one-word-out: the line through the other two words' four points is y = 0.05 + x exactly
    # (both runs' points), so each held-out point misses by +-0.05
    assert grouped["n_units"] == 3
    assert grouped["rmse_by_repeat"] == pytest.approx(np.full(4, 0.05))
    assert np.ptp(grouped["r2_by_repeat"]) == pytest.approx(0.0)
    assert V.repeated_cv_r2(x, y, folds=2, repeats=5, seed=1)["n_units"] == 6
    with pytest.raises(InputError, match="groups: expected one label per point"):
        V.repeated_cv_r2(x, y, groups=words[:5])
    with pytest.raises(InputError, match="folds: expected a whole number in \\[2, 3\\] \\(groups\\)"):
        V.repeated_cv_r2(x, y, folds=4, groups=words)
