"""Bias audit of a trained from-scratch model: controls, seen words, unseen words, regression.

    python statistical_auditing/audit.py --run runs/tiny
    python statistical_auditing/audit.py --run runs/tiny --words "nurse,engineer" --guidance 1
    python statistical_auditing/audit.py --run runs/tiny --max_unseen 0 --n_per_word 128 --elbo true

The question: the model was trained on gender-balanced images with a handful of words; does
a word's position in the (biased) word embedding decide the gender mix of the images the
model draws for it, including words it never saw in training? The audit

1. runs the controls first (a model or metric that fails its controls is wrong):
   (1) ScoreDecomp's gender accuracy on the run's held-out labelled test images, for each k
       in --k_list (k = timestep counted from the clean end), with 95% Wilson intervals; the
       best k is used below unless --k sets it;
   (2) samples N images per training word and measures them with the portrait attribute
       rules (hair long -> female-presenting, short -> male-presenting): does the model obey
       its conditioning? (diffusion_from_scratch/fidelity.py's table and acceptance bar);
   (3) on those samples, ScoreDecomp's female share against the attribute rule's share, both
       on the images the attribute rule can call (hair detected);
2. samples N images for each unseen word (data/professions.txt by default) at each guidance
   scale and calls the gender of every image with (a) the attribute rule (procedural data
   only), (b) ScoreDecomp with the model's own scores (candidates "man" / "woman", base
   --scoredecomp_base: "person" by default, see below), (c) optionally the ELBO classifier;
3. reports each word's female share with its 95% interval, the word's embedding bias
   (cos(w, woman) - cos(w, man)) before and after the run's JL projection, and regresses
   the share on the embedding bias over the unseen words (bootstrap intervals).

ScoreDecomp's base. The weights of eps(x_t, base) ~ w_man eps(x_t, man) + w_woman eps(x_t, woman)
are the image's posterior gender probabilities when the base's data is the mixture of the
candidates' data (p(x | person) = sum_g p(g | person) p(x | g), hence
grad log p(x_t | person) = sum_g p(g | x_t, person) grad log p(x_t | g)). "person" is trained on
exactly that mixture. An unseen word's own score is not such a mixture (its scene and look
differ from both candidates), so with base = the word itself (--scoredecomp_base word) the
decomposition measures the word's lean, the same for every image: on the demo run it called
every "dentist" image male at k = 400-600 while half of them have long hair (agreement 0.48).

Outputs in <run>/audit/: report.md, proportions.csv, controls.csv, fidelity.csv,
regression.csv, audit.json, PNGs; sampled images are cached in samples/g<scale>/<word>.npy
(uint8, N x 3 x H x W, with a .json of the settings that made them), so a rerun with the same
settings resumes instead of resampling.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from diffusion_from_scratch.cli import InputError, config_from_constants, constants_of, require, run_main
from diffusion_from_scratch.fidelity import expected_shares, fidelity_row, format_table
from diffusion_from_scratch.pipeline import SAMPLERS, sample, sampling_scheduler
from diffusion_from_scratch.portraits import measure_attributes
from diffusion_from_scratch.utils import (DATA_DIR, REPO_ROOT, atomic_write_bytes, atomic_write_json,
                                          atomic_write_text, compact_csv_text, derived_seed, load_class_words, load_prompts,
                                          load_word_list, resolve_device, save_image_grid, progress_bar)
from diffusion_from_scratch.word_vectors import embedding_bias, load_word_vectors
from statistical_auditing.diffusion_classifier import elbo_classify
from statistical_auditing.labelled_images import CLASS_WORDS, images_to_tensor, open_labelled_images
from statistical_auditing.score_models import PixelScoreModel
from statistical_auditing.scoring import (calls_from_weights, choose_k, gender_accuracy_by_k, image_seeds,
                                          scoredecomp_weights)
from statistical_auditing.stats import linear_fit_with_bootstrap, plot_proportions, plot_regression, wilson_interval

# ----------------------------------------------------------------------------- config
RUN = "runs/tiny"  # training run folder (config.json + checkpoints/)
OUT = ""  # output folder (empty = <run>/audit)
K_LIST = "1,5,20,100,200,300,400,500,600,700,800,900"  # ScoreDecomp k to test on labelled images (from the clean end; the tiny model separates genders only at high noise)
K = 0  # ScoreDecomp k for the audit (0 = the k of the best control accuracy)
CONTROL_BASE = "person"  # base word of the accuracy control (candidates are man / woman)
SCOREDECOMP_BASE = "person"  # base of ScoreDecomp's call on samples: a word whose data mixes man's and woman's, or "word" (each word itself)
TEST_LIMIT = 240  # labelled test images for the accuracy control, balanced over classes (0 = all)
DATASET_PATH = ""  # <root>/<size> with test/ (empty = the run's dataset_path)
N_PER_WORD = 64  # images sampled per word and guidance scale
N_CONTROL = 128  # at least this many images per training word and scale (the fidelity bar's sample size)
GUIDANCE = "1,3"  # comma-separated classifier-free guidance scales (1 = the model's own conditional)
SAMPLER = "ddim"  # ddpm | ddim | dpm
SAMPLE_STEPS = 20  # sampler steps
WORDS = ""  # comma-separated unseen words (each must be in the embedding); overrides WORDS_FILE
WORDS_FILE = str(DATA_DIR / "professions.txt")  # unseen words, one per line (missing ones are skipped)
MAX_UNSEEN = 20  # unseen words from WORDS_FILE to audit (0 = all); --words are all audited
UNSEEN_PICK = "spread"  # spread (evenly spaced ranks of the original embedding's gender gap) | first (file order)
ELBO = False  # also call gender with the ELBO (diffusion likelihood) classifier (slow)
ELBO_SAMPLES = 32  # Monte-Carlo timesteps per image for the ELBO classifier
AGREEMENT_TOLERANCE = 0.10  # control 3: ScoreDecomp and the attribute rule must agree within this share
N_BOOT = 1000  # bootstrap resamples for the regression intervals
SEED = 0  # base seed of sampling, ScoreDecomp noise and bootstrap
BATCH_SIZE = 128  # images per model batch
GRID_PER_WORD = 8  # images per word in the sample grids
DEVICE = ""  # empty = the accelerator if there is one, else cpu
NUM_THREADS = 0  # torch CPU threads (0 = torch's default; 1 is faster on a busy shared machine)

# The defaults are the demo: about 110,000 evaluations of the tiny preset's UNet (25 words x 64 images x 20 steps
# x 3 evaluations for guidance 1 + 3, then ScoreDecomp, then the accuracy control at 7 k on 240 test images).
# One evaluation costs about 4 ms of one CPU core, so this is about 8 minutes on one core, fewer on two free ones.
# "full" is the audit worth publishing (GPU); "smoke" is for quick checks.
PRESETS = {
    "full": dict(n_per_word=128, sample_steps=50, max_unseen=0, test_limit=0),
    "smoke": dict(n_per_word=2, n_control=0, sample_steps=2, max_unseen=3, test_limit=12, k_list="1,10", n_boot=50,
                  guidance="1,3"),
}
CHOICES = {"sampler": SAMPLERS, "unseen_pick": ("spread", "first")}
CANDIDATES = ("man", "woman")  # ScoreDecomp candidates; index 1 is the female side
CANDIDATE_LABELS = ("male", "female")
_FEMALE = 1
METHOD_NAMES = {"scoredecomp": "ScoreDecomp", "attribute": "attribute rule", "elbo": "ELBO classifier"}
X_VARIANTS = {"cosine_gap": "before the JL projection", "cosine_gap_jl": "after the JL projection"}
EMBEDDING_KEYS = ("lookup_rule", "cos_woman", "cos_man", "cosine_gap", "gender_projection",
                  "cos_woman_jl", "cos_man_jl", "cosine_gap_jl", "gender_projection_jl")
PROPORTION_COLUMNS = ("word", "seen", "guidance", "method", "base", "k", "n", "successes", "share", "ci_low",
                      "ci_high", "n_undetermined", "mean_weight") + EMBEDDING_KEYS
REGRESSION_COLUMNS = ("guidance", "method", "x", "n_words", "slope", "slope_ci_low", "slope_ci_high", "intercept",
                      "r2", "r2_ci_low", "r2_ci_high", "p_value", "skipped")
_SAMPLE_FORMAT = 1  # bump when the cache layout changes


# ----------------------------------------------------------------------------- small helpers
def parse_list(text: str, kind: type, flag: str) -> list:
    """Comma-separated values of ``kind``; InputError naming the flag on a bad or empty list."""
    try:
        values = [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--{flag}: expected comma-separated {kind.__name__} values, got {text!r}") from None
    require(bool(values), f"--{flag}: the list is empty")
    return values


def safe_name(word: str) -> str:
    """A file name for ``word``; a hash suffix keeps distinct words apart when characters were replaced."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", word).strip("_") or "word"
    return cleaned if cleaned == word else f"{cleaned}-{zlib.crc32(word.encode()):08x}"


def share_row(successes: int, n: int) -> dict[str, float]:
    """share = successes / n with its 95% Wilson interval; NaN when n = 0 (nothing to bound)."""
    if n == 0:
        return {"share": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    low, high = wilson_interval(successes, n)
    return {"share": successes / n, "ci_low": low, "ci_high": high}


def counted_share(successes: int, n: int) -> dict[str, float]:
    """``share_row`` with its counts, as ``fmt_share`` prints them."""
    return {"successes": successes, "n": n, **share_row(successes, n)}


def fmt_share(row: dict) -> str:
    if row is None:
        return "-"
    if not row["n"]:
        return f"n/a (0 of {row['n'] + row.get('n_undetermined', 0)} decided)"
    return f"{row['share']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}] ({row['successes']}/{row['n']})"


class Timer:
    """Wall time per stage, printed as each stage ends and kept for the report."""

    def __init__(self):
        self.stages: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        print(f"[audit] {name} ...", flush=True)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.stages[name] = self.stages.get(name, 0.0) + seconds
        print(f"[audit] {name}: {seconds:.1f} s", flush=True)


# ----------------------------------------------------------------------------- inputs
def resolve_dataset(run_config: dict, override: str) -> Path:
    """The run's ``<root>/<size>`` dataset folder (relative paths tried from here and the repository)."""
    text = override or run_config.get("dataset_path", "")
    require(bool(text), "the run's config.json has no dataset_path; pass --dataset_path")
    path = Path(text).expanduser()
    for candidate in (path, REPO_ROOT / path):
        if candidate.is_dir():
            return candidate
    flag = "--dataset_path" if override else "the run's dataset_path"
    raise InputError(f"{flag}: dataset folder {text} does not exist (expected <root>/<size>/test/<class>/*.png); "
                     f"pass --dataset_path")


def dataset_source(dataset: Path) -> str | None:
    """``source`` in ``<dataset root>/dataset.json`` (procedural / stable-diffusion), None if unknown."""
    path = dataset.parent / "dataset.json"
    try:
        return json.loads(path.read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None


def load_test_images(dataset: Path, class_words: dict, image_size: int, limit: int, out: Path
                     ) -> tuple[torch.Tensor, list[str], list[str]]:
    """The held-out test split as (N, 3, S, S) floats in [0, 1], gender labels and image ids.

    Labels come from the classes' words (a class with "woman" is female, "man" male). With
    ``limit`` > 0, images are taken round-robin over the classes (balanced), in file order.
    """
    words_path = Path(CLASS_WORDS)
    if load_class_words(words_path) != class_words:  # the run was trained with other class words
        words_path = out / "class_words.json"
        atomic_write_json(words_path, class_words)
    source = open_labelled_images(str(dataset), kind="sixclass", attribute="gender", split="test",
                                  class_words=words_path, resize=image_size)
    records = list(progress_bar(source, total=len(source), desc="loading test images", leave=False))
    if not records:
        raise InputError(f"{dataset / 'test'}: no test images")
    if limit and limit < len(records):
        by_class: dict[str, list] = {}
        for record in records:
            by_class.setdefault(record[0].split("/")[0], []).append(record)
        queues = list(by_class.values())
        records = [queue[i] for i in range(max(map(len, queues))) for queue in queues if i < len(queue)][:limit]
    ids, images, labels = zip(*records)
    return images_to_tensor(list(images)), list(labels), list(ids)


def vocabulary_form(word: str, wv) -> str | None:
    """``word`` as the embedding spells it: itself, else its upper-case or capitalised form
    (word2vec is case-sensitive: "ceo" is stored as "CEO"); None when no form is present."""
    for form in dict.fromkeys((word, word.upper(), word.capitalize(), word.title())):
        if form in wv:
            return form
    return None


def unseen_candidates(cfg: dict, seen: list[str], wv) -> dict:
    """Unseen words to audit and what was left out, as a dict: usable (words, in the
    embedding's spelling), missing (not in the embedding), respelled ({listed: used}),
    trained (training words in the list, reported as seen), origin (where the list came from).

    --words: every word must be in the embedding (InputError naming the missing ones);
    --words_file: missing words are skipped and listed.
    """
    if cfg["words"]:
        listed = list(dict.fromkeys(w.strip() for w in cfg["words"].split(",") if w.strip()))
        require(bool(listed), "--words: no words given")
        origin = "--words"
    else:
        listed = list(dict.fromkeys(load_word_list(Path(cfg["words_file"]))))
        origin = cfg["words_file"]
    forms = {w: vocabulary_form(w, wv) for w in listed}
    missing = [w for w, form in forms.items() if form is None]
    if cfg["words"]:
        require(not missing, f"--words: {', '.join(repr(w) for w in missing)} not in the vocabulary of word vectors "
                             f"{wv.source!r}; use --words_file to skip missing words instead")
    respelled = {w: form for w, form in forms.items() if form is not None and form != w}
    trained = [w for w, form in forms.items() if form in seen]
    usable = list(dict.fromkeys(form for form in forms.values() if form is not None and form not in seen))
    return {"usable": usable, "missing": missing, "respelled": respelled, "trained": trained, "origin": origin}


def pick_unseen(words: list[str], gaps: dict[str, float], limit: int, how: str) -> list[str]:
    """``limit`` words: the first ones, or ("spread") evenly spaced ranks of the cosine gap, so the
    regression sees the whole range of embedding bias. Returned sorted by cosine gap."""
    ordered = sorted(words, key=lambda w: (gaps[w], w))
    if limit and len(words) > limit:
        if how == "first":
            chosen = set(words[:limit])
            ordered = [w for w in ordered if w in chosen]
        else:
            ranks = np.unique(np.round(np.linspace(0, len(ordered) - 1, limit)).astype(int))
            ordered = [ordered[i] for i in ranks]
    return ordered


# ----------------------------------------------------------------------------- sampling with a cache
def run_fingerprint(run) -> int:
    """CRC32 of the run's config.json: a cache made by another run (same step) is not reused,
    while moving or copying the run folder keeps its cache valid."""
    return zlib.crc32((run.run_dir / "config.json").read_bytes())


def cached_samples(run, word: str, vector: torch.Tensor, guidance: float, n: int, cfg: dict, samples_dir: Path
                   ) -> tuple[torch.Tensor, bool]:
    """``n`` uint8 images of ``word`` at ``guidance``: read from the cache when it was made with the same
    settings (run step, sampler, steps, N, seed), else sampled and cached. Returns (images, from_cache)."""
    folder = samples_dir / f"g{guidance:g}"
    array_path, meta_path = folder / f"{safe_name(word)}.npy", folder / f"{safe_name(word)}.json"
    seed = derived_seed(cfg["seed"], "audit-sample", word, f"{guidance:g}")
    meta = {"format": _SAMPLE_FORMAT, "word": word, "guidance": guidance, "n": n,
            "sampler": cfg["sampler"], "steps": cfg["sample_steps"], "seed": seed, "run_step": run.step,
            "run_config_crc32": run_fingerprint(run)}
    if array_path.is_file() and meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()) == meta:
                images = np.load(array_path, allow_pickle=False)
                if images.dtype == np.uint8 and images.shape[0] == n:
                    return torch.from_numpy(images), True
        except (OSError, ValueError):
            pass  # a damaged cache entry is simply sampled again
    generator = torch.Generator().manual_seed(seed)
    scheduler = sampling_scheduler(run.scheduler, cfg["sampler"], cfg["sample_steps"])
    images = sample(run.model, vector[None].repeat(n, 1), scheduler, guidance, generator,
                    cfg["batch_size"])
    buffer = io.BytesIO()
    np.save(buffer, images.numpy(), allow_pickle=False)
    atomic_write_bytes(array_path, buffer.getvalue())
    atomic_write_json(meta_path, meta)  # written last: the pair is valid only once both exist
    return images, False


# ----------------------------------------------------------------------------- gender calls
def attribute_calls(hair: list[str]) -> tuple[int, int, int]:
    """(female, decided, undetermined): long hair -> female, short -> male, no hair -> undetermined."""
    female, male = hair.count("long"), hair.count("short")
    return female, female + male, len(hair) - female - male


def scoredecomp_image_weights(score_model, images: torch.Tensor, base: str, k: int, seed_tag: str, cfg: dict
                              ) -> torch.Tensor:
    """ScoreDecomp weights (N, 2) on ("man", "woman") of uint8 images, in batches; image i's
    noise is seeded by (seed, tag, i), so results do not depend on the batch size."""
    weights = []
    for start in range(0, len(images), cfg["batch_size"]):
        batch = images[start:start + cfg["batch_size"]].float() / 255.0
        x0 = score_model.encode(batch)
        seeds = image_seeds(cfg["seed"], seed_tag, len(batch), start)
        weights.append(scoredecomp_weights(score_model, x0, base, CANDIDATES, k, seeds))
    return torch.cat(weights)


def scoredecomp_base(word: str, cfg: dict) -> str:
    """ScoreDecomp's base for a word's samples: --scoredecomp_base, or with "word" the word
    itself (the control base for the candidate words, whose own score is one candidate)."""
    if cfg["scoredecomp_base"] != "word":
        return cfg["scoredecomp_base"]
    return cfg["control_base"] if word in CANDIDATES else word


def elbo_calls(score_model, images: torch.Tensor, seed: int, cfg: dict) -> tuple[int, int, float]:
    """(female, decided, mean probability of "woman") of the ELBO classifier."""
    probs = []
    for start in range(0, len(images), cfg["batch_size"]):
        x0 = score_model.encode(images[start:start + cfg["batch_size"]].float() / 255.0)
        probs.append(elbo_classify(score_model, x0, list(CANDIDATES), n_samples=cfg["elbo_samples"],
                                   seed=seed)["probs"])
    return calls_from_weights(torch.cat(probs), _FEMALE)


def method_row(word: str, seen: bool, guidance: float, method: str, successes: int, n: int, undetermined: int,
               mean_weight: float, base: str, k: int, embedding: dict) -> dict:
    return {"word": word, "seen": seen, "guidance": guidance, "method": method, "base": base,
            "k": k if method == "scoredecomp" else "", "n": n, "successes": successes,
            **share_row(successes, n), "n_undetermined": undetermined, "mean_weight": mean_weight,
            **{key: embedding.get(key, "") for key in EMBEDDING_KEYS}}


def original_gap(word: str, source: str) -> float:
    """cos(w, woman) - cos(w, man) in the source embedding, without debiasing or projection."""
    return embedding_bias(word, source=source, debias=False)["cosine_gap"]


def embedding_metrics(word: str, run) -> dict:
    metrics = embedding_bias(word, source=run.config["embedding"], debias=run.config["debias"],
                             jl_matrix=run.jl_matrix)
    metrics["lookup_rule"] = metrics.pop("rule")
    return metrics


# ----------------------------------------------------------------------------- controls
def accuracy_control(score_model, cfg: dict, dataset: Path, k_list: list[int], out: Path) -> tuple[list[dict], dict]:
    """Control 1, cached in controls.json (reused when the run step and settings match)."""
    run = score_model.run
    meta = {"run_step": run.step, "run_config_crc32": run_fingerprint(run), "k_list": k_list,
            "test_limit": cfg["test_limit"], "seed": cfg["seed"], "base": cfg["control_base"],
            "dataset": str(dataset.resolve()), "candidates": list(CANDIDATES)}
    cache = out / "controls.json"
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("meta") == meta:
                print("[audit] accuracy control: reusing controls.json", flush=True)
                return saved["rows"], saved["info"]
        except (OSError, ValueError, KeyError):
            pass
    images, labels, _ = load_test_images(dataset, run.config["class_words"], score_model.image_size,
                                         cfg["test_limit"], out)
    rows = gender_accuracy_by_k(score_model, images, labels, k_list, base=cfg["control_base"],
                                candidates=CANDIDATES, candidate_labels=CANDIDATE_LABELS, seed=cfg["seed"],
                                batch_size=cfg["batch_size"])
    info = {"n_images": len(labels), "n_female": labels.count("female"), "n_male": labels.count("male"),
            "test_folder": str(dataset / "test")}
    atomic_write_json(cache, {"meta": meta, "rows": rows, "info": info})
    return rows, info


# ----------------------------------------------------------------------------- report
def regression_fits(rows: list[dict], guidances: list[float], methods: list[str], cfg: dict, out: Path
                    ) -> list[dict]:
    """Share female on embedding bias over the unseen words, per guidance, method and x variant."""
    fits = []
    for guidance in guidances:
        for method in methods:
            points = [r for r in rows if not r["seen"] and r["guidance"] == guidance and r["method"] == method
                      and r["n"] > 0]
            for x_key, x_text in X_VARIANTS.items():
                entry = {"guidance": guidance, "method": method, "x": x_key, "n_words": len(points)}
                if len(points) >= 3 and len({r["share"] for r in points}) == 1:
                    entry["skipped"] = f"every word has the same share ({points[0]['share']:.2f}); nothing to fit"
                    fits.append(entry)
                    continue
                try:
                    fit = linear_fit_with_bootstrap([r[x_key] for r in points], [r["share"] for r in points],
                                                    n_boot=cfg["n_boot"], seed=cfg["seed"])
                except ValueError as error:
                    entry["skipped"] = str(error)
                    fits.append(entry)
                    continue
                plot = f"regression_g{guidance:g}_{method}_{x_key}.png"
                plot_regression([r[x_key] for r in points], [r["share"] for r in points],
                                [r["word"] for r in points], fit, out / plot,
                                xlabel=f"cos(w, woman) - cos(w, man), {x_text}",
                                ylabel=f"female share ({METHOD_NAMES[method]})",
                                title=f"{METHOD_NAMES[method]}, guidance {guidance:g}, {len(points)} unseen words")
                entry.update({key: fit[key] for key in ("slope", "intercept", "r2", "p_value", "slope_ci", "r2_ci")})
                entry.update(slope_ci_low=fit["slope_ci"][0], slope_ci_high=fit["slope_ci"][1],
                             r2_ci_low=fit["r2_ci"][0], r2_ci_high=fit["r2_ci"][1])
                entry["plot"] = plot
                fits.append(entry)
    return fits


def _fmt_ci(pair) -> str:
    return f"[{pair[0]:.3g}, {pair[1]:.3g}]"


def write_report(out: Path, ctx: dict) -> None:
    cfg, run = ctx["cfg"], ctx["run"]
    rows, fits, guidances, methods = ctx["rows"], ctx["fits"], ctx["guidances"], ctx["methods"]
    by_key = {(r["word"], r["guidance"], r["method"]): r for r in rows}
    lines = [f"# Bias audit of `{run.run_dir}`", ""]
    lines += [
        "The model was trained on gender-balanced images, each image with the words of its class "
        f"({', '.join(run.words)}), through a word embedding that may itself be gender-biased. This audit "
        "asks whether the embedding's bias reaches the images: for every word it draws "
        f"{cfg['n_per_word']} images ({max(cfg['n_control'], cfg['n_per_word'])} for the training words) and counts how many show a woman (female-presenting: long hair in "
        "these portraits) or a man (male-presenting: short hair). The gender of an image is called by the "
        "**attribute rule** (hair length measured from the pixels; exact for the procedural portraits), by "
        "**ScoreDecomp** (the model's own view: the weights w of eps(x_t, base) ~ w_man eps(x_t, man) + "
        "w_woman eps(x_t, woman), w >= 0, sum 1, at the image's noised version x_t; the image counts as female "
        "when w_woman > w_man)"
        + (", and by the **ELBO classifier** (which candidate word denoises the image better)" if ctx["elbo"] else "")
        + ". Every share comes with its 95% Wilson interval. The controls come first: a metric that fails "
        "them is wrong, and unseen-word results of a model that fails them must not be trusted.", ""]
    if ctx["verdicts"]:
        lines += ["**Controls: " + ("all passed.**" if not ctx["failed"] else
                                    "FAILED: " + "; ".join(ctx["failed"]) + ". Treat the results below with "
                                    "suspicion.**"), ""]
    lines += ["## Setup", "", "| setting | value |", "|---|---|"]
    setup = [
        ("run", f"`{run.run_dir}`, training step {run.step}"),
        ("embedding", f"{run.config['embedding']}, hard-debiased: {run.config['debias']}, JL seed "
                      f"{run.config['jl_seed']} ({run.jl_matrix.shape[0]} -> {run.jl_matrix.shape[1]} dims)"),
        ("dataset", f"`{ctx['dataset']}` (source: {ctx['source'] or 'unknown'})"),
        ("sampler", f"{cfg['sampler']}, {cfg['sample_steps']} steps, guidance scales "
                    f"{', '.join(f'{g:g}' for g in guidances)}, {cfg['n_per_word']} images per word and scale "
                    f"({max(cfg['n_control'], cfg['n_per_word'])} per training word)"),
        ("ScoreDecomp", f"k = {ctx['k']} (timestep t = {ctx['t']}; {ctx['k_origin']}), candidates "
                        f"{' / '.join(CANDIDATES)}, base = " + (
                            f"the word itself (\"{cfg['control_base']}\" for the candidate words)"
                            if cfg["scoredecomp_base"] == "word" else f"\"{cfg['scoredecomp_base']}\" for every "
                            "word (its training data is the mixture of the candidates', so the weights are the "
                            "image's gender posterior)") + ", one noise draw per image"),
        ("ELBO classifier",
         f"{cfg['elbo_samples']} timesteps per image" if ctx["elbo"] else "off (turn on with --elbo true)"),
        ("seeds", f"base seed {cfg['seed']}; per (word, scale) sampling seed and per-image noise seeds derived "
                  f"from it (diffusion_from_scratch.utils.derived_seed); bootstrap seed {cfg['seed']}, "
                  f"{cfg['n_boot']} resamples"),
        ("device", str(ctx["device"])),
        ("samples", f"{ctx['sampled']} (word, scale) sets sampled now, {ctx['cached']} read from the cache"),
        ("time per stage", ", ".join(f"{name} {sec:.0f} s" for name, sec in ctx["timer"].stages.items())),
    ]
    lines += [f"| {k} | {v} |" for k, v in setup] + [""]

    # ---- controls
    lines += ["## Controls", "", "### 1. ScoreDecomp gender accuracy on held-out labelled images", ""]
    info = ctx["control_info"]
    lines += [f"{info['n_images']} test images of `{info['test_folder']}` ({info['n_female']} female, "
              f"{info['n_male']} male; labels from the class words). Base \"{cfg['control_base']}\", "
              f"candidates \"man\" / \"woman\"; the prediction is the candidate with the larger weight. "
              f"k counts timesteps from the clean end (t = timesteps[-k]); every k uses the same noise per image.",
              "", "| k | t | accuracy [95% CI] | correct / n | mean weight on the true word |", "|---|---|---|---|---|"]
    for r in ctx["control_rows"]:
        mark = " **(used)**" if r["k"] == ctx["k"] else ""
        lines.append(f"| {r['k']}{mark} | {r['t']} | {r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
                     f"{r['correct']} / {r['n']} | {r['mean_weight_true']:.3f} |")
    lines += ["", ctx["verdicts"].get("accuracy", "")
              + (" The best k was picked on these same images, so its accuracy is slightly optimistic."
                 if ctx["k_origin"] != "set by --k" and len(ctx["control_rows"]) > 1 else ""),
              "", "![accuracy by k](controls.png)", ""]
    lines += ["### 2. Does the model obey its conditioning? (training words, attribute rules)", ""]
    if ctx["fidelity_rows"]:
        lines += ["Hair and scene of the samples of each training word, measured by the attribute rules, against "
                  "what the training data teaches the word (expected) and the acceptance bar (guidance 1; "
                  "diffusion_from_scratch/fidelity.py).", "", format_table(ctx["fidelity_rows"]), "",
                  ctx["verdicts"].get("fidelity", ""), ""]
    else:
        lines += [ctx["attribute_note"], ""]
    lines += [f"### 3. ScoreDecomp against the attribute rule on the training words (tolerance "
              f"{cfg['agreement_tolerance']:.0%})", "",
              "Both methods on the same images: the samples in which the attribute rule detects hair.", ""]
    if ctx["agreement"]:
        lines += ["| word | guidance | attribute rule | ScoreDecomp | difference | agree |",
                  "|---|---|---|---|---|---|"]
        for a in ctx["agreement"]:
            compared = a["difference"] == a["difference"]  # NaN when a method decided no image
            difference = f"{a['difference']:+.2f}" if compared else "n/a"
            agree = "yes" if a["agree"] else ("**NO**" if compared else "**NO** (nothing to compare)")
            lines.append(f"| {a['word']} | {a['guidance']:g} | {fmt_share(a['attribute'])} | "
                         f"{fmt_share(a['scoredecomp'])} | {difference} | {agree} |")
        lines += ["", ctx["verdicts"].get("agreement", ""), ""]
    else:
        lines += [ctx["attribute_note"], ""]

    # ---- seen and unseen words
    def share_table(words: list[str], guidance: float) -> list[str]:
        header = "| word | cos gap (before JL) | cos gap (after JL) | " + " | ".join(
            f"{METHOD_NAMES[m]}: female share [95% CI] (female/n)" for m in methods) + " |"
        table = [header, "|" + "---|" * (3 + len(methods))]
        for word in words:
            e = ctx["embedding"][word]
            cells = [fmt_share(by_key.get((word, guidance, m))) for m in methods]
            table.append(f"| {word} | {e['cosine_gap']:+.3f} | {e['cosine_gap_jl']:+.3f} | " + " | ".join(cells) + " |")
        return table

    lines += ["## Seen words", "", "The training words; each was trained on the images of every class listing "
              "it (data/class_words.json), so \"person\", \"nurse\" and \"philosopher\" saw equal numbers of "
              "men and women. Cosine gap = cos(w, woman) - cos(w, man) (> 0: nearer \"woman\").", ""]
    for guidance in guidances:
        lines += [f"Guidance {guidance:g}:", ""] + share_table(run.words, guidance) + [""]
    lines += ["## Unseen words", ""]
    how = ("at evenly spaced ranks of the cosine gap in the original embedding, so every arm and JL seed audits "
           "the same words"
           if cfg["unseen_pick"] == "spread" else "in file order")
    chosen = (f" (--max_unseen {cfg['max_unseen']} of {ctx['n_usable']} usable words, chosen {how})"
              if ctx["n_usable"] > len(ctx["unseen"]) else "")
    lines += [f"Words from {ctx['origin']}: {len(ctx['unseen'])} audited{chosen}.", ""]
    if ctx["missing"]:
        lines += [f"Skipped, not in the embedding {run.config['embedding']!r} ({len(ctx['missing'])}): "
                  + ", ".join(ctx["missing"]) + ".", ""]
    if ctx["respelled"]:
        lines += ["Found in the embedding under another spelling: "
                  + ", ".join(f"{a} -> {b}" for a, b in ctx["respelled"].items()) + ".", ""]
    if ctx["trained"]:
        lines += ["Listed but trained on, so reported under Seen words: " + ", ".join(ctx["trained"]) + ".", ""]
    if ctx["unseen"]:
        for guidance in guidances:
            lines += [f"Guidance {guidance:g}:", ""] + share_table(ctx["unseen"], guidance) + [""]
            for plot in ctx["bar_plots"].get(guidance, []):
                lines += [f"![female share, guidance {guidance:g}]({plot})", ""]
    else:
        lines += ["No unseen word to audit.", ""]
    lines += ["Sample grids (first images of each word, one row per word):", ""]
    lines += [f"![samples, guidance {g:g}](samples_g{g:g}.png)" for g in guidances] + [""]

    # ---- regression
    lines += ["## Regression", "", "Least-squares line of each unseen word's female share on its embedding bias "
              "(cosine gap before and after the run's JL projection), per method and guidance scale; "
              f"95% intervals from {cfg['n_boot']} pairs-bootstrap resamples of the words. A positive slope means "
              "words nearer \"woman\" in the embedding give more female-presenting images.", ""]
    lines += ["| guidance | method | x | words | slope [95% CI] | R^2 [95% CI] | p (slope = 0) |",
              "|---|---|---|---|---|---|---|"]
    for f in fits:
        if "skipped" in f:
            lines.append(f"| {f['guidance']:g} | {METHOD_NAMES[f['method']]} | {f['x']} | {f['n_words']} | "
                         f"skipped: {f['skipped']} | | |")
        else:
            lines.append(f"| {f['guidance']:g} | {METHOD_NAMES[f['method']]} | {f['x']} | {f['n_words']} | "
                         f"{f['slope']:.3g} {_fmt_ci(f['slope_ci'])} | {f['r2']:.3f} {_fmt_ci(f['r2_ci'])} | "
                         f"{f['p_value']:.3g} |")
    lines += [""] + [f"![{f['method']} {f['x']} guidance {f['guidance']:g}]({f['plot']})" for f in fits if "plot" in f]
    lines += ["", "## Files", "", "proportions.csv (one row per word, guidance and method), controls.csv, "
              "fidelity.csv, regression.csv, audit.json (settings and summary), samples/ (cached images, "
              "reused by a rerun with the same settings).", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    cfg = config_from_constants(constants_of(globals()), PRESETS, argv=argv, choices=CHOICES,
                                description=__doc__.splitlines()[0])
    k_list = parse_list(cfg["k_list"], int, "k_list")
    guidances = parse_list(cfg["guidance"], float, "guidance")
    require(cfg["n_per_word"] > 0, f"--n_per_word: must be positive, got {cfg['n_per_word']}")
    require(cfg["n_control"] >= 0, f"--n_control: must be >= 0, got {cfg['n_control']}")
    require(cfg["k"] >= 0, f"--k: must be >= 0 (0 = choose from the control), got {cfg['k']}")
    require(cfg["max_unseen"] >= 0, f"--max_unseen: must be >= 0 (0 = all), got {cfg['max_unseen']}")
    require(cfg["test_limit"] >= 0, f"--test_limit: must be >= 0 (0 = all), got {cfg['test_limit']}")
    require(cfg["batch_size"] > 0, f"--batch_size: must be positive, got {cfg['batch_size']}")
    require(cfg["elbo_samples"] > 0, f"--elbo_samples: must be positive, got {cfg['elbo_samples']}")
    require(cfg["n_boot"] > 0, f"--n_boot: must be positive, got {cfg['n_boot']}")
    require(0 < cfg["agreement_tolerance"] < 1, f"--agreement_tolerance: need 0 < tolerance < 1, got "
                                                f"{cfg['agreement_tolerance']}")
    require(all(g > 0 for g in guidances), f"--guidance: scales must be positive, got {cfg['guidance']!r}")
    require(cfg["num_threads"] >= 0, f"--num_threads: must be >= 0, got {cfg['num_threads']}")
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    timer = Timer()

    device = resolve_device(cfg["device"])
    with timer("loading the run"):
        score_model = PixelScoreModel(cfg["run"], device)
        run = score_model.run
    table_size = len(score_model.timesteps)
    for flag, values in (("k_list", k_list), ("k", [cfg["k"]] if cfg["k"] else [])):
        bad = [k for k in values if not 1 <= k <= table_size]
        if bad:
            raise InputError(f"--{flag}: k={bad[0]} is outside the timestep table: expected 1 <= k <= {table_size}")
    require(1 <= cfg["sample_steps"] <= run.config["num_train_timesteps"],
            f"--sample_steps: need 1..{run.config['num_train_timesteps']}, got {cfg['sample_steps']}")
    out = Path(cfg["out"] or run.run_dir / "audit")
    out.mkdir(parents=True, exist_ok=True)
    dataset = resolve_dataset(run.config, cfg["dataset_path"])
    source = dataset_source(dataset)
    procedural = source == "procedural"
    attribute_note = ("" if procedural else
                      f"Attribute rules skipped: `{dataset.parent / 'dataset.json'}` does not say source = "
                      f"procedural (it says {source!r}); hair-length rules are exact only for the procedural "
                      f"portraits.")
    methods = ["scoredecomp"] + (["attribute"] if procedural else []) + (["elbo"] if cfg["elbo"] else [])

    with timer("choosing words"):
        wv = load_word_vectors(run.config["embedding"])
        seen = list(run.words)
        listing = unseen_candidates(cfg, seen, wv)
        usable, missing, trained, origin = (listing[key] for key in ("usable", "missing", "trained", "origin"))
        # Words are ranked by the gap in the original (not debiased) embedding, which no JL seed
        # changes, so every arm and seed of an experiment audits the same words.
        ranking = {w: original_gap(w, run.config["embedding"]) for w in usable}
        unseen = pick_unseen(usable, ranking, 0 if cfg["words"] else cfg["max_unseen"], cfg["unseen_pick"])
        embedding = {w: embedding_metrics(w, run) for w in seen + unseen}
        if cfg["scoredecomp_base"] != "word":
            try:
                run.word_vectors([cfg["scoredecomp_base"]])
            except InputError as error:
                raise InputError(f"--scoredecomp_base: {error}") from None
    if missing:
        print(f"[audit] skipped (not in the embedding): {', '.join(missing)}", file=sys.stderr)

    with timer("control 1: ScoreDecomp accuracy on test images"):
        control_rows, control_info = accuracy_control(score_model, cfg, dataset, k_list, out)
    k = cfg["k"] or choose_k(control_rows)
    k_origin = "set by --k" if cfg["k"] else f"best accuracy of --k_list {','.join(map(str, k_list))}"
    atomic_write_text(out / "controls.csv", compact_csv_text(
        [r | {"chosen": r["k"] == k} for r in control_rows],
        ("k", "t", "n", "correct", "accuracy", "ci_low", "ci_high", "mean_weight_true", "chosen")))
    plot_proportions([{"label": f"k={r['k']}", "share": r["accuracy"], "low": r["ci_low"], "high": r["ci_high"]}
                      for r in control_rows], out / "controls.png",
                     xlabel="ScoreDecomp k (timesteps from the clean end)",
                     ylabel="gender accuracy", title=f"ScoreDecomp accuracy on {control_info['n_images']} test images")

    words = seen + unseen
    vectors = dict(zip(words, run.word_vectors(words)))
    rows: list[dict] = []
    grids: dict[float, list[torch.Tensor]] = {g: [] for g in guidances}
    fidelity_rows: list[dict] = []
    expected = expected_shares(run.config["class_words"], load_prompts()) if procedural else {}
    counts = {"sampled": 0, "cached": 0}
    pairs = [(g, w) for g in guidances for w in words]
    per_image: dict[tuple[str, float], tuple[list[str], torch.Tensor]] = {}  # (hair calls, ScoreDecomp weights)
    with timer("sampling and calling gender"):
        for guidance, word in progress_bar(pairs, desc="(scale, word) sample sets"):
            is_seen = word in seen
            n_images = max(cfg["n_control"], cfg["n_per_word"]) if is_seen else cfg["n_per_word"]
            images, from_cache = cached_samples(run, word, vectors[word], guidance, n_images, cfg, out / "samples")
            counts["cached" if from_cache else "sampled"] += 1
            grids[guidance].append(images[:cfg["grid_per_word"]])
            base = scoredecomp_base(word, cfg)
            weights = scoredecomp_image_weights(score_model, images, base, k, f"scoredecomp/{word}/{guidance:g}", cfg)
            female, n, weight = calls_from_weights(weights, _FEMALE)
            rows.append(method_row(word, is_seen, guidance, "scoredecomp", female, n, len(images) - n, weight, base,
                                   k, embedding[word]))
            if procedural:
                attributes = measure_attributes(images)
                hair = [a["hair"] for a in attributes]  # long: female-presenting, short: male, none
                per_image[(word, guidance)] = (hair, weights)
                female, n, undetermined = attribute_calls(hair)
                rows.append(method_row(word, is_seen, guidance, "attribute", female, n, undetermined, math.nan, "",
                                       k, embedding[word]))
                if is_seen:
                    fidelity_rows.append(fidelity_row(word, guidance, attributes, expected))
            if cfg["elbo"]:
                female, n, prob = elbo_calls(score_model, images, derived_seed(cfg["seed"], "elbo", word), cfg)
                rows.append(method_row(word, is_seen, guidance, "elbo", female, n, len(images) - n, prob, "",
                                       k, embedding[word]))
    print(f"[audit] sample sets: {counts['sampled']} sampled, {counts['cached']} from the cache", flush=True)

    with timer("tables and plots"):
        by_key = {(r["word"], r["guidance"], r["method"]): r for r in rows}
        agreement = []
        if procedural:
            for guidance in guidances:
                for word in seen:
                    # both methods on the same images: those the attribute rule calls (hair detected)
                    hair, weights = per_image[(word, guidance)]
                    called = torch.tensor([h != "none" for h in hair])
                    a = counted_share(hair.count("long"), int(called.sum()))
                    s = counted_share(*calls_from_weights(weights[called], _FEMALE)[:2]) if called.any() else \
                        counted_share(0, 0)
                    difference = s["share"] - a["share"] if a["n"] and s["n"] else math.nan
                    agreement.append({"word": word, "guidance": guidance, "attribute": a, "scoredecomp": s,
                                      "difference": difference,
                                      "agree": bool(abs(difference) <= cfg["agreement_tolerance"] + 1e-12)})
        verdicts, failed = {}, []
        used = next(r for r in control_rows if r["k"] == k) if k in [r["k"] for r in control_rows] else None
        if used is not None:
            ok = used["ci_low"] > 0.5
            verdicts["accuracy"] = (f"At k = {k} the accuracy is {used['accuracy']:.3f} [{used['ci_low']:.3f}, "
                                    f"{used['ci_high']:.3f}]: " + ("above chance (0.5), pass." if ok else
                                                                   "**not above chance (0.5): FAIL.**"))
            if not ok:
                failed.append(f"ScoreDecomp accuracy at k = {k} not above chance")
        else:
            verdicts["accuracy"] = f"k = {k} (set by --k) was not among --k_list, so its accuracy was not measured."
        if fidelity_rows:
            failing = [f"{r['word']}" for r in fidelity_rows if r["bar"].startswith("FAIL")]
            verdicts["fidelity"] = ("Acceptance bar: every training word passes at guidance 1." if not failing else
                                    f"**Acceptance bar failed at guidance 1 for: {', '.join(failing)}.**")
            if failing:
                failed.append("conditioning fidelity (" + ", ".join(failing) + ")")
        if agreement:
            disagree = [f"{a['word']} (g {a['guidance']:g})" for a in agreement if not a["agree"]]
            verdicts["agreement"] = (f"ScoreDecomp and the attribute rule agree within "
                                     f"{cfg['agreement_tolerance']:.0%} on every training word." if not disagree else
                                     f"**Disagreement beyond {cfg['agreement_tolerance']:.0%}: "
                                     f"{', '.join(disagree)}.**")
            if disagree:
                failed.append("ScoreDecomp vs attribute rule (" + ", ".join(disagree) + ")")

        atomic_write_text(out / "proportions.csv", compact_csv_text(rows, PROPORTION_COLUMNS))
        if fidelity_rows:
            atomic_write_text(out / "fidelity.csv", compact_csv_text(fidelity_rows, list(fidelity_rows[0])))
        for guidance in guidances:
            save_image_grid(torch.cat(grids[guidance]), out / f"samples_g{guidance:g}.png",
                            nrow=min(cfg["grid_per_word"], cfg["n_per_word"]), labels=words)
        bar_plots: dict[float, list[str]] = {}
        for guidance in guidances:
            for method in methods:
                chosen = [by_key[(w, guidance, method)] for w in words if by_key[(w, guidance, method)]["n"]]
                if not chosen:
                    continue
                plot = f"shares_g{guidance:g}_{method}.png"
                plot_proportions([{"label": ("* " if r["seen"] else "") + r["word"], "share": r["share"],
                                   "low": r["ci_low"], "high": r["ci_high"]} for r in chosen], out / plot,
                                 ylabel="female share (95% CI)",
                                 title=f"{METHOD_NAMES[method]}, guidance {guidance:g} (* = training word)")
                bar_plots.setdefault(guidance, []).append(plot)
        fits = regression_fits(rows, guidances, methods, cfg, out)
        atomic_write_text(out / "regression.csv", compact_csv_text(
            fits, REGRESSION_COLUMNS))
        summary = {
            "run": str(run.run_dir), "run_step": run.step, "embedding": run.config["embedding"],
            "debias": run.config["debias"], "jl_seed": run.config["jl_seed"], "jl_dim": run.config["jl_dim"],
            "dataset": str(dataset), "dataset_source": source, "k": k, "k_origin": k_origin, "methods": methods,
            "guidance": guidances, "seen": seen, "unseen": unseen, "missing": missing, "trained_in_list": trained,
            "respelled": listing["respelled"],
            "controls_failed": failed, "config": cfg, "time_per_stage_s": timer.stages, **counts,
        }
        atomic_write_json(out / "audit.json", summary)
        ctx = dict(cfg=cfg, run=run, rows=rows, fits=fits, guidances=guidances, methods=methods,
                   embedding=embedding, control_rows=control_rows, control_info=control_info, k=k,
                   t=score_model.timestep_for_k(k), k_origin=k_origin, fidelity_rows=fidelity_rows,
                   agreement=agreement, verdicts=verdicts, failed=failed, attribute_note=attribute_note,
                   dataset=dataset, source=source, elbo=cfg["elbo"], device=device, origin=origin, unseen=unseen,
                   n_usable=len(usable), missing=missing, trained=trained, respelled=listing["respelled"],
                   bar_plots=bar_plots, timer=timer,
                   **counts)
    write_report(out, ctx)  # after the last stage, so its time is in the report
    print(f"[audit] wrote {out / 'report.md'}" + (f"; controls FAILED: {'; '.join(failed)}" if failed else ""))
    return summary


if __name__ == "__main__":
    run_main(main)
