import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from statistical_auditing.core import utils_classifier as uc
from statistical_auditing.core.utils_classifier import score_decomp, simplex_least_squares


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def _objective(X, y, w):
    return ((w[:, :, None] * X).sum(1) - y).pow(2).sum(-1)


def _slsqp(A, b):
    """Reference: scipy's SLSQP on min ||A w - b||^2, w >= 0, sum w = 1 (A is D x K)."""
    K = A.shape[1]
    result = minimize(lambda v: float(np.sum((A @ v - b) ** 2)), np.full(K, 1.0 / K),
                      jac=lambda v: 2 * A.T @ (A @ v - b), method="SLSQP", bounds=[(0, 1)] * K,
                      constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1, "jac": lambda v: np.ones(K)}],
                      options={"ftol": 1e-14, "maxiter": 1000})
    # SLSQP may stop with "positive directional derivative" once at rounding level; its
    # point must still be feasible to serve as a reference.
    assert result.x.min() >= -1e-9 and abs(result.x.sum() - 1) < 1e-9, result.message
    return result.x, result.fun


# ---------- simplex_least_squares: hand-checked cases

def test_two_candidates_closed_form_by_hand():
    X = _t([[[1, 0], [0, 1]]] * 3)
    y = _t([[0.5, 0.5], [2, 0], [0.25, 0.75]])
    # w1 = clip(<y - x2, x1 - x2> / ||x1 - x2||^2, 0, 1): 1/2, clip(3/2) = 1, 1/4
    w = simplex_least_squares(X, y)
    assert torch.allclose(w, _t([[0.5, 0.5], [1, 0], [0.25, 0.75]]), atol=1e-12)


def test_two_identical_candidates_give_a_split_not_nan():
    X = _t([[[1, 2, 3], [1, 2, 3]]])
    w = simplex_least_squares(X, _t([[0, 0, 0]]))
    assert torch.isfinite(w).all() and torch.allclose(w.sum(-1), _t([1.0]))


def test_three_candidates_worked_example_by_hand():
    # Triangle x1 = (0, 0), x2 = (2, 0), x3 = (0, 2).
    tri = [[0, 0], [2, 0], [0, 2]]
    X = _t([tri] * 4)
    y = _t([[0.5, 0.5],   # inside: y = w2 x2 + w3 x3 with w2 = w3 = 1/4, w1 = 1/2
            [1, 1],       # on the edge x2-x3, at its midpoint
            [2, 2],       # outside beyond that edge: nearest point (1, 1)
            [-1, -1]])    # outside beyond x1: nearest point is the vertex x1
    w = simplex_least_squares(X, y)
    expected = _t([[0.5, 0.25, 0.25], [0, 0.5, 0.5], [0, 0.5, 0.5], [1, 0, 0]])
    assert torch.allclose(w, expected, atol=1e-12)


def test_identity_candidates_is_euclidean_projection_on_the_probability_simplex():
    # With X = I the problem is the projection of y on the simplex. For y = (0.6, 0.3, -0.3)
    # the threshold is tau = (0.6 + 0.3 - 1) / 2 = -0.05 and w = max(y - tau, 0) = (0.65, 0.35, 0).
    X = torch.eye(3, dtype=torch.float64)[None]
    w = simplex_least_squares(X, _t([[0.6, 0.3, -0.3]]))
    assert torch.allclose(w, _t([[0.65, 0.35, 0.0]]), atol=1e-12)
    w = simplex_least_squares(X, _t([[5.0, 0.0, 0.0]]))
    assert torch.allclose(w, _t([[1.0, 0.0, 0.0]]), atol=1e-12)


@pytest.mark.parametrize("K", [3, 5, 7])
def test_exact_convex_mixture_is_recovered(K):
    g = torch.Generator().manual_seed(K)
    X = torch.randn(16, K, 40, generator=g, dtype=torch.float64)
    w_true = torch.distributions.Dirichlet(torch.ones(K, dtype=torch.float64)).sample((16,))
    y = (w_true[:, :, None] * X).sum(1)
    assert torch.allclose(simplex_least_squares(X, y), w_true, atol=1e-9)


@pytest.mark.parametrize("K,D", [(3, 30), (4, 3), (6, 50), (7, 64), (8, 5)])
def test_matches_scipy_slsqp_on_random_problems(K, D):
    g = torch.Generator().manual_seed(100 * K + D)
    X = torch.randn(12, K, D, generator=g, dtype=torch.float64)
    y = torch.randn(12, D, generator=g, dtype=torch.float64) * 0.8 + X.mean(1)
    w = simplex_least_squares(X, y)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(12, dtype=torch.float64))
    ours = _objective(X, y, w)
    for i in range(12):
        w_ref, f_ref = _slsqp(X[i].numpy().T, y[i].numpy())
        assert ours[i].item() <= f_ref + 1e-9 * (1 + f_ref)
        np.testing.assert_allclose(w[i].numpy(), w_ref, atol=1e-6)


def test_active_set_and_enumeration_agree_and_are_certified():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(200, 6, 4, generator=g, dtype=torch.float64)
    y = torch.randn(200, 4, generator=g, dtype=torch.float64)
    G, b = uc._gram_problem(X, y)
    w_active, certified = uc._simplex_active_set(G, b, max_iter=40)
    w_enum = uc._simplex_enumerate(G, b)
    assert certified.all()
    assert torch.allclose(uc._objective(G, b, w_active), uc._objective(G, b, w_enum), atol=1e-12)
    assert (uc.frank_wolfe_gap(G, b, w_enum) < 1e-9).all()
    # A non-optimal point has a positive gap: the certificate can fail.
    assert (uc.frank_wolfe_gap(G, b, torch.full_like(w_enum, 1 / 6)) > 1e-6).any()


def test_uncertified_problems_fall_back_to_enumeration(monkeypatch):
    X = torch.eye(3, dtype=torch.float64)[None]
    real = uc._simplex_active_set
    monkeypatch.setattr(uc, "_simplex_active_set",
                        lambda G, b, max_iter: (torch.full_like(b, 1 / 3), torch.zeros(len(b), dtype=torch.bool)))
    w = simplex_least_squares(X, _t([[0.6, 0.3, -0.3]]))
    assert torch.allclose(w, _t([[0.65, 0.35, 0.0]]), atol=1e-12)
    monkeypatch.setattr(uc, "_simplex_active_set", real)


def test_degenerate_candidates_do_not_produce_nan():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, 2, 10, generator=g, dtype=torch.float64)
    X = torch.stack([base[:, 0], base[:, 0], base[:, 1]], dim=1)  # a duplicated candidate
    y = torch.randn(8, 10, generator=g, dtype=torch.float64)
    w = simplex_least_squares(X, y)
    assert torch.isfinite(w).all()
    merged = torch.stack([w[:, 0] + w[:, 1], w[:, 2]], dim=1)
    assert torch.allclose(_objective(X, y, w), _objective(base, y, simplex_least_squares(base, y)), atol=1e-10)
    assert torch.allclose(merged, simplex_least_squares(base, y), atol=1e-8)
    # All candidates identical, and many points on a line (D = 1): any minimiser, never NaN.
    same = simplex_least_squares(torch.ones(2, 4, 5, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64))
    assert torch.isfinite(same).all() and torch.allclose(same.sum(-1), torch.ones(2, dtype=torch.float64))
    line = simplex_least_squares(_t([[[0.0], [1.0], [2.0], [3.0], [4.0]]]), _t([[2.5]]))
    assert torch.allclose((line * _t([[0, 1, 2, 3, 4]])).sum(-1), _t([2.5]), atol=1e-10)


def test_inputs_are_not_modified():
    g = torch.Generator().manual_seed(2)
    for K in (2, 5):
        X = torch.randn(3, K, 6, generator=g, dtype=torch.float64)
        y = torch.randn(3, 6, generator=g, dtype=torch.float64)
        X_copy, y_copy = X.clone(), y.clone()
        simplex_least_squares(X, y)
        assert torch.equal(X, X_copy) and torch.equal(y, y_copy)


def test_output_dtype_and_validation():
    X = torch.randn(2, 3, 4, dtype=torch.float16)
    assert simplex_least_squares(X, torch.randn(2, 4, dtype=torch.float16)).dtype == torch.float64
    assert simplex_least_squares(torch.randn(1, 1, 4), torch.randn(1, 4)).tolist() == [[1.0]]
    with pytest.raises(ValueError, match="disagree"):
        simplex_least_squares(torch.randn(2, 3, 4), torch.randn(2, 5))
    for K in (1, 2, 3):
        with pytest.raises(ValueError, match="NaN"):
            simplex_least_squares(torch.full((1, K, 2), math.nan), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="NaN"):
        simplex_least_squares(torch.zeros(1, 3, 2), torch.tensor([[math.inf, 0.0]]))
    with pytest.raises(ValueError, match="at most"):
        simplex_least_squares(torch.randn(1, uc.MAX_CANDIDATES + 1, 2), torch.randn(1, 2))


# ---------- score_decomp

def test_simplex_weights_invariant_to_parameterisation():
    g = torch.Generator().manual_seed(7)
    x_t = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    eps_c = torch.randn(5, 4, 3, 4, 4, generator=g, dtype=torch.float64)
    eps_b = 0.3 * eps_c[:, 0] + 0.5 * eps_c[:, 2] + 0.2 * torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    w = score_decomp(eps_b, eps_c)
    a, c = -1.7, 0.8  # eps -> a eps + c x_t, the same map for every prompt
    w_affine = score_decomp(a * eps_b + c * x_t, a * eps_c + c * x_t[:, None])
    assert torch.allclose(w, w_affine, atol=1e-9)
    # v-prediction, v = eps / sqrt(abar) - sqrt((1 - abar) / abar) x_t, is such a map.
    abar = 0.3
    to_v = lambda e, x: e / math.sqrt(abar) - math.sqrt((1 - abar) / abar) * x  # noqa: E731
    assert torch.allclose(w, score_decomp(to_v(eps_b, x_t), to_v(eps_c, x_t[:, None])), atol=1e-9)
    # A shift applied to one prompt only is not such a map and does change the weights.
    shifted = eps_c.clone()
    shifted[:, 0] += x_t
    assert not torch.allclose(w, score_decomp(eps_b, shifted), atol=1e-3)


def test_cosine_and_lp_by_hand():
    y = _t([[1, 0]])
    X = _t([[[1, 0], [0, 1], [-1, 0]]])
    assert torch.allclose(score_decomp(y, X, method="cosine"), _t([[1, 0, -1]]))
    assert torch.allclose(score_decomp(y, X, method="lp", p=1), _t([[0, -2, -2]]))
    assert torch.allclose(score_decomp(y, X, method="lp", p=2), _t([[0, -math.sqrt(2), -2]]))
    assert score_decomp(torch.zeros(1, 2), X, method="cosine").abs().max() == 0  # no NaN
    with pytest.raises(ValueError, match="integer"):
        score_decomp(y, X, method="lp", p=0)
    with pytest.raises(ValueError, match="unknown method"):
        score_decomp(y, X, method="dot")


def test_pca_recovers_weights_of_data_that_live_in_a_plane():
    g = torch.Generator().manual_seed(11)
    plane_X = torch.randn(6, 3, 2, generator=g, dtype=torch.float64)
    plane_y = torch.randn(6, 2, generator=g, dtype=torch.float64)
    # Embed the plane in 48 dimensions with an orthonormal map and a common offset.
    Q, _ = torch.linalg.qr(torch.randn(48, 2, generator=g, dtype=torch.float64))
    offset = torch.randn(48, generator=g, dtype=torch.float64)
    X = plane_X @ Q.T + offset
    y = plane_y @ Q.T + offset
    expected = simplex_least_squares(plane_X, plane_y)
    plain = dict(method="pca", pca_normalize=False)
    assert torch.allclose(score_decomp(y, X, pca_components=2, **plain), expected, atol=1e-8)
    # One component keeps only the main direction, which in general changes the answer.
    assert not torch.allclose(score_decomp(y, X, pca_components=1, **plain), expected, atol=1e-3)
    with pytest.raises(ValueError, match="pca_components"):
        score_decomp(y, X, method="pca", pca_components=5)


def _original_pca_weights(y, X, dim=2):
    """The original's pca_linear_program for one image, step by step: stack, subtract the mean
    row, L2-normalise each row (torch.nn.functional.normalize), torch.pca_lowrank, project the
    rows on V[:, :dim], then the simplex program (here scipy's SLSQP instead of cvxpy)."""
    rows = torch.cat([y[None], X]).flatten(start_dim=1).clone()
    rows -= rows.mean(dim=0)[None, :]
    rows = torch.nn.functional.normalize(rows)
    torch.manual_seed(0)
    _, _, V = torch.pca_lowrank(rows)
    projected = (rows @ V[:, :dim]).numpy()
    weights, _ = _slsqp(projected[1:].T, projected[0])
    return weights


def _numpy_pca_weights(y, X, dim=2):
    """The same from numpy's SVD of the hand-normalised rows."""
    rows = np.concatenate([y[None], X]).reshape(len(X) + 1, -1)
    rows = rows - rows.mean(axis=0)
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    rows = rows - rows.mean(axis=0)
    _, _, vt = np.linalg.svd(rows, full_matrices=False)
    projected = rows @ vt[:dim].T
    weights, _ = _slsqp(projected[1:].T, projected[0])
    return weights


@pytest.mark.parametrize("K", [2, 3, 4])
def test_pca_normalisation_is_the_originals(K):
    g = torch.Generator().manual_seed(20 + K)
    # candidates of very different lengths, so that normalising the rows matters
    X = torch.randn(5, K, 3, 4, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 4.0, 0.5, 2.0][:K]).view(
        1, K, 1, 1, 1)
    y = 0.6 * X[:, 0] + 0.4 * X[:, 1] + 0.3 * torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    ours = score_decomp(y, X, method="pca")  # the defaults: 2 components, rows normalised
    for b in range(5):
        assert np.allclose(ours[b].numpy(), _original_pca_weights(y[b], X[b]), atol=1e-6)
        assert np.allclose(ours[b].numpy(), _numpy_pca_weights(y[b].numpy(), X[b].numpy()), atol=1e-6)
    # the normalisation changes the answer (so the comparison above can fail)
    assert not torch.allclose(ours, score_decomp(y, X, method="pca", pca_normalize=False), atol=1e-3)


def test_score_decomp_shapes():
    eps_b = torch.randn(3, 4, 8, 8)
    eps_c = torch.randn(3, 2, 4, 8, 8)
    for method in uc.SCORE_METHODS:
        assert score_decomp(eps_b, eps_c, method=method).shape == (3, 2)
    with pytest.raises(ValueError, match="does not match"):
        score_decomp(torch.randn(3, 4, 8, 7), eps_c)
