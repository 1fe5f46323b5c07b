"""Benchmark: our batched ScoreDecomp solver against cvxpy, one problem per image.

The original solved min_w ||X w - y||_2 s.t. w >= 0, sum w = 1 with cvxpy for every image.
This compares, in the same run and on the same problems, cvxpy (default solver, problem
built per image as the original did) with ``simplex_least_squares`` run on a batch, at the
audits' sizes: K = 2 (gender) and K = 7 (race) candidates, D = 4*64*64 (Stable Diffusion
latent) and 3*32*32 (pixels). Problems imitate noise predictions: candidates are close to
one another (cosine ~0.99) and the base prediction is a noisy mixture of them.

Reports the time per image of each, the speed-up, and the largest relative excess of our
objective ||X w - y|| over cvxpy's (negative when ours is lower). Targets: speed-up
>= 100x, excess <= 1e-6. cvxpy is a bench-only dependency.

    python bench/simplex_vs_cvxpy.py [--cvxpy_images 20] [--batch 256] [--threads 1] [--strict true]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from bias_begets_bias.cli import InputError, config_from_constants, constants_of, run_main
from bias_begets_bias.utils import atomic_write_text, csv_text
from statistical_auditing.core.utils_classifier import simplex_least_squares

CVXPY_IMAGES = 20  # [1, inf) problems solved one by one with cvxpy per configuration
BATCH = 256  # [1, inf) problems solved together by our solver per configuration (timed per image)
SEED = 0  # [0, 2**63) numpy seed of the synthetic problems
SIMILARITY_NOISE = 0.1  # [0, inf) spread of candidates around a shared prediction (cosine ~ 1/(1+s^2))
THREADS = 1  # [1, inf) torch CPU threads; 1 compares per-core cost with the single-threaded cvxpy solve
STRICT = False  # exit with status 1 when a target is missed
OUT = "bench/results/simplex_vs_cvxpy.csv"  # metrics CSV (git-ignored folder)

TARGET_SPEEDUP = 100.0  # (0, inf) required cvxpy time / our time, per image
TARGET_EXCESS = 1e-6  # [0, inf) allowed relative excess of our objective over cvxpy's

# (K candidates, D = flattened size): gender / race, SD latent 4x64x64 / pixels 3x32x32.
SIZES = [(2, 4 * 64 * 64), (7, 4 * 64 * 64), (2, 3 * 32 * 32), (7, 3 * 32 * 32)]


def make_problems(n: int, K: int, D: int, rng: np.random.Generator, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """n problems (X (n, K, D), y (n, D)) in float32, shaped like UNet noise predictions."""
    shared = rng.standard_normal((n, 1, D), dtype=np.float32)
    X = shared + spread * rng.standard_normal((n, K, D), dtype=np.float32)
    w = rng.dirichlet(np.ones(K), size=n).astype(np.float32)
    y = np.einsum("nk,nkd->nd", w, X) + spread * 0.5 * rng.standard_normal((n, D), dtype=np.float32)
    return X, y


def solve_cvxpy(cp, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One image the original's way: a fresh cvxpy problem, default solver."""
    K = X.shape[0]
    w = cp.Variable(K)
    problem = cp.Problem(cp.Minimize(cp.norm(X.T.astype(np.float64) @ w - y.astype(np.float64), 2)),
                         [w >= 0, cp.sum(w) == 1])
    problem.solve()
    if w.value is None:
        raise RuntimeError(f"cvxpy failed: status {problem.status}")
    return np.asarray(w.value)


def residual(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """||sum_k w_k X_k - y||_2 per problem, in float64."""
    return np.linalg.norm(np.einsum("nk,nkd->nd", w, X.astype(np.float64)) - y.astype(np.float64), axis=-1)


def run_size(cp, K: int, D: int, cfg: dict, rng: np.random.Generator) -> dict:
    X, y = make_problems(max(cfg["batch"], cfg["cvxpy_images"]), K, D, rng, cfg["similarity_noise"])
    Xt, yt = torch.from_numpy(X[:cfg["batch"]]), torch.from_numpy(y[:cfg["batch"]])
    simplex_least_squares(Xt[:8], yt[:8])  # warm-up (allocations, kernels)
    start = time.perf_counter()
    w_ours = simplex_least_squares(Xt, yt).double().numpy()
    ours_s = (time.perf_counter() - start) / cfg["batch"]

    m = cfg["cvxpy_images"]
    solve_cvxpy(cp, X[0], y[0])  # warm-up (imports, canonicalisation caches)
    start = time.perf_counter()
    w_cvx = np.stack([solve_cvxpy(cp, X[i], y[i]) for i in range(m)])
    cvx_s = (time.perf_counter() - start) / m

    f_ours = residual(X[:m], y[:m], w_ours[:m])
    f_cvx = residual(X[:m], y[:m], w_cvx)
    excess = float(np.max((f_ours - f_cvx) / np.maximum(f_cvx, np.finfo(np.float64).tiny)))
    return {"K": K, "D": D, "cvxpy_ms_per_image": 1e3 * cvx_s, "ours_ms_per_image": 1e3 * ours_s,
            "speedup": cvx_s / ours_s, "max_rel_objective_excess": excess,
            "max_abs_weight_diff": float(np.abs(w_ours[:m] - w_cvx).max()),
            "cvxpy_images": m, "batch": cfg["batch"]}


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = config_from_constants(constants_of(globals()), argv=argv, description=__doc__.splitlines()[0])
    try:
        import cvxpy as cp
    except ImportError:
        raise InputError("this benchmark needs cvxpy (a bench-only dependency): pip install cvxpy==1.9.3") from None
    torch.set_num_threads(cfg["threads"])
    print(f"cvxpy {cp.__version__} (solvers: {', '.join(cp.installed_solvers())}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    rng = np.random.default_rng(cfg["seed"])
    rows = []
    header = f"{'K':>2} {'D':>6} {'cvxpy ms/img':>13} {'ours ms/img':>12} {'speed-up':>9} {'obj. excess':>12}  verdict"
    print(header)
    for K, D in SIZES:
        row = run_size(cp, K, D, cfg, rng)
        ok = row["speedup"] >= cfg["target_speedup"] and row["max_rel_objective_excess"] <= cfg["target_excess"]
        row["meets_targets"] = ok
        rows.append(row)
        print(f"{K:>2} {D:>6} {row['cvxpy_ms_per_image']:>13.2f} {row['ours_ms_per_image']:>12.4f} "
              f"{row['speedup']:>8.0f}x {row['max_rel_objective_excess']:>12.2e}  {'ok' if ok else 'MISSED'}")
    print(f"targets: speed-up >= {cfg['target_speedup']:g}x, relative objective excess <= {cfg['target_excess']:g}")
    out = Path(cfg["out"])
    atomic_write_text(out, csv_text(rows, list(rows[0])))
    print(f"wrote {out}")
    if cfg["strict"] and not all(r["meets_targets"] for r in rows):
        sys.exit(1)
    return rows


if __name__ == "__main__":
    run_main(main)
