import pytest
import torch

from bias_begets_bias.cli import InputError
from statistical_auditing.core.elbo import elbo_classify, elbo_timesteps, spread_order
from statistical_auditing.core.score_models import ScoreModel, alphas_cumprod_at

T = 1000


class GaussianClassModel(ScoreModel):
    """Exact epsilon posterior for data x0 ~ N(mu_c, s^2 I), one mean per condition.

    With x_t = a x0 + sigma eps (a = sqrt(abar), sigma = sqrt(1 - abar)),
    E[eps | x_t, c] = sigma / (a^2 s^2 + sigma^2) * (x_t - a mu_c): the ideal denoiser.
    Records every call so tests can inspect timesteps and batch sizes.
    """

    def __init__(self, means: dict[str, torch.Tensor], s: float):
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()
        self.timesteps = torch.arange(T - 1, -1, -1)
        self.device = torch.device("cpu")
        self.means, self.s = means, s
        self.calls: list[tuple[torch.Tensor, list[str]]] = []

    def encode(self, images):
        return images * 2 - 1

    def predict_eps(self, x_t, t, conditions):
        self.calls.append((t.clone(), list(conditions)))
        abar = alphas_cumprod_at(self.alphas_cumprod, t, x_t.ndim + 1)
        a, sigma2 = abar.sqrt(), 1 - abar
        mu = torch.stack([self.means[c] for c in conditions])[None]  # (1, K, ...)
        return sigma2.sqrt() / (abar * self.s ** 2 + sigma2) * (x_t[:, None] - a * mu)


def _problem(n_images=12, s=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (3, 4, 4)
    means = {name: torch.randn(shape, generator=g) * 0.6 for name in ("cat", "dog", "ship")}
    truth = torch.arange(n_images) % 3
    names = ["cat", "dog", "ship"]
    x0 = torch.stack([means[names[k]] for k in truth.tolist()]) + s * torch.randn((n_images, *shape), generator=g)
    return GaussianClassModel(means, s), x0, names, truth


def test_timesteps_are_evenly_spaced_and_inside_the_table():
    t = elbo_timesteps(100, 1000)
    assert t[0] == 5 and t[-1] == 995 and (t.diff() == 10).all()
    assert elbo_timesteps(1000, 1000).tolist() == list(range(1000))  # each once, never 1000
    assert elbo_timesteps(3, 1000).tolist() == [166, 500, 833]
    assert elbo_timesteps(1, 1000).tolist() == [500]
    for n in (7, 99, 101, 999, 1001, 2500):
        t = elbo_timesteps(n, 1000)
        assert t.min() >= 0 and t.max() <= 999 and len(t) == n
        assert t.diff().min() >= 0 and t.diff().max() - t.diff().min() <= 1


def test_spread_order_is_a_permutation_with_spread_prefixes():
    order = spread_order(10)
    assert sorted(order.tolist()) == list(range(10))
    assert order[:2].tolist() == [0, 8] and set(order[:4].tolist()) == {0, 2, 4, 8}


def test_classifies_images_drawn_from_each_class():
    model, x0, names, truth = _problem()
    out = elbo_classify(model, x0, names, n_samples=20, seed=0)
    assert (out["pred"] == truth).float().mean() >= 0.9
    assert out["scores"].shape == (12, 3) and torch.allclose(out["probs"].sum(1), torch.ones(12, dtype=torch.float64))
    assert (out["n_evals"] == 20 * 3).all()
    # One predict_eps call per timestep carries all candidates, at timesteps of the table.
    assert len(model.calls) == 20 and all(c == names for _, c in model.calls)
    seen = torch.cat([t for t, _ in model.calls])
    assert seen.max() <= T - 1 and sorted(set(seen.tolist())) == elbo_timesteps(20, T).tolist()


def test_one_call_per_condition_gives_the_same_answer():
    model, x0, names, _ = _problem(n_images=4)
    together = elbo_classify(model, x0, names, n_samples=6)
    separate = elbo_classify(model, x0, names, n_samples=6, batch_conditions=False)
    assert torch.allclose(together["scores"], separate["scores"], atol=1e-6)
    assert len(model.calls) == 6 + 6 * 3


def test_shared_noise_and_seed_make_decisions_deterministic():
    model, x0, names, _ = _problem(n_images=6)
    a = elbo_classify(model, x0, names, n_samples=10, seed=3)
    b = elbo_classify(model, x0, names, n_samples=10, seed=3)
    c = elbo_classify(model, x0, names, n_samples=10, seed=4)
    assert torch.equal(a["scores"], b["scores"]) and torch.equal(a["pred"], b["pred"])
    assert not torch.equal(a["scores"], c["scores"])
    # The same condition twice sees the same noise, hence exactly the same score.
    twice = elbo_classify(model, x0, ["cat", "dog", "cat"], n_samples=10, seed=3)
    assert torch.equal(twice["scores"][:, 0], twice["scores"][:, 2])
    # ... so where "cat" beats "dog", the tie between its two copies names no class (scoring.decide)
    cat_wins = elbo_classify(model, x0, ["cat", "dog"], n_samples=10, seed=3)["pred"] == 0
    assert 0 < int(cat_wins.sum()) < 6
    assert twice["pred"].tolist() == [-1 if wins else 1 for wins in cat_wins.tolist()]
    # Noise is shared across images too, so an image's result does not depend on its batch.
    alone = elbo_classify(model, x0[2:3], names, n_samples=10, seed=3)
    assert torch.allclose(alone["scores"][0], a["scores"][2], atol=1e-6)


def test_pruning_saves_evaluations_and_keeps_the_true_class():
    model, x0, names, truth = _problem()
    full = elbo_classify(model, x0, names, n_samples=20, seed=0)
    model.calls.clear()
    pruned = elbo_classify(model, x0, names, n_samples=20, seed=0, prune_schedule=[(5, 2), (10, 1)])
    assert (pruned["n_evals"] == 3 * 5 + 2 * 5 + 1 * 10).all()
    assert (pruned["n_evals"] < full["n_evals"]).all()
    assert (pruned["pred"] == truth).float().mean() >= 0.9
    # Survivors saw every timestep with the same noise: their scores are the unpruned ones.
    rows = torch.arange(12)
    assert torch.allclose(pruned["scores"][rows, pruned["pred"]], full["scores"][rows, pruned["pred"]], atol=1e-9)
    assert (pruned["probs"].max(1).values == 1).all() and torch.isinf(pruned["scores"]).sum() == 12 * 2
    # Pruned candidates were not sent to the model any more.
    assert sum(len(conds) * len(t) for t, conds in model.calls) == pruned["n_evals"].sum()


@pytest.mark.parametrize("loss", ["l1", "huber"])
def test_other_losses_also_classify(loss):
    model, x0, names, truth = _problem()
    out = elbo_classify(model, x0, names, n_samples=20, loss=loss)
    assert (out["pred"] == truth).float().mean() >= 0.9


def test_bad_arguments_are_rejected():
    model, x0, names, _ = _problem(n_images=2)
    with pytest.raises(InputError, match="loss"):
        elbo_classify(model, x0, names, loss="l3")
    with pytest.raises(InputError, match="timesteps"):
        elbo_classify(model, x0, names, timesteps=[0, T])
    with pytest.raises(InputError, match="prune_schedule"):
        elbo_classify(model, x0, names, n_samples=10, prune_schedule=[(5, 2), (4, 1)])
    with pytest.raises(InputError, match="prune_schedule"):
        elbo_classify(model, x0, names, n_samples=10, prune_schedule=[(5, 4)])
    with pytest.raises(InputError, match="conditions"):
        elbo_classify(model, x0, [])
    out = elbo_classify(model, x0, names, timesteps=[0, 999])
    assert out["timesteps"].tolist() == [0, 999] and (out["n_evals"] == 6).all()
