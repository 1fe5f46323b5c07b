import pytest
import torch

from diffusion_from_scratch.cli import InputError
from statistical_auditing.score_models import ScoreModel
from statistical_auditing.scoring import (calls_from_weights, choose_k, draw_noise, gender_accuracy_by_k,
                                          scoredecomp_weights)

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
    weights = scoredecomp_weights(model, x0, "mix", ["man", "woman"], k=5, seed_or_generator=0)
    assert weights.shape == (4, 2)
    torch.testing.assert_close(weights, torch.tensor([[0.3, 0.7]] * 4, dtype=weights.dtype), atol=1e-5, rtol=0)
    # one predict_eps call over [base] + candidates, at timestep table[-k] for every image
    assert len(model.calls) == 1
    x_t, t, conditions = model.calls[0]
    assert conditions == ["mix", "man", "woman"]
    assert t.tolist() == [int(model.timesteps[-5])] * 4 == [4] * 4


def test_base_equal_to_a_candidate_is_that_candidate():
    weights = scoredecomp_weights(FixedEpsModel(), torch.zeros(2, *SHAPE), "woman", ["man", "woman"], 1, 0)
    torch.testing.assert_close(weights, torch.tensor([[0.0, 1.0]] * 2, dtype=weights.dtype), atol=1e-6, rtol=0)


def test_noise_is_the_forward_process_with_the_given_seed():
    model = FixedEpsModel()
    x0 = torch.rand(3, *SHAPE)
    scoredecomp_weights(model, x0, "mix", ["man", "woman"], k=10, seed_or_generator=7)
    x_t, t, _ = model.calls[0]
    abar = model.alphas_cumprod[9]
    noise = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)


def test_per_image_seeds_make_noise_independent_of_batching():
    whole = draw_noise((4, *SHAPE), [11, 12, 13, 14])
    halves = torch.cat([draw_noise((2, *SHAPE), [11, 12]), draw_noise((2, *SHAPE), [13, 14])])
    assert torch.equal(whole, halves)
    assert not torch.equal(whole[0], whole[1])
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(draw_noise((2, *SHAPE), generator), draw_noise((2, *SHAPE), 3))
    with pytest.raises(ValueError, match="3 per-image seeds for a batch of 2"):
        draw_noise((2, *SHAPE), [1, 2, 3])


def test_k_outside_the_table_is_an_input_error():
    with pytest.raises(InputError, match="outside the timestep table"):
        scoredecomp_weights(FixedEpsModel(), torch.zeros(1, *SHAPE), "mix", ["man", "woman"], k=T + 1,
                            seed_or_generator=0)
    with pytest.raises(InputError, match="outside the timestep table"):
        scoredecomp_weights(FixedEpsModel(), torch.zeros(1, *SHAPE), "mix", ["man", "woman"], k=0,
                            seed_or_generator=0)


def test_calls_count_argmax_and_leave_ties_out():
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
    # male images dark (x0 = -0.8), female bright (+0.8): "person" follows the brightness of x_t
    images = torch.stack([torch.full(SHAPE, 0.1 if g == "male" else 0.9) for g in labels])
    rows = gender_accuracy_by_k(model, images, labels, [1, T], seed=0, batch_size=16, progress=False)
    assert [r["k"] for r in rows] == [1, T]
    low_noise, drowned = rows
    assert low_noise["t"] == 0 and drowned["t"] == T - 1
    assert low_noise["correct"] == low_noise["n"] == 40 and low_noise["accuracy"] == 1.0
    assert low_noise["ci_low"] < 1.0 == low_noise["ci_high"]
    assert drowned["accuracy"] < 0.9  # at abar ~ 0 the brightness is noise
    assert choose_k(rows) == 1
    assert all(c[2] == ["person", "man", "woman"] for c in model.calls)
    # every k saw the same noise per image (common random numbers): recover it from x_t
    (x_a, t_a, _), (x_b, t_b, _) = model.calls[:2]
    assert t_a[0] == 0 and t_b[0] == T - 1
    x0 = images[:16] * 2 - 1

    def noise_of(x_t, t):
        abar = model.alphas_cumprod[t[0]]
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    torch.testing.assert_close(noise_of(x_a, t_a), noise_of(x_b, t_b), atol=2e-3, rtol=0)


def test_accuracy_does_not_depend_on_the_batch_size():
    labels = ["male", "female", "female", "male", "female"]
    images = torch.rand(5, *SHAPE)
    a = gender_accuracy_by_k(FixedEpsModel(), images, labels, [30], seed=4, batch_size=2, progress=False)
    b = gender_accuracy_by_k(FixedEpsModel(), images, labels, [30], seed=4, batch_size=5, progress=False)
    assert a == b


def test_accuracy_rejects_unknown_labels_and_no_images():
    with pytest.raises(InputError, match="not among the candidate labels"):
        gender_accuracy_by_k(FixedEpsModel(), torch.rand(1, *SHAPE), ["cat"], [1], progress=False)
    with pytest.raises(InputError, match="no labelled images"):
        gender_accuracy_by_k(FixedEpsModel(), torch.rand(0, *SHAPE), [], [1], progress=False)
