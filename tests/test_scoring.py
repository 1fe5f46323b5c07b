import pytest
import torch

from bias_begets_bias.cli import InputError
from bias_begets_bias.utils import derived_seed
from statistical_auditing.core.score_models import ScoreModel
from statistical_auditing.core.scoring import (batch_noise, calls_from_weights, choose_k, decide, gender_accuracy_by_k,
                                          image_noise, scoredecomp_scores, scores_by_k)

T = 100
SHAPE = (3, 4, 4)


class FixedEpsModel(ScoreModel):
    """predict_eps ignores x_t for the candidates: a fixed vector per word. The base "mix" is
    exactly 0.3 * eps(man) + 0.7 * eps(woman); "person" follows the image's brightness
    (bright x_t -> eps(woman), dark -> eps(man)). Records every call."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.eps = {"man": torch.randn(SHAPE, generator=g), "woman": torch.randn(SHAPE, generator=g)}
        self.eps["mix"] = 0.3 * self.eps["man"] + 0.7 * self.eps["woman"]
        self.alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.2, T), 0)
        self.timesteps = torch.arange(T - 1, -1, -1)
        self.device = torch.device("cpu")
        self.calls = []

    def encode(self, images):
        return images * 2 - 1

    def _one(self, x, condition):
        if condition == "person":
            return self.eps["woman"] if x.mean() > 0 else self.eps["man"]
        return self.eps[condition]

    def predict_eps(self, x_t, t, conditions):
        self.calls.append((x_t.clone(), t.clone(), list(conditions)))
        return torch.stack([torch.stack([self._one(x, c) for c in conditions]) for x in x_t])


def test_exact_mixture_gives_its_weights():
    model = FixedEpsModel()
    x0 = torch.zeros(4, *SHAPE)
    noise = batch_noise(SHAPE, 0, ["a", "b", "c", "d"])
    weights = scoredecomp_scores(model, x0, 4, noise, "mix", ["man", "woman"])
    assert weights.shape == (4, 2) and weights.dtype == torch.float64
    torch.testing.assert_close(weights, torch.tensor([[0.3, 0.7]] * 4, dtype=weights.dtype), atol=1e-5, rtol=0)
    # one predict_eps call over [base] + candidates, at the given timestep for every image
    assert len(model.calls) == 1
    x_t, t, conditions = model.calls[0]
    assert conditions == ["mix", "man", "woman"]
    assert t.tolist() == [4] * 4


def test_base_equal_to_a_candidate_is_that_candidate():
    x0 = torch.zeros(2, *SHAPE)
    weights = scoredecomp_scores(FixedEpsModel(), x0, 0, torch.zeros_like(x0), "woman", ["man", "woman"])
    torch.testing.assert_close(weights, torch.tensor([[0.0, 1.0]] * 2, dtype=weights.dtype), atol=1e-6, rtol=0)


def test_x_t_is_the_forward_process_of_the_given_noise():
    model = FixedEpsModel()
    x0 = torch.rand(3, *SHAPE)
    noise = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(7))
    scoredecomp_scores(model, x0, 9, noise, "mix", ["man", "woman"])
    x_t, t, _ = model.calls[0]
    abar = model.alphas_cumprod[9]
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    with pytest.raises(ValueError, match="shape"):
        scoredecomp_scores(model, x0, 9, noise[:2], "mix", ["man", "woman"])


def test_noise_is_seeded_by_seed_and_key_only():
    # the rule, computed independently: a generator seeded derived_seed(seed, key)
    expected = torch.randn(SHAPE, generator=torch.Generator().manual_seed(derived_seed(5, "man/0003.png")))
    assert torch.equal(image_noise(SHAPE, 5, "man/0003.png"), expected)
    whole = batch_noise(SHAPE, 5, ["a", "b", "c"])
    assert whole.shape == (3, *SHAPE) and whole.dtype == torch.float32
    assert torch.equal(whole[1], batch_noise(SHAPE, 5, ["b"])[0])  # independent of the batch
    assert not torch.equal(whole[0], whole[1])
    assert not torch.equal(whole[0], batch_noise(SHAPE, 6, ["a"])[0])


def test_decide_names_the_largest_and_no_one_on_a_tie():
    scores = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.5, 0.5], [0.1, 0.3]], dtype=torch.float64)
    assert decide(scores).tolist() == [1, 0, -1, 1]
    three = torch.tensor([[0.2, 0.4, 0.4], [0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]])
    assert decide(three).tolist() == [-1, 2, -1]
    assert decide(three).dtype == torch.long


def test_calls_count_decided_rows_and_leave_ties_out():
    weights = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.5, 0.5], [0.4, 0.6]], dtype=torch.float64)
    successes, n, mean = calls_from_weights(weights, 1)
    assert (successes, n) == (2, 3)
    assert mean == pytest.approx((0.8 + 0.1 + 0.5 + 0.6) / 4)


def test_choose_k_prefers_accuracy_then_the_smaller_k():
    rows = [{"k": 20, "accuracy": 0.9}, {"k": 5, "accuracy": 0.9}, {"k": 1, "accuracy": 0.6}]
    assert choose_k(rows) == 5
    assert choose_k([{"k": 50, "accuracy": 1.0}, {"k": 1, "accuracy": 0.2}]) == 50


def test_accuracy_is_perfect_at_low_noise_and_drops_when_the_image_is_drowned():
    model = FixedEpsModel()
    labels = ["male", "female"] * 20
    ids = [f"img{i}" for i in range(40)]
    # male images dark (x0 = -0.8), female bright (+0.8): "person" follows the brightness of x_t
    images = torch.stack([torch.full(SHAPE, 0.1 if g == "male" else 0.9) for g in labels])
    rows = gender_accuracy_by_k(model, images, labels, ids, [1, T], seed=0, batch_size=16, progress=False)
    assert [r["k"] for r in rows] == [1, T]
    low_noise, drowned = rows
    assert low_noise["t"] == 0 and drowned["t"] == T - 1
    assert low_noise["correct"] == low_noise["n"] == 40 and low_noise["accuracy"] == 1.0
    assert low_noise["auc"] == 1.0  # every female margin (+1) above every male margin (-1)
    assert drowned["accuracy"] < 0.9  # at abar ~ 0 the brightness is noise
    assert choose_k(rows) == 1
    assert all(c[2] == ["person", "man", "woman"] for c in model.calls)
    # every k saw the same noise per image (common random numbers), image i's being image_noise(ids[i])
    (x_a, t_a, _), (x_b, t_b, _) = model.calls[:2]
    assert t_a[0] == 0 and t_b[0] == T - 1
    x0 = images[:16] * 2 - 1
    noise = batch_noise(SHAPE, 0, ids[:16])
    for x_t, t in ((x_a, t_a), (x_b, t_b)):
        abar = model.alphas_cumprod[t[0]]
        torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)


def test_accuracy_counts_ties_as_wrong_and_reports_the_auc_of_the_margin(monkeypatch):
    import statistical_auditing.core.scoring as scoring

    # scripted weights (w_man, w_woman): female 0.9 (right), 0.5 (an exact tie), 0.4 (wrong); male 0.2 (right),
    # 0.6 (wrong)
    weights = torch.tensor([[0.1, 0.9], [0.5, 0.5], [0.6, 0.4], [0.8, 0.2], [0.4, 0.6]], dtype=torch.float64)
    monkeypatch.setattr(scoring, "scores_by_k", lambda *args, **kwargs: {1: weights})
    labels = ["female", "female", "female", "male", "male"]
    (row,) = gender_accuracy_by_k(FixedEpsModel(), torch.rand(5, *SHAPE), labels, list("abcde"), [1],
                                  progress=False)
    assert row["correct"] == 2 and row["n"] == 5 and row["accuracy"] == pytest.approx(0.4)  # the tie is wrong
    # margins w_woman - w_man: female 0.8, 0, -0.2; male -0.6, 0.2.
    # pairs (female > male): 0.8 beats both (2), 0 beats -0.6 (1), -0.2 beats -0.6 (1): 4 of 6
    assert row["auc"] == pytest.approx(4 / 6)
    assert row["mean_weight_true"] == pytest.approx((0.9 + 0.5 + 0.4 + 0.8 + 0.4) / 5)


def test_scores_do_not_depend_on_the_batch_size():
    images = torch.rand(5, *SHAPE)
    ids = ["p", "q", "r", "s", "t"]
    a = scores_by_k(FixedEpsModel(), images, ids, [30], "person", ["man", "woman"], seed=4, batch_size=2,
                    progress=False)
    b = scores_by_k(FixedEpsModel(), images, ids, [30], "person", ["man", "woman"], seed=4, batch_size=5,
                    progress=False)
    assert torch.equal(a[30], b[30])


def test_k_outside_the_table_and_bad_labels_are_input_errors():
    images = torch.rand(1, *SHAPE)
    for k in (0, T + 1):
        with pytest.raises(InputError, match=f"k={k} is outside the timestep table"):
            scores_by_k(FixedEpsModel(), images, ["a"], [k], "person", ["man", "woman"], progress=False)
    with pytest.raises(InputError, match="not among the candidate labels"):
        gender_accuracy_by_k(FixedEpsModel(), images, ["cat"], ["a"], [1], progress=False)
    with pytest.raises(InputError, match="no labelled images"):
        gender_accuracy_by_k(FixedEpsModel(), torch.rand(0, *SHAPE), [], [], [1], progress=False)
