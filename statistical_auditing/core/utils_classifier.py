"""ScoreDecomp and its variants: how a diffusion model itself sees the mix of an image.

Given the noise prediction for a base prompt, y = eps(x_t, base), and for K candidate
prompts, X = [eps(x_t, c_1), ..., eps(x_t, c_K)], ScoreDecomp reads the model's view of
the image as the convex mixture of candidate predictions closest to the base prediction:

    w* = argmin_w || sum_k w_k x_k - y ||_2   subject to  w >= 0,  sum_k w_k = 1.

The original solved this with cvxpy, one image at a time; ``simplex_least_squares`` solves
it exactly and batched (closed form for K = 2; for K >= 3 a primal active-set method whose
answer is certified optimal, with enumeration of all simplex faces as the fallback), at a
cost independent of the image size after one Gram-matrix product.
"""
from __future__ import annotations

import torch

# Largest K solved exactly: enumeration visits 2^K - 1 faces, each a (K+1)^2 KKT system.
MAX_CANDIDATES = 12
# A face's solution counts as feasible when its smallest weight is above -FEASIBILITY_TOL
# (weights sum to one, so this is an absolute tolerance on proportions).
FEASIBILITY_TOL = 1e-9
# Certificate tolerance on the Frank-Wolfe gap, relative to the size of the (scaled) data.
GAP_TOL = 1e-10
# Per-chunk budget of KKT entries in the enumeration, so memory stays bounded.
_CHUNK_ELEMENTS = 1 << 22
# Per-chunk budget of float64 entries when forming the Gram matrices.
_GRAM_CHUNK_ELEMENTS = 1 << 20

SCORE_METHODS = ("simplex", "cosine", "lp", "pca")


def _check_problem(X: torch.Tensor, y: torch.Tensor) -> None:
    if X.ndim != 3 or y.ndim != 2:
        raise ValueError(f"expected X of shape (B, K, D) and y of shape (B, D); got {tuple(X.shape)} and {tuple(y.shape)}")
    if X.shape[0] != y.shape[0] or X.shape[2] != y.shape[1]:
        raise ValueError(f"X {tuple(X.shape)} and y {tuple(y.shape)} disagree on B or D")
    if X.shape[1] < 1:
        raise ValueError("need at least one candidate (K >= 1)")


def _check_finite(*tensors: torch.Tensor) -> None:
    """NaN or infinity anywhere in X or y reaches these reductions (inf - inf = NaN), so
    checking the small reduced tensors is enough and far cheaper than scanning X."""
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError("X or y contains NaN or infinite values")


def _simplex_two(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """K = 2 in closed form: the projection of y on the segment [x2, x1].

    w1 = clip(<y - x2, x1 - x2> / ||x1 - x2||^2, 0, 1), w2 = 1 - w1. When x1 == x2 every
    split is optimal; we return (1/2, 1/2).
    """
    B, _, D = X.shape
    num = torch.empty(B, dtype=torch.float64, device=X.device)
    den = torch.empty(B, dtype=torch.float64, device=X.device)
    chunk = max(1, _GRAM_CHUNK_ELEMENTS // (2 * D))
    for i in range(0, B, chunk):  # float64 copies in small chunks, as in _gram_problem
        x1, x2 = X[i:i + chunk, 0].to(torch.float64), X[i:i + chunk, 1].to(torch.float64)
        d = x1 - x2
        num[i:i + chunk] = ((y[i:i + chunk].to(torch.float64) - x2) * d).sum(-1)
        den[i:i + chunk] = (d * d).sum(-1)
    _check_finite(num, den)
    safe = den > 0
    w1 = torch.where(safe, num / torch.where(safe, den, torch.ones_like(den)), torch.full_like(den, 0.5))
    w1 = w1.clamp(0.0, 1.0)
    return torch.stack([w1, 1.0 - w1], dim=-1)


def _objective(G: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """f(w) = w^T G w - 2 b^T w for G (N, K, K), b (N, K) and w (N, ..., K)."""
    Gw = torch.einsum("nij,n...j->n...i", G, w)
    return (w * Gw).sum(-1) - 2.0 * torch.einsum("n...i,ni->n...", w, b)


def _solve_faces(G: torch.Tensor, b: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Minimiser of f(w) = w^T G w - 2 b^T w on the affine hull of each face.

    G (N, K, K), b (N, K), support (N, F, K) boolean. For a support S the problem
    min f(w) s.t. sum_S w = 1, w_j = 0 off S, has the KKT system (Boyd & Vandenberghe
    2004, sec. 10.1.1)

        [ G_SS  1 ] [ w_S    ]   [ b_S ]
        [ 1^T   0 ] [ lambda ] = [  1  ],

    embedded here in a (K+1) x (K+1) system with identity rows and columns off S, so all
    faces of all images are solved in one batched call. A singular system (duplicate or
    affinely dependent candidates) is solved with the pseudo-inverse, which returns one
    of its solutions. Returns w (N, F, K), exactly zero off S, not yet checked for w >= 0.
    """
    N, F_, K = support.shape
    maskf = support.to(G.dtype)
    M = torch.zeros(N, F_, K + 1, K + 1, dtype=G.dtype, device=G.device)
    M[..., :K, :K] = G[:, None] * (maskf[..., :, None] * maskf[..., None, :]) + torch.diag_embed(1.0 - maskf)
    M[..., :K, K] = maskf
    M[..., K, :K] = maskf
    rhs = torch.zeros(N, F_, K + 1, dtype=G.dtype, device=G.device)
    rhs[..., :K] = b[:, None, :] * maskf
    rhs[..., K] = 1.0
    sol, info = torch.linalg.solve_ex(M, rhs.unsqueeze(-1))
    sol = sol.squeeze(-1)
    bad = (info != 0) | ~torch.isfinite(sol).all(-1)
    if bad.any():
        sol[bad] = (torch.linalg.pinv(M[bad]) @ rhs[bad].unsqueeze(-1)).squeeze(-1)
    return torch.nan_to_num(sol[..., :K], nan=-1.0) * maskf


def _gap_tolerance(G: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rounding-level scale of the gradient G w - b for each problem."""
    return GAP_TOL * (1.0 + G.abs().amax(dim=(1, 2)) + b.abs().amax(dim=1))


def frank_wolfe_gap(G: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Optimality certificate for min_{w in simplex} f(w), f(w) = w^T G w - 2 b^T w.

    With g = G w - b (half the gradient), gap(w) = g.w - min_j g_j >= 0, and for convex f
    f(w) - f(w*) <= 2 gap(w) (Frank & Wolfe 1956; Jaggi 2013, sec. 2). gap(w) = 0 exactly
    when w satisfies the KKT conditions of the simplex (g_j equal on the support and no
    smaller off it), so a gap at rounding level certifies the global minimum.
    """
    g = torch.einsum("nij,nj->ni", G, w) - b
    return (g * w).sum(-1) - g.amin(-1)


def _simplex_enumerate(G: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Global minimiser of f over the simplex by solving every face (see ``_solve_faces``).

    The optimum lies in the relative interior of some face; taking S as the support of a
    vertex of the (convex, polyhedral) optimal set, that face's KKT matrix is nonsingular
    and its solution is w*. So among all face solutions with w >= 0 the one with the lowest
    objective is a global minimiser. Whatever a singular face returns is kept only if it
    is feasible and is scored by its recomputed objective, so it can never beat w*.
    """
    N, K = b.shape
    codes = torch.arange(1, 1 << K, device=G.device)
    faces = (codes[:, None] >> torch.arange(K, device=G.device)) & 1 == 1  # (2^K - 1, K)
    w = _solve_faces(G, b, faces.expand(N, -1, -1))
    feasible = w.amin(-1) >= -FEASIBILITY_TOL
    w = w.clamp_min(0.0)
    w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    objective = torch.where(feasible, _objective(G, b, w), torch.full_like(w[..., 0], float("inf")))
    best = objective.argmin(-1)  # the vertices are always feasible
    return w[torch.arange(N, device=G.device), best]


def _simplex_active_set(G: torch.Tensor, b: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal active-set method (Nocedal & Wright 2006, Algorithm 16.3) on the simplex.

    Start at the best vertex. Each iteration solves the KKT system of the current support
    S; if the step to that solution leaves the simplex, move to the first blocking
    constraint and drop it from S; otherwise move there and, unless every multiplier
    mu_j = g_j - g_S (j off S) is >= 0, add the most negative one. Returns the weights and
    whether each problem converged with a Frank-Wolfe gap at rounding level.
    """
    N, K = b.shape
    rows = torch.arange(N, device=G.device)
    start = (torch.diagonal(G, dim1=1, dim2=2) - 2.0 * b).argmin(-1)
    S = torch.zeros(N, K, dtype=torch.bool, device=G.device)
    S[rows, start] = True
    w = S.to(G.dtype)
    done = torch.zeros(N, dtype=torch.bool, device=G.device)
    tol = _gap_tolerance(G, b)
    for _ in range(max_iter):
        idx = (~done).nonzero().squeeze(-1)
        if idx.numel() == 0:
            break
        Gi, bi, Si, wi = G[idx], b[idx], S[idx], w[idx]
        w_new = _solve_faces(Gi, bi, Si[:, None])[:, 0]
        step = w_new - wi
        ratio = torch.where(Si & (step < 0), wi / (-step).clamp_min(torch.finfo(G.dtype).tiny),
                            torch.full_like(wi, float("inf")))
        alpha, blocking = ratio.min(-1)
        full = alpha >= 1.0
        local = torch.arange(idx.numel(), device=G.device)
        wi = torch.where(full[:, None], w_new, wi + alpha.clamp(max=1.0)[:, None] * step)
        blocked = local[~full]
        wi[blocked, blocking[~full]] = 0.0
        Si[blocked, blocking[~full]] = False
        wi = wi.clamp_min(0.0) * Si
        g = torch.einsum("nij,nj->ni", Gi, wi) - bi
        g_on_support = (g * wi).sum(-1)
        mu = torch.where(Si, torch.full_like(g, float("inf")), g - g_on_support[:, None])
        mu_min, entering = mu.min(-1)
        optimal = full & (mu_min >= -tol[idx])
        adding = full & ~optimal
        Si[local[adding], entering[adding]] = True
        S[idx], w[idx], done[idx] = Si, wi, optimal
    certified = done & (frank_wolfe_gap(G, b, w) <= 4.0 * tol) & (w.amin(-1) >= 0)
    return w, certified


def simplex_least_squares(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact, batched ScoreDecomp weights: argmin_{w in simplex} ||sum_k w_k X[:, k] - y||_2.

    X: (B, K, D) candidate vectors, y: (B, D) target. Returns w: (B, K), w >= 0, rows
    summing to one, in float64 whatever the input type (rounding the weights to float32
    would cost ~1e-8 of relative objective).

    - K = 1: w = 1.
    - K = 2: closed form, w1 = clip(<y - x2, x1 - x2> / ||x1 - x2||^2, 0, 1).
    - 3 <= K <= MAX_CANDIDATES: because sum w = 1, sum_k w_k x_k - y = sum_k w_k (x_k - r)
      - (y - r) for any reference r; with r the candidates' mean (to limit cancellation),
      the objective is w^T G w - 2 b^T w + const with G = (X - r)(X - r)^T (K x K) and
      b = (X - r)(y - r), so after this one matmul nothing depends on D. A primal
      active-set method solves it; any answer whose Frank-Wolfe gap is not at rounding
      level (``frank_wolfe_gap``) is recomputed by enumerating all faces of the simplex.

    When the minimiser is not unique (duplicate candidates, y equidistant) one minimiser
    is returned; never NaN.
    """
    _check_problem(X, y)
    B, K, _ = X.shape
    if K > MAX_CANDIDATES:
        raise ValueError(f"simplex_least_squares handles at most {MAX_CANDIDATES} candidates; got K = {K}")
    if K == 1:
        _check_finite(X, y)
        return torch.ones(B, 1, dtype=torch.float64, device=X.device)
    if K == 2:
        return _simplex_two(X, y)
    G, bvec = _gram_problem(X, y)
    _check_finite(G, bvec)
    w, certified = _simplex_active_set(G, bvec, max_iter=4 * K + 8)
    if not certified.all():
        w[~certified] = _simplex_enumerate_chunked(G[~certified], bvec[~certified])
    return w


def _gram_problem(X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G and b of the centred problem in float64, rescaled so that G has unit mean diagonal.

    Dividing f by a positive constant leaves its minimiser unchanged and keeps the KKT
    systems (whose constraint rows are ones) well balanced. Images are processed in
    chunks so the float64 copies stay small (large fresh allocations dominate otherwise).
    """
    B, K, D = X.shape
    G = torch.empty(B, K, K, dtype=torch.float64, device=X.device)
    b = torch.empty(B, K, dtype=torch.float64, device=X.device)
    chunk = max(1, _GRAM_CHUNK_ELEMENTS // (K * D))
    for i in range(0, B, chunk):
        Xc = X[i:i + chunk].to(torch.float64, copy=True)  # copy: never modify the caller's X
        ref = Xc.mean(dim=1, keepdim=True)
        Xc -= ref
        yc = y[i:i + chunk].to(torch.float64) - ref[:, 0]
        torch.bmm(Xc, Xc.transpose(1, 2), out=G[i:i + chunk])
        b[i:i + chunk] = torch.bmm(Xc, yc.unsqueeze(-1)).squeeze(-1)
    scale = torch.diagonal(G, dim1=1, dim2=2).mean(-1).clamp_min(torch.finfo(torch.float64).tiny)
    return G / scale[:, None, None], b / scale[:, None]


def _simplex_enumerate_chunked(G: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    K = b.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // (((1 << K) - 1) * (K + 1) ** 2))
    return torch.cat([_simplex_enumerate(G[i:i + chunk], b[i:i + chunk]) for i in range(0, len(b), chunk)])


def _flatten_pair(eps_base: torch.Tensor, eps_candidates: torch.Tensor,
                  float64: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    if eps_candidates.ndim < 2 or eps_base.ndim < 1:
        raise ValueError("expected eps_base (B, ...) and eps_candidates (B, K, ...)")
    B, K = eps_candidates.shape[:2]
    if eps_base.shape[0] != B or eps_base.shape[1:] != eps_candidates.shape[2:]:
        raise ValueError(
            f"eps_base {tuple(eps_base.shape)} does not match eps_candidates {tuple(eps_candidates.shape)}:"
            " expected (B, ...) and (B, K, ...) with the same trailing shape")
    y, X = eps_base.reshape(B, -1), eps_candidates.reshape(B, K, -1)
    return (y.to(torch.float64), X.to(torch.float64)) if float64 else (y, X)


def pca_coordinates(eps_base: torch.Tensor, eps_candidates: torch.Tensor, components: int = 2,
                    normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the K+1 predictions in the coordinates of their top principal components.

    As the original's ``pca_linear_program``: Z = [y; x_1; ...; x_K] (K+1 rows of D) is
    centred over its rows (Z - mean of the rows); with ``normalize`` (the original's default)
    each row is then divided by its L2 norm (``torch.nn.functional.normalize``; a zero row
    stays zero); the principal components are those of the result, centred again (what
    ``torch.pca_lowrank``, center=True, computes: Pearson 1901). With Zc Zc^T = U diag(s^2) U^T
    the scores on the top c components are U[:, :c] diag(s[:c]). The original projected
    the uncentred rows, Z V[:, :c]: that differs from these scores by one translation shared
    by all K+1 points, which leaves the simplex weights computed from them unchanged.
    Returns (base (B, c), candidates (B, K, c)).
    """
    y, X = _flatten_pair(eps_base, eps_candidates)
    K = X.shape[1]
    if not 1 <= components <= K + 1:
        raise ValueError(f"pca_components must be between 1 and K + 1 = {K + 1}; got {components}")
    Z = torch.cat([y[:, None], X], dim=1)
    Z = Z - Z.mean(dim=1, keepdim=True)
    if normalize:
        Z = torch.nn.functional.normalize(Z, dim=-1)
        Z = Z - Z.mean(dim=1, keepdim=True)
    evals, evecs = torch.linalg.eigh(Z @ Z.transpose(1, 2))  # ascending eigenvalues
    top = torch.arange(K, K - components, -1, device=Z.device)
    coords = evecs[:, :, top] * evals[:, top].clamp_min(0).sqrt()[:, None, :]
    return coords[:, 0], coords[:, 1:]


def score_decomp(eps_base: torch.Tensor, eps_candidates: torch.Tensor, method: str = "simplex", p: int = 2,
                 pca_components: int = 2, pca_normalize: bool = True) -> torch.Tensor:
    """Scores (B, K), float64, of each candidate for each image; higher means more of it.

    eps_base: (B, ...) noise prediction under the base prompt; eps_candidates: (B, K, ...)
    under each candidate prompt, at the same x_t and t. Each image is flattened to D.

    - "simplex" (ScoreDecomp): the mixture weights ``simplex_least_squares(X, y)``.
      They are invariant to the parameterisation (epsilon, v, score or x0): every one of
      them is an affine map u = a eps + c x_t with the same a != 0 and c for all prompts
      at a given (x_t, t), and since sum_k w_k = 1,
      sum_k w_k u_k - u_base = a (sum_k w_k eps_k - eps_base), so the minimiser is unchanged.
    - "cosine": <y, x_k> / (||y|| ||x_k||).
    - "lp": -||y - x_k||_p for an integer p >= 1.
    - "pca": the simplex weights computed in the coordinates of the top ``pca_components``
      principal components of the K+1 predictions of each image, centred and (``pca_normalize``,
      the original's default) L2-normalised row by row (``pca_coordinates``).

    Which candidate the scores name (and what a tie means) is ``scoring.decide``.
    """
    if method == "simplex":  # the solver converts to float64 chunk by chunk
        y, X = _flatten_pair(eps_base, eps_candidates, float64=False)
        return simplex_least_squares(X, y)
    if method == "cosine":
        y, X = _flatten_pair(eps_base, eps_candidates)
        dots = (X * y[:, None]).sum(-1)
        norms = torch.linalg.vector_norm(X, dim=-1) * torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        # A zero prediction has no direction: its cosine is reported as 0.
        return torch.where(norms > 0, dots / torch.where(norms > 0, norms, torch.ones_like(norms)),
                           torch.zeros_like(dots))
    if method == "lp":
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"p must be an integer >= 1 for method 'lp'; got {p!r}")
        y, X = _flatten_pair(eps_base, eps_candidates)
        return (-torch.linalg.vector_norm(X - y[:, None], ord=p, dim=-1))
    if method == "pca":
        y_pc, X_pc = pca_coordinates(eps_base, eps_candidates, pca_components, pca_normalize)
        return simplex_least_squares(X_pc, y_pc)
    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(SCORE_METHODS)}")


__all__ = ["simplex_least_squares", "score_decomp", "pca_coordinates", "SCORE_METHODS", "MAX_CANDIDATES",
           "frank_wolfe_gap"]
