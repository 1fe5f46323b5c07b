"""Sampling a trained run with an on-disk cache, and calling each sample's gender.

Shared by the audit, the dose-response and the Lipschitz scripts, so that every one of
them draws and judges images the same way:

- ``cached_samples``: N uint8 images for one conditioning vector at one guidance scale,
  read from ``<folder>/<key>.npy`` when a ``.json`` beside it records exactly the same
  settings (run step and config, sampler, steps, N, seed), else sampled and written
  (atomically, the .json last), so every script resumes instead of resampling;
- ``FEMALE`` / ``MALE`` / ``UNDECIDED`` per-image calls (1 / 0 / -1) from the hair rule
  (long hair -> female-presenting, short -> male, anything else undecided) and from
  ScoreDecomp (``scoring.decide`` on the weights of "man" / "woman"; ties undecided);
- ``share_of_calls``: female share among the decided images with its Wilson interval;
- ``METHOD_NAMES`` and ``X_VARIANTS``: how the audit's and the pooled report's tables name
  the calling methods and the regressors of the unseen-word regressions.
"""
from __future__ import annotations

import io
import json
import math
import re
import zlib
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from bias_begets_bias.pipeline import sample, sampling_scheduler
from bias_begets_bias.utils import atomic_write_bytes, atomic_write_json
from statistical_auditing.core.stats import wilson_interval

FEMALE, MALE, UNDECIDED = 1, 0, -1
CANDIDATES = ("man", "woman")  # ScoreDecomp candidates; index 1 is the female side
_SAMPLE_FORMAT = 2  # bump when the cache layout changes
METHOD_NAMES = {"scoredecomp": "ScoreDecomp", "attribute": "hair rule", "elbo": "ELBO classifier"}


class GapText(NamedTuple):
    run: str     # in one run's audit (its plots prefix "cos(w, woman) - cos(w, man), ")
    pooled: str  # in the pooled report, shorter (it prints three side by side)


# The regressors of the unseen-word regressions: proportions.csv column -> its texts, as the
# committed reports print them.
X_VARIANTS = {"cosine_gap_w2v": GapText("in the original word2vec", "gap in the original word2vec"),
              "cosine_gap": GapText("in the run's embedding, before the JL projection",
                                    "gap in the arm's embedding, before JL"),
              "cosine_gap_jl": GapText("after the JL projection (what the model sees)",
                                       "gap after JL (what the model sees)")}


def safe_name(key: str) -> str:
    """A file name for ``key``; a hash suffix keeps distinct keys apart when characters were replaced."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_.") or "key"
    return cleaned if cleaned == key else f"{cleaned}-{zlib.crc32(key.encode()):08x}"


def run_fingerprint(run) -> int:
    """CRC32 of the run's config.json: a cache made by another run (same step) is not reused,
    while moving or copying the run folder keeps its caches valid."""
    return zlib.crc32((run.run_dir / "config.json").read_bytes())


def cached_samples(run, key: str, vector: torch.Tensor, guidance: float, n: int, seed: int, sampler: str,
                   steps: int, batch_size: int, folder: Path) -> tuple[torch.Tensor, bool]:
    """``n`` uint8 images (n, 3, S, S) of the run's EMA model conditioned on ``vector`` at
    ``guidance``, drawn with a generator seeded ``seed``. Returns (images, read_from_cache)."""
    array_path, meta_path = folder / f"{safe_name(key)}.npy", folder / f"{safe_name(key)}.json"
    meta = {"format": _SAMPLE_FORMAT, "key": key, "guidance": float(guidance), "n": int(n), "sampler": sampler,
            "steps": int(steps), "seed": int(seed), "run_step": run.step, "run_config_crc32": run_fingerprint(run),
            "vector_crc32": zlib.crc32(np.ascontiguousarray(vector.float().cpu().numpy()).tobytes())}
    if array_path.is_file() and meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()) == meta:
                images = np.load(array_path, allow_pickle=False)
                if images.dtype == np.uint8 and images.shape[0] == n:
                    return torch.from_numpy(images), True
        except (OSError, ValueError):
            pass  # a damaged cache entry is simply sampled again
    generator = torch.Generator().manual_seed(int(seed))
    scheduler = sampling_scheduler(run.scheduler, sampler, steps)  # the run's own DDPM variance
    images = sample(run.model, vector[None].repeat(n, 1), scheduler, guidance, generator, batch_size)
    buffer = io.BytesIO()
    np.save(buffer, images.numpy(), allow_pickle=False)
    atomic_write_bytes(array_path, buffer.getvalue())
    atomic_write_json(meta_path, meta)  # written last: the pair is valid only once both exist
    return images, False


def hair_calls(hair: Sequence[str]) -> np.ndarray:
    """Per-image calls from hair length: long -> FEMALE, short -> MALE, none / unclear -> UNDECIDED."""
    return np.array([FEMALE if h == "long" else MALE if h == "short" else UNDECIDED for h in hair], dtype=np.int64)


@torch.no_grad()
def scoredecomp_calls(score_model, images: torch.Tensor, k: int, seed: int, key_prefix: str, base: str = "person",
                      batch_size: int = 128) -> tuple[np.ndarray, torch.Tensor]:
    """ScoreDecomp's per-image calls and weights (N, 2) on ("man", "woman") for uint8 images.

    Image i is noised with ``scoring.image_noise`` keyed "<key_prefix>/<i>", so the result does
    not depend on the batch size; the call is ``scoring.decide`` of the weights (a tie is
    UNDECIDED).
    """
    from statistical_auditing.core.scoring import batch_noise, decide, scoredecomp_scores

    timestep = score_model.timestep_for_k(int(k))
    weights = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].float() / 255.0
        x0 = score_model.encode(batch)
        noise = batch_noise(x0.shape[1:], seed, [f"{key_prefix}/{i}" for i in range(start, start + len(batch))])
        weights.append(scoredecomp_scores(score_model, x0, timestep, noise, base, list(CANDIDATES)))
    weights = torch.cat(weights) if weights else torch.zeros(0, 2, dtype=torch.float64)
    predicted = decide(weights) if len(weights) else torch.zeros(0, dtype=torch.long)
    calls = np.where(predicted.numpy() < 0, UNDECIDED, np.where(predicted.numpy() == 1, FEMALE, MALE))
    return calls.astype(np.int64), weights


def share_of_calls(calls: Sequence[int]) -> dict:
    """Female share among decided images: successes, n (decided), n_undecided, share, ci_low,
    ci_high (95% Wilson); NaN share and interval when nothing is decided."""
    calls = np.asarray(calls, dtype=np.int64)
    female, n = int((calls == FEMALE).sum()), int((calls != UNDECIDED).sum())
    row = {"successes": female, "n": n, "n_undecided": int(len(calls) - n)}
    if n == 0:
        return row | {"share": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    low, high = wilson_interval(female, n)
    return row | {"share": female / n, "ci_low": low, "ci_high": high}
