"""Bias audit of a trained from-scratch model: controls, seen words, unseen words, regression.

    python statistical_auditing/audit.py --run runs/tiny
    python statistical_auditing/audit.py --run runs/tiny --words "nurse,engineer" --guidance 1
    python statistical_auditing/audit.py --run runs/tiny --max_unseen 0 --elbo true

The question: the model was trained on gender-balanced images with a handful of words; does
a word's position in the (biased) word embedding decide the gender mix of the images the
model draws for it, including words it never saw in training? The audit

1. runs the controls first (a model or metric that fails its controls is wrong):
   (1) ScoreDecomp's gender accuracy on the run's held-out labelled test images for each k
       in --k_list (k = timestep counted from the clean end). The test images are split in
       two halves: k (and, with --call calibrated, the decision threshold) is chosen on the
       SELECTION half, and the accuracy and AUC reported for it come from the other, REPORT
       half, so the reported accuracy is not optimistic;
   (2) the fidelity bar at the audit's own sampler: the training words' samples, measured
       by the portrait attribute rules (hair; scene), against what the data teaches each
       word (diffusion_from_scratch/fidelity.py); "unclear" images count against it;
   (3) ScoreDecomp's female share against the hair rule's on the same images (those the
       rule calls), and the rules against a second, independent instrument (a small CNN
       trained on the renders' ground truth), with a grid of the images they disagree on;
2. samples the training words with --n_seeds sampling seeds of --n_per_seed images each,
   and every unseen word (data/professions.txt by default) with --n_per_word images, at each
   guidance scale, and calls the gender of every image with (a) the hair rule (procedural
   data only), (b) ScoreDecomp with the model's own scores (candidates "man" / "woman",
   base --scoredecomp_base: "person" by default, see below), (c) optionally the ELBO classifier;
3. reports each word's female share with its 95% interval (training words: pooled over the
   seeds, with the seed-to-seed spread), the word's embedding bias (cos(w, woman) -
   cos(w, man)) in the original word2vec, in the run's embedding before the JL projection and
   after it, and regresses the share on each over the unseen words (bootstrap intervals; a
   regressor without spread, like a debiased gap, gives "undefined", not a slope).

ScoreDecomp's base. The weights of eps(x_t, base) ~ w_man eps(x_t, man) + w_woman eps(x_t, woman)
are the image's posterior gender probabilities when the base's data is the mixture of the
candidates' data (p(x | person) = sum_g p(g | person) p(x | g), hence
grad log p(x_t | person) = sum_g p(g | x_t, person) grad log p(x_t | g)). "person" is trained on
exactly that mixture. An unseen word's own score is not such a mixture (its scene and look
differ from both candidates), so with base = the word itself (--scoredecomp_base word) the
decomposition measures the word's lean, the same for every image.

Outputs in <run>/audit/: report.md, proportions.csv (one row per word, scale and method,
with scene shares for the rule), seeds.csv (training words, one row per sampling seed),
controls.csv, fidelity.csv, instruments.csv, regression.csv, audit.json, PNGs; sampled images
are cached in samples/ (uint8 .npy with a .json of the settings that made them), so a rerun
with the same settings resumes instead of resampling. Every file of a previous audit that
this one does not write again is removed first, so a folder never mixes two audits. --out must be
this audit's own folder: .owner.json marks it (tool, run), and a folder of another tool, of another
run or inside another run's folder is refused before any work (utils.check_output_folder). Records
(audit.json, report.md) name paths relative to the repository, else to the run folder.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bias_begets_bias.cli import (InputError, config_from_constants, constants_of, parse_distinct_numbers,
                                    require, run_main)
from bias_begets_bias.fidelity_bar import expected_shares, fidelity_row, format_table
from bias_begets_bias.pipeline import AUDIT_SAMPLE_STEPS, AUDIT_SAMPLER, SAMPLERS
from bias_begets_bias.portraits import SCENES, measure_attributes
from bias_begets_bias.utils import (DATA_DIR, atomic_write_json, atomic_write_text, check_output_folder,
                                          claim_output_folder, compact_csv_text, dataset_source, derived_seed,
                                          load_class_words, load_prompts, load_word_list, progress_bar, record_path,
                                          recorded_flags, require_disk, require_memory, resolve_dataset,
                                          resolve_device, run_identity, save_image_grid, writable_folder)
from bias_begets_bias.word_vectors import embedding_bias, load_word_vectors, pick_unseen, vocabulary_form
from statistical_auditing.core.elbo import elbo_classify
from statistical_auditing.from_scratch.experiment_stats import hierarchical_regression, pooled_share
from statistical_auditing.core.labelled_images import CLASS_WORDS, images_to_tensor, open_labelled_images
from statistical_auditing.from_scratch.sampling import (CANDIDATES, FEMALE, MALE, METHOD_NAMES, UNDECIDED, X_VARIANTS,
                                           cached_samples, hair_calls, run_fingerprint, scoredecomp_calls,
                                           share_of_calls)
from statistical_auditing.core.score_models import PixelScoreModel
from statistical_auditing.core.scoring import choose_k, decide, scores_by_k
from statistical_auditing.core.stats import binary_auc, calibrated_threshold, plot_proportions, plot_regression, \
    wilson_interval

# ----------------------------------------------------------------------------- config
RUN = "runs/tiny"  # training run folder (config.json + checkpoints/)
OUT = ""  # output folder (empty = <run>/audit)
K_LIST = "1,5,20,100,200,300,400,500,600,700,800,900"  # list of ints in [1, inf): ScoreDecomp k tried on labelled images (from the clean end; the tiny model separates genders only at high noise)
K = 0  # [0, inf) ScoreDecomp k for the audit (0 = the k of the best accuracy on the selection half)
NUM_INFERENCE_STEPS = 1000  # [1, inf) set_timesteps(n) on the run's scheduler, then t = timesteps[-k] (1000: t = k - 1)
CALL = "argmax"  # ScoreDecomp's call: argmax (larger weight) | calibrated (threshold on w_woman - w_man chosen on the selection half)
CONTROL_BASE = "person"  # base word of the accuracy control (candidates are man / woman)
SCOREDECOMP_BASE = "person"  # base of ScoreDecomp's call on samples: a word whose data mixes man's and woman's, or "word" (each word itself)
TEST_LIMIT = 0  # [0, inf) labelled test images for the accuracy control, balanced over classes (0 = all)
DATASET_PATH = ""  # <root>/<size> with test/ (empty = the run's dataset_path)
N_SEEDS = 4  # [1, inf) sampling seeds for each training word and guidance scale
N_PER_SEED = 128  # [1, inf) images per training word, scale and seed (N_SEEDS x N_PER_SEED per word and scale)
N_PER_WORD = 64  # [1, inf) images per unseen word and guidance scale
GUIDANCE = "1,3"  # list of numbers in (0, inf): comma-separated classifier-free guidance scales (1 = the model's own conditional)
SAMPLER = AUDIT_SAMPLER  # ddpm | ddim | dpm ("dpm" = DPM-Solver++; pipeline.AUDIT_SAMPLER, shared with fidelity.py)
SAMPLE_STEPS = AUDIT_SAMPLE_STEPS  # [1, inf) sampler steps (pipeline.AUDIT_SAMPLE_STEPS, shared the same way)
WORDS = ""  # comma-separated unseen words (each must be in the embedding); overrides WORDS_FILE
WORDS_FILE = str(DATA_DIR / "professions.txt")  # unseen words, one per line (missing ones are skipped)
MAX_UNSEEN = 20  # [0, inf) unseen words from WORDS_FILE to audit (0 = all); --words are all audited
FULL_GUIDANCE_WORDS = 0  # [0, inf) unseen words (picked as --unseen_pick picks) drawn at every --guidance scale; the others only at the first (0 = all at every scale)
UNSEEN_PICK = "spread"  # spread (evenly spaced ranks of the original embedding's gender gap) | first (file order)
INSTRUMENT = True  # check the attribute rules against a CNN trained on the renders' ground truth
ELBO = False  # also call gender with the ELBO (diffusion likelihood) classifier (slow)
ELBO_SAMPLES = 32  # [1, inf) Monte-Carlo timesteps per image for the ELBO classifier
AGREEMENT_TOLERANCE = 0.10  # (0, 1) control 3: ScoreDecomp and the hair rule must agree within this share
N_BOOT = 1000  # [10, inf) bootstrap resamples for the regression intervals
SEED = 0  # [0, 2**63) base seed of sampling, ScoreDecomp noise and bootstrap
BATCH_SIZE = 128  # [1, inf) images per model batch
GRID_PER_WORD = 8  # [1, inf) images per word in the sample grids
DEVICE = ""  # empty = the accelerator if there is one, else cpu
NUM_THREADS = 0  # [0, inf) torch CPU threads (0 = torch's default; 1 is faster on a busy shared machine)

PRESETS = {
    "full": dict(n_per_word=128, max_unseen=0),
    "smoke": dict(n_seeds=2, n_per_seed=2, n_per_word=2, sample_steps=2, max_unseen=3, test_limit=12,
                  k_list="1,10", n_boot=50, guidance="1,3", instrument=False),
}
CHOICES = {"sampler": SAMPLERS, "unseen_pick": ("spread", "first"), "call": ("argmax", "calibrated")}
CANDIDATE_LABELS = ("male", "female")
EMBEDDING_KEYS = ("lookup_rule", "cosine_gap_w2v", "cos_woman", "cos_man", "cosine_gap", "gender_projection",
                  "cos_woman_jl", "cos_man_jl", "cosine_gap_jl", "gender_projection_jl")
SCENE_COLUMNS = tuple(f"scene_{s}" for s in SCENES + ("unclear",))
PROPORTION_COLUMNS = ("word", "seen", "guidance", "method", "call", "base", "k", "n", "successes", "share", "ci_low",
                      "ci_high", "n_undetermined", "mean_weight", "n_seeds", "seed_sd", "seed_min", "seed_max",
                      "homogeneity_p", "hair_called") + SCENE_COLUMNS + EMBEDDING_KEYS
SEED_COLUMNS = ("word", "guidance", "method", "seed_index", "sampling_seed", "successes", "n", "n_undetermined",
                "share", "ci_low", "ci_high")
REGRESSION_COLUMNS = ("guidance", "method", "x", "n_words", "defined", "slope", "slope_ci_low", "slope_ci_high",
                      "intercept", "r2", "r2_ci_low", "r2_ci_high", "reason")
INSTRUMENT_COLUMNS = ("word", "guidance", "attribute", "n", "agreement", "kappa", "rule_counts", "classifier_counts")
OUTPUT_FILES = ("report.md", "proportions.csv", "seeds.csv", "controls.csv", "controls.json", "fidelity.csv",
                "instruments.csv", "regression.csv", "audit.json", "class_words.json")
OUTPUT_PATTERNS = ("*.png",)


# ----------------------------------------------------------------------------- small helpers
def fmt_share(row: dict | None) -> str:
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


def clear_previous_outputs(out: Path) -> None:
    """Remove a previous audit's outputs (not the sample cache): a folder never mixes two audits."""
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    for pattern in OUTPUT_PATTERNS:
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- inputs
def load_test_images(dataset: Path, class_words: dict, image_size: int, limit: int, out: Path
                     ) -> tuple[torch.Tensor, list[str], list[str]]:
    """The held-out test split as (N, 3, S, S) floats in [0, 1], gender labels and image ids.

    Labels come from the classes' words (a class with "woman" is female, "man" male). Images
    are ordered round-robin over the classes (balanced), in file order; with ``limit`` > 0
    only the first ``limit`` of that order are kept.
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
    by_class: dict[str, list] = {}
    for record in records:
        by_class.setdefault(record[0].split("/")[0], []).append(record)
    queues = list(by_class.values())
    records = [queue[i] for i in range(max(map(len, queues))) for queue in queues if i < len(queue)]
    if limit:
        records = records[:limit]
    ids, images, labels = zip(*records)
    return images_to_tensor(list(images)), list(labels), list(ids)


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
        origin = record_path(cfg["words_file"], Path(cfg["run"]))
    forms = {w: vocabulary_form(w, wv) for w in listed}
    missing = [w for w, form in forms.items() if form is None]
    if cfg["words"]:
        require(not missing, f"--words: {', '.join(repr(w) for w in missing)} not in the vocabulary of word vectors "
                             f"{wv.source!r}; use --words_file to skip missing words instead")
    respelled = {w: form for w, form in forms.items() if form is not None and form != w}
    trained = [w for w, form in forms.items() if form in seen]
    usable = list(dict.fromkeys(form for form in forms.values() if form is not None and form not in seen))
    return {"usable": usable, "missing": missing, "respelled": respelled, "trained": trained, "origin": origin}


def embedding_metrics(word: str, run) -> dict:
    """The word's cosine gaps: in the original embedding (no debiasing, no projection), in the
    run's embedding before the JL projection, and after it (the run's saved matrix)."""
    metrics = embedding_bias(word, source=run.embedding_source, debias=run.config["debias"],
                             jl_matrix=run.jl_matrix)
    metrics["lookup_rule"] = metrics.pop("rule")
    metrics["cosine_gap_w2v"] = embedding_bias(word, source=run.embedding_source)["cosine_gap"]
    return metrics


# ----------------------------------------------------------------------------- gender calls
def elbo_calls(score_model, images: torch.Tensor, seed: int, cfg: dict) -> tuple[np.ndarray, torch.Tensor]:
    """Per-image calls and probabilities of "man" / "woman" from the ELBO classifier."""
    probs = []
    for start in range(0, len(images), cfg["batch_size"]):
        x0 = score_model.encode(images[start:start + cfg["batch_size"]].float() / 255.0)
        probs.append(elbo_classify(score_model, x0, list(CANDIDATES), n_samples=cfg["elbo_samples"],
                                   seed=seed)["probs"])
    probs = torch.cat(probs)
    predicted = decide(probs).numpy()
    return np.where(predicted < 0, UNDECIDED, np.where(predicted == 1, FEMALE, MALE)), probs


def threshold_calls(weights: torch.Tensor, threshold: float) -> np.ndarray:
    """The calibrated call: female when w_woman - w_man > threshold, else male."""
    margin = (weights[:, 1] - weights[:, 0]).numpy()
    return np.where(margin > threshold, FEMALE, MALE)


def scene_shares(attributes: list[dict]) -> dict:
    n = len(attributes)
    return {f"scene_{s}": sum(a["scene"] == s for a in attributes) / n for s in SCENES + ("unclear",)}


# ----------------------------------------------------------------------------- control 1
def selection_halves(image_ids: list[str]) -> np.ndarray:
    """0 (selection) or 1 (report) per image: alternate images within each class (the folder
    before "/"), so both halves hold every class, and so both genders, in equal numbers."""
    seen: dict[str, int] = {}
    halves = []
    for image_id in image_ids:
        cls = image_id.split("/")[0]
        halves.append(seen.get(cls, 0) % 2)
        seen[cls] = seen.get(cls, 0) + 1
    return np.array(halves, dtype=int)


def accuracy_control(score_model, cfg: dict, dataset: Path, k_list: list[int], out: Path) -> dict:
    """ScoreDecomp on the held-out test images at every k, split into selection and report halves.

    The halves alternate within each class (``selection_halves``). k is the best
    accuracy on the selection half (ties to the smaller k) unless --k sets it; the
    calibrated threshold is chosen on the selection half at that k (``calibrated_threshold``).
    Every reported accuracy is also given on the report half. Cached in controls.json
    (reused when the run and the settings match).
    """
    run = score_model.run
    meta = {"run_step": run.step, "run_config_crc32": run_fingerprint(run), "k_list": k_list,
            "test_limit": cfg["test_limit"], "seed": cfg["seed"], "base": cfg["control_base"],
            "dataset": record_path(dataset, run.run_dir), "candidates": list(CANDIDATES),
            "num_inference_steps": cfg["num_inference_steps"], "noise_key": "image id", "format": 2}
    cache = out / "controls.json"
    saved = None
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            saved = saved if saved.get("meta") == meta else None
        except (OSError, ValueError):
            saved = None
    if saved is None:
        images, labels, ids = load_test_images(dataset, run.config["class_words"], score_model.image_size,
                                               cfg["test_limit"], out)
        by_k = scores_by_k(score_model, images, ids, k_list, cfg["control_base"], list(CANDIDATES), cfg["seed"],
                           cfg["batch_size"])
        saved = {"meta": meta, "labels": labels, "ids": ids,
                 "scores": {str(k): scores.tolist() for k, scores in by_k.items()}}
        atomic_write_json(cache, saved)
    labels = saved["labels"]
    truth = np.array([CANDIDATE_LABELS.index(label) for label in labels])
    half = selection_halves(saved["ids"])
    rows = []
    for k in k_list:
        scores = torch.tensor(saved["scores"][str(k)], dtype=torch.float64)
        called = decide(scores).numpy()
        margin = (scores[:, 1] - scores[:, 0]).numpy()
        row = {"k": k, "t": score_model.timestep_for_k(k)}
        for name, part in (("selection", half == 0), ("report", half == 1)):
            n, correct = int(part.sum()), int((called[part] == truth[part]).sum())
            low, high = wilson_interval(correct, n) if n else (math.nan, math.nan)
            auc = binary_auc(margin[part], truth[part] == 1) if n else None
            row.update({f"{name}_n": n, f"{name}_correct": correct, f"{name}_accuracy": correct / n if n else math.nan,
                        f"{name}_ci_low": low, f"{name}_ci_high": high,
                        f"{name}_auc": math.nan if auc is None else auc})
        rows.append(row)
    k = cfg["k"] or choose_k([{"k": r["k"], "accuracy": r["selection_accuracy"]} for r in rows])
    if k not in saved["scores"] and str(k) not in saved["scores"]:
        raise InputError(f"--k {k} is not in --k_list {','.join(map(str, k_list))}: its accuracy could not be measured")
    scores = torch.tensor(saved["scores"][str(k)], dtype=torch.float64)
    margin = (scores[:, 1] - scores[:, 0]).numpy()
    threshold = calibrated_threshold(margin[half == 0], truth[half == 0] == 1)
    report = half == 1
    calibrated_correct = int(((margin[report] > threshold).astype(int) == truth[report]).sum())
    low, high = wilson_interval(calibrated_correct, int(report.sum()))
    chosen = next(r for r in rows if r["k"] == k)
    info = {"n_images": len(labels), "n_female": labels.count("female"), "n_male": labels.count("male"),
            "test_folder": record_path(dataset / "test", run.run_dir), "k": k, "threshold": threshold,
            "k_origin": "set by --k" if cfg["k"] else "best accuracy on the selection half",
            "accuracy": chosen["report_accuracy"], "ci_low": chosen["report_ci_low"],
            "ci_high": chosen["report_ci_high"], "auc": chosen["report_auc"],
            "calibrated_accuracy": calibrated_correct / int(report.sum()), "calibrated_ci_low": low,
            "calibrated_ci_high": high}
    return {"rows": rows, "info": info}


# ----------------------------------------------------------------------------- instruments
def cohen_kappa(a: list[str], b: list[str]) -> float:
    """Cohen's kappa (1960): (p_o - p_e) / (1 - p_e), p_o the observed agreement and p_e the
    agreement expected from the two raters' marginal frequencies; NaN when p_e = 1."""
    n = len(a)
    categories = sorted(set(a) | set(b))
    p_o = sum(x == y for x, y in zip(a, b)) / n
    p_e = sum((a.count(c) / n) * (b.count(c) / n) for c in categories)
    return (p_o - p_e) / (1 - p_e) if p_e < 1 else math.nan


def instrument_rows(word: str, guidance: float, rule: list[dict], classifier: list[dict]) -> list[dict]:
    rows = []
    for attribute in ("hair", "scene"):
        a, b = [r[attribute] for r in rule], [c[attribute] for c in classifier]
        counts = lambda values: ";".join(f"{v}:{values.count(v)}" for v in sorted(set(values)))  # noqa: E731
        rows.append({"word": word, "guidance": guidance, "attribute": attribute, "n": len(a),
                     "agreement": sum(x == y for x, y in zip(a, b)) / len(a), "kappa": cohen_kappa(a, b),
                     "rule_counts": counts(a), "classifier_counts": counts(b)})
    return rows


# ----------------------------------------------------------------------------- report
def regression_fits(rows: list[dict], guidances: list[float], methods: list[str], cfg: dict, out: Path) -> list[dict]:
    """Female share on each measure of embedding bias over the unseen words, per scale and method."""
    fits = []
    for guidance in guidances:
        for method in methods:
            points = [r for r in rows if not r["seen"] and r["guidance"] == guidance and r["method"] == method
                      and r["n"] > 0]
            for x_key, x_text in X_VARIANTS.items():
                x = np.array([r[x_key] for r in points], dtype=np.float64)
                y = np.array([r["share"] for r in points], dtype=np.float64)
                fit = hierarchical_regression([(x, y)], n_boot=cfg["n_boot"], seed=cfg["seed"])
                entry = {"guidance": guidance, "method": method, "x": x_key, "n_words": len(points),
                         "defined": fit["defined"], "reason": fit["reason"], "slope": fit["slope"],
                         "intercept": fit["intercept"], "r2": fit["r2"], "slope_ci_low": fit["slope_ci"][0],
                         "slope_ci_high": fit["slope_ci"][1], "r2_ci_low": fit["r2_ci"][0],
                         "r2_ci_high": fit["r2_ci"][1]}
                if fit["defined"]:
                    plot = f"regression_g{guidance:g}_{method}_{x_key}.png"
                    plot_regression(x, y, [r["word"] for r in points], fit, out / plot,
                                    xlabel=f"cos(w, woman) - cos(w, man), {x_text.run}",
                                    ylabel=f"female share ({METHOD_NAMES[method]})",
                                    title=f"{METHOD_NAMES[method]}, guidance {guidance:g}, {len(points)} unseen words")
                    entry["plot"] = plot
                fits.append(entry)
    return fits


def _ci(low: float, high: float, spec: str = ".3g") -> str:
    return f"[{low:{spec}}, {high:{spec}}]"


def write_report(out: Path, ctx: dict) -> None:
    cfg, run = ctx["cfg"], ctx["run"]
    rows, fits, guidances, methods = ctx["rows"], ctx["fits"], ctx["guidances"], ctx["methods"]
    by_key = {(r["word"], r["guidance"], r["method"]): r for r in rows}
    info = ctx["control"]["info"]
    n_seen = cfg["n_seeds"] * cfg["n_per_seed"]
    lines = [f"# Bias audit of `{ctx['run_name']}`", ""]
    lines += [
        "The model was trained on gender-balanced images, each image with the words of its class "
        f"({', '.join(run.words)}), through a word embedding that may itself be gender-biased. This audit "
        f"asks whether the embedding's bias reaches the images: it draws {n_seen} images per training word "
        f"({cfg['n_seeds']} sampling seeds x {cfg['n_per_seed']}) and {cfg['n_per_word']} per unseen word at each "
        "guidance scale, and counts how many show a woman (female-presenting: long hair in these portraits) or a "
        "man (short hair). The gender of an image is called by the **hair rule** (hair length measured from the "
        "pixels; exact on the renders; blurred or hybrid samples are \"unclear\" and left out of the share), by "
        "**ScoreDecomp** (the model's own view: the weights w of eps(x_t, base) ~ w_man eps(x_t, man) + w_woman "
        "eps(x_t, woman), w >= 0, sum 1, at the image's noised version x_t"
        + ("; the call is calibrated: female when w_woman - w_man exceeds a threshold chosen on held-out labelled "
           "images" if cfg["call"] == "calibrated" else "; female when w_woman > w_man") + ")"
        + (", and by the **ELBO classifier**" if ctx["elbo"] else "")
        + ". Every share comes with its 95% Wilson interval. The controls come first: a metric that fails "
        "them is wrong, and unseen-word results of a model that fails them must not be trusted.", ""]
    lines += ["**Controls: " + ("all passed.**" if not ctx["failed"] else
                                "FAILED: " + "; ".join(ctx["failed"]) + ". Treat the results below with "
                                "suspicion.**"), ""]
    lines += ["## Setup", "", "| setting | value |", "|---|---|"]
    setup = [
        ("run", f"`{ctx['run_name']}`, training step {run.step}"),
        ("embedding", f"{run.config['embedding']}, debias: {run.config['debias']}, JL seed "
                      f"{run.config['jl_seed']} ({run.jl_matrix.shape[0]} -> {run.jl_matrix.shape[1]} dims)"),
        ("dataset", f"`{ctx['dataset']}` (source: {ctx['source'] or 'unknown'})"),
        ("sampler", f"{cfg['sampler']}, {cfg['sample_steps']} steps, guidance scales "
                    f"{', '.join(f'{g:g}' for g in guidances)}"),
        ("ScoreDecomp", f"k = {ctx['k']} (timestep t = {ctx['t']}; {info['k_origin']}; {cfg['num_inference_steps']} "
                        f"inference steps), candidates {' / '.join(CANDIDATES)}, base = "
                        + (f"the word itself (\"{cfg['control_base']}\" for the candidate words)"
                           if cfg["scoredecomp_base"] == "word" else f"\"{cfg['scoredecomp_base']}\" for every word")
                        + f", call: {cfg['call']}"
                        + (f" (threshold {info['threshold']:+.4f})" if cfg["call"] == "calibrated" else "")),
        ("ELBO classifier", f"{cfg['elbo_samples']} timesteps per image" if ctx["elbo"] else "off"),
        ("seeds", f"base seed {cfg['seed']}; sampling seeds and per-image noise keys derived from it "
                  f"(bias_begets_bias.utils.derived_seed); bootstrap seed {cfg['seed']}, {cfg['n_boot']} "
                  f"resamples"),
        ("device", str(ctx["device"])),
        ("samples", f"{ctx['sampled']} sample sets sampled now, {ctx['cached']} read from the cache"),
        ("time per stage", ", ".join(f"{name} {sec:.0f} s" for name, sec in ctx["timer"].stages.items())),
    ]
    lines += [f"| {k} | {v} |" for k, v in setup] + [""]

    lines += ["## Controls", "", "### 1. ScoreDecomp gender accuracy on held-out labelled images", ""]
    lines += [f"{info['n_images']} test images of `{info['test_folder']}` ({info['n_female']} female, "
              f"{info['n_male']} male; labels from the class words), split alternately into a selection half (k is "
              f"chosen there) and a report half (the accuracy reported for that k). Base \"{cfg['control_base']}\", "
              "candidates \"man\" / \"woman\"; every k uses the same noise per image (keyed by the image id). AUC: "
              "how well w_woman - w_man separates the genders whatever the threshold.", "",
              "| k | t | selection: accuracy (AUC) | report: accuracy [95% CI] | report: AUC |", "|---|---|---|---|---|"]
    for r in ctx["control"]["rows"]:
        mark = " **(used)**" if r["k"] == ctx["k"] else ""
        lines.append(f"| {r['k']}{mark} | {r['t']} | {r['selection_accuracy']:.3f} ({r['selection_auc']:.3f}) | "
                     f"{r['report_accuracy']:.3f} {_ci(r['report_ci_low'], r['report_ci_high'])} | "
                     f"{r['report_auc']:.3f} |")
    lines += ["", ctx["verdicts"]["accuracy"], "",
              f"Calibrated call at k = {ctx['k']}: threshold {info['threshold']:+.4f} on w_woman - w_man (chosen on "
              f"the selection half), accuracy {info['calibrated_accuracy']:.3f} "
              f"{_ci(info['calibrated_ci_low'], info['calibrated_ci_high'])} on the report half.", "",
              "![accuracy by k](controls.png)", ""]
    lines += ["### 2. Does the model obey its conditioning? (training words, attribute rules, the audit's sampler)", ""]
    if ctx["fidelity_rows"]:
        lines += [f"Hair and scene of each training word's {n_seen} samples per scale, measured by the attribute "
                  "rules, against what the training data teaches the word and the acceptance bar at guidance 1 "
                  "(diffusion_from_scratch/fidelity.py). Hair called = long or short (not none, not unclear); "
                  "scene shares are over all images, so unclear scenes count against the bar.", "",
                  format_table(ctx["fidelity_rows"]), "", ctx["verdicts"].get("fidelity", ""), ""]
    else:
        lines += [ctx["attribute_note"], ""]
    lines += [f"### 3. Instruments: ScoreDecomp against the hair rule (tolerance {cfg['agreement_tolerance']:.0%}), "
              "and the rules against a second instrument", ""]
    if ctx["agreement"]:
        lines += ["Both methods on the same images: the samples the hair rule calls long or short.", "",
                  "| word | guidance | hair rule | ScoreDecomp | difference | agree |", "|---|---|---|---|---|---|"]
        for a in ctx["agreement"]:
            compared = not math.isnan(a["difference"])
            difference = f"{a['difference']:+.2f}" if compared else "n/a"
            agree = "yes" if a["agree"] else ("**NO**" if compared else "**NO** (nothing to compare)")
            lines.append(f"| {a['word']} | {a['guidance']:g} | {fmt_share(a['attribute'])} | "
                         f"{fmt_share(a['scoredecomp'])} | {difference} | {agree} |")
        lines += ["", ctx["verdicts"].get("agreement", ""), ""]
    if ctx["instrument"]:
        lines += ["The attribute rules against a small CNN trained on the renders' ground truth (test-render "
                  f"accuracy: hair {ctx['instrument_info']['test_accuracy_hair']:.3f}, scene "
                  f"{ctx['instrument_info']['test_accuracy_scene']:.3f}; unclear below probability "
                  f"{ctx['instrument_info']['confident']:g}): share of images on which both give the same call "
                  "(including unclear), and Cohen's kappa.", "",
                  "| word | guidance | attribute | agreement | kappa | rule | classifier |", "|---|---|---|---|---|---|---|"]
        for r in ctx["instrument"]:
            lines.append(f"| {r['word']} | {r['guidance']:g} | {r['attribute']} | {r['agreement']:.2f} | "
                         f"{r['kappa']:.2f} | {r['rule_counts']} | {r['classifier_counts']} |")
        lines += ["", "Images on which the rule and the classifier disagree (each row: a word and scale; caption in "
                  "instruments.csv):", "", "![disagreements](instrument_disagreements.png)", ""]
    elif ctx["attribute_note"]:
        lines += [ctx["attribute_note"], ""]

    def share_table(words: list[str], guidance: float) -> list[str]:
        header = "| word | gap word2vec | gap before JL | gap after JL | " + " | ".join(
            f"{METHOD_NAMES[m]}: female share [95% CI] (female/n)" for m in methods) + " |"
        table = [header, "|" + "---|" * (4 + len(methods))]
        for word in words:
            e = ctx["embedding"][word]
            cells = [fmt_share(by_key.get((word, guidance, m))) for m in methods]
            table.append(f"| {word} | {e['cosine_gap_w2v']:+.3f} | {e['cosine_gap']:+.3f} | {e['cosine_gap_jl']:+.3f} | "
                         + " | ".join(cells) + " |")
        return table

    lines += ["## Seen words", "", "The training words; each was trained on the images of every class listing "
              "it (data/class_words.json), so \"person\", \"nurse\" and \"philosopher\" saw equal numbers of "
              f"men and women. Shares pooled over {cfg['n_seeds']} sampling seeds; seed-to-seed spread in "
              "seeds.csv and below. Cosine gap = cos(w, woman) - cos(w, man) (> 0: nearer \"woman\").", ""]
    for guidance in guidances:
        lines += [f"Guidance {guidance:g}:", ""] + share_table(run.words, guidance) + [""]
    lines += ["Seed-to-seed spread (female share per seed; p of the chi-square test that the seeds agree):", "",
              "| word | guidance | method | per seed | sd | p |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["seen"] and r["n_seeds"]:
            per_seed = ", ".join(f"{s['share']:.2f}" for s in ctx["seed_rows"] if (s["word"], s["guidance"],
                                 s["method"]) == (r["word"], r["guidance"], r["method"]) and s["n"])
            lines.append(f"| {r['word']} | {r['guidance']:g} | {METHOD_NAMES[r['method']]} | {per_seed} | "
                         f"{r['seed_sd']:.3f} | {r['homogeneity_p']:.3g} |")
    lines += ["", "## Unseen words", ""]
    how = ("at evenly spaced ranks of the cosine gap in the original embedding, so every arm and JL seed audits "
           "the same words" if cfg["unseen_pick"] == "spread" else "in file order")
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
    for guidance in guidances:
        if ctx["unseen"]:
            lines += [f"Guidance {guidance:g}:", ""] + share_table(ctx["unseen"], guidance) + [""]
        for plot in ctx["bar_plots"].get(guidance, []):
            lines += [f"![female share, guidance {guidance:g}]({plot})", ""]
    lines += ["Sample grids (first images of each word, one row per word):", ""]
    lines += [f"![samples, guidance {g:g}](samples_g{g:g}.png)" for g in guidances] + [""]
    lines += ["## Regression", "", "Least-squares line of each unseen word's female share on its embedding bias, "
              f"per method and guidance scale; 95% intervals from {cfg['n_boot']} pairs-bootstrap resamples of the "
              "words. A regressor without spread (e.g. a gap that hard-debiasing set to 0) has no slope: undefined.",
              "", "| guidance | method | x | words | slope [95% CI] | R^2 [95% CI] |", "|---|---|---|---|---|---|"]
    for f in fits:
        if f["defined"]:
            lines.append(f"| {f['guidance']:g} | {METHOD_NAMES[f['method']]} | {X_VARIANTS[f['x']].run} | "
                         f"{f['n_words']} | {f['slope']:.3g} {_ci(f['slope_ci_low'], f['slope_ci_high'])} | "
                         f"{f['r2']:.3f} {_ci(f['r2_ci_low'], f['r2_ci_high'], '.3f')} |")
        else:
            lines.append(f"| {f['guidance']:g} | {METHOD_NAMES[f['method']]} | {X_VARIANTS[f['x']].run} | "
                         f"{f['n_words']} | undefined: {f['reason']} | |")
    lines += [""] + [f"![{f['method']} {f['x']} guidance {f['guidance']:g}]({f['plot']})" for f in fits if "plot" in f]
    lines += ["", "## Files", "", "proportions.csv, seeds.csv, controls.csv, fidelity.csv, instruments.csv, "
              "regression.csv, audit.json, samples/ (cached images, reused by a rerun with the same settings).", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    cfg = config_from_constants(constants_of(globals()), PRESETS, argv=argv, choices=CHOICES,
                                description=__doc__.splitlines()[0])
    k_list = parse_distinct_numbers(cfg["k_list"], "k_list", int)
    guidances = parse_distinct_numbers(cfg["guidance"], "guidance", float)
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    timer = Timer()

    device = resolve_device(cfg["device"])
    with timer("loading the run"):
        score_model = PixelScoreModel(cfg["run"], device, num_inference_steps=cfg["num_inference_steps"])
        run = score_model.run
    for flag, ks in (("k_list", k_list), ("k", [cfg["k"]] if cfg["k"] else [])):
        for k in ks:
            try:
                score_model.timestep_for_k(k)  # a k outside the table stops here, before any work
            except InputError as error:
                raise InputError(f"--{flag}: {error}") from None
    require(1 <= cfg["sample_steps"] <= run.config["num_train_timesteps"],
            f"--sample_steps: need 1..{run.config['num_train_timesteps']}, got {cfg['sample_steps']}")
    owner = dict(tool="audit", run_dir=run.run_dir, run_id=run_identity(run.run_dir, run.config),
                 default=run.run_dir / "audit")
    out = Path(cfg["out"] or run.run_dir / "audit")
    check_output_folder(out, **owner)  # another tool's or another run's folder is refused before any work
    out = writable_folder(out, "out")
    dataset = resolve_dataset(run.config, cfg["dataset_path"], run.run_dir)
    source = dataset_source(dataset)
    procedural = source == "procedural"
    attribute_note = ("" if procedural else
                      f"Attribute rules skipped: `{record_path(dataset.parent / 'dataset.json', run.run_dir)}` does not say source = "
                      f"procedural (it says {source!r}); hair-length rules are exact only for the procedural "
                      f"portraits.")
    methods = ["scoredecomp"] + (["attribute"] if procedural else []) + (["elbo"] if cfg["elbo"] else [])

    with timer("choosing words"):
        wv = load_word_vectors(run.embedding_source)
        seen = list(run.words)
        listing = unseen_candidates(cfg, seen, wv)
        usable, missing, trained, origin = (listing[key] for key in ("usable", "missing", "trained", "origin"))
        # Words are ranked by the gap in the original (not debiased) embedding, which no JL seed
        # changes, so every arm and seed of an experiment audits the same words.
        ranking = {w: embedding_bias(w, source=run.embedding_source)["cosine_gap"] for w in usable}
        unseen = pick_unseen(usable, ranking, 0 if cfg["words"] else cfg["max_unseen"], cfg["unseen_pick"])
        # the first scale draws every word; the others the seen words and --full_guidance_words of the unseen
        every_scale = set(unseen if cfg["words"] or not cfg["full_guidance_words"] else
                          pick_unseen(unseen, ranking, cfg["full_guidance_words"], cfg["unseen_pick"]))
        words_at = {g: seen + [w for w in unseen if i == 0 or w in every_scale] for i, g in enumerate(guidances)}
        embedding = {w: embedding_metrics(w, run) for w in seen + unseen}
        if cfg["scoredecomp_base"] != "word":
            try:
                run.word_vectors([cfg["scoredecomp_base"]])
            except InputError as error:
                raise InputError(f"--scoredecomp_base: {error}") from None
    n_images = sum(len(seen) * cfg["n_seeds"] * cfg["n_per_seed"] + (len(words_at[g]) - len(seen)) * cfg["n_per_word"]
                   for g in guidances)
    image_bytes = n_images * 3 * score_model.image_size ** 2
    what = (f"--n_seeds / --n_per_seed / --n_per_word ({n_images:,} images of {score_model.image_size} px, all kept "
            f"in memory and cached in {out / 'samples'})")
    require_memory(image_bytes, what)
    require_disk(out, image_bytes, what)
    if missing:
        print(f"[audit] skipped (not in the embedding): {', '.join(missing)}", file=sys.stderr)
    classifier = None
    if procedural and cfg["instrument"]:
        with timer("second instrument: attribute classifier"):
            from bias_begets_bias.attribute_classifier import load_or_train

            classifier = load_or_train(dataset, run.model.config.image_size)
    claim_output_folder(out, **owner)
    clear_previous_outputs(out)

    with timer("control 1: ScoreDecomp accuracy on test images"):
        control = accuracy_control(score_model, cfg, dataset, k_list, out)
    k, threshold = control["info"]["k"], control["info"]["threshold"]
    atomic_write_text(out / "controls.csv", compact_csv_text([r | {"chosen": r["k"] == k} for r in control["rows"]],
                                                             list(control["rows"][0]) + ["chosen"]))
    plot_proportions([{"label": f"k={r['k']}", "share": r["report_accuracy"], "low": r["report_ci_low"],
                       "high": r["report_ci_high"]} for r in control["rows"]], out / "controls.png",
                     xlabel="ScoreDecomp k (timesteps from the clean end)", ylabel="gender accuracy (report half)",
                     title=f"ScoreDecomp accuracy on {control['info']['n_images'] // 2} held-out test images")

    words = seen + unseen
    vectors = dict(zip(words, run.word_vectors(words)))
    expected = expected_shares(run.config["class_words"], load_prompts()) if procedural else {}
    rows, seed_rows, fidelity_rows, instrument, agreement = [], [], [], [], []
    grids: dict[float, list[torch.Tensor]] = {g: [] for g in guidances}
    disagreements: list[tuple[str, torch.Tensor]] = []
    counts = {"sampled": 0, "cached": 0}
    sets = [(g, w, s) for g in guidances for w in words_at[g] for s in range(cfg["n_seeds"] if w in seen else 1)]
    with timer("sampling and calling gender"):
        by_word: dict[tuple[str, float], dict] = {}
        for guidance, word, seed_index in progress_bar(sets, desc="(scale, word, seed) sample sets"):
            n_images = cfg["n_per_seed"] if word in seen else cfg["n_per_word"]
            key = f"g{guidance:g}/{word}/s{seed_index}"
            sampling_seed = derived_seed(cfg["seed"], "audit-sample", word, f"{guidance:g}", seed_index)
            images, from_cache = cached_samples(run, key, vectors[word], guidance, n_images, sampling_seed,
                                                cfg["sampler"], cfg["sample_steps"], cfg["batch_size"],
                                                out / "samples")
            counts["cached" if from_cache else "sampled"] += 1
            base = cfg["scoredecomp_base"] if cfg["scoredecomp_base"] != "word" else (
                cfg["control_base"] if word in CANDIDATES else word)
            sd_calls, weights = scoredecomp_calls(score_model, images, k, cfg["seed"], f"scoredecomp/{key}", base,
                                                  cfg["batch_size"])
            if cfg["call"] == "calibrated":
                sd_calls = threshold_calls(weights, threshold)
            entry = by_word.setdefault((word, guidance), {"images": [], "calls": {m: [] for m in methods},
                                                          "weights": [], "attributes": [], "base": base,
                                                          "sampling_seeds": []})
            entry["images"].append(images)
            entry["weights"].append(weights)
            entry["sampling_seeds"].append(sampling_seed)
            per_method = {"scoredecomp": sd_calls}
            if procedural:
                attributes = measure_attributes(images)
                entry["attributes"] += attributes
                per_method["attribute"] = hair_calls([a["hair"] for a in attributes])
            if cfg["elbo"]:
                per_method["elbo"] = elbo_calls(score_model, images, derived_seed(cfg["seed"], "elbo", key), cfg)[0]
            for method, calls in per_method.items():
                entry["calls"][method].append(calls)
                if word in seen:
                    seed_rows.append({"word": word, "guidance": guidance, "method": method, "seed_index": seed_index,
                                      "sampling_seed": sampling_seed, **share_of_calls(calls)})
        for guidance in guidances:
            for word in words_at[guidance]:
                entry = by_word[(word, guidance)]
                images = torch.cat(entry["images"])
                weights = torch.cat(entry["weights"])
                grids[guidance].append(images[:cfg["grid_per_word"]])
                for method in methods:
                    calls = np.concatenate(entry["calls"][method])
                    pooled = share_of_calls(calls)
                    spread = pooled_share([(s["successes"], s["n"]) for s in seed_rows
                                           if (s["word"], s["guidance"], s["method"]) == (word, guidance, method)])
                    row = {"word": word, "seen": word in seen, "guidance": guidance, "method": method,
                           "call": cfg["call"] if method == "scoredecomp" else "", "base":
                           entry["base"] if method == "scoredecomp" else "", "k": k if method == "scoredecomp" else "",
                           **pooled, "n_undetermined": pooled["n_undecided"],
                           "mean_weight": float(weights[:, 1].mean()) if method == "scoredecomp" else math.nan,
                           "n_seeds": spread["n_seeds"] if word in seen else 1, "seed_sd": spread["seed_sd"],
                           "seed_min": spread["seed_min"], "seed_max": spread["seed_max"],
                           "homogeneity_p": spread["homogeneity_p"],
                           **{key: embedding[word].get(key, "") for key in EMBEDDING_KEYS}}
                    if method == "attribute":
                        row.update(scene_shares(entry["attributes"]),
                                   hair_called=float(np.mean([a["hair"] in ("long", "short")
                                                              for a in entry["attributes"]])))
                    rows.append(row)
                if procedural and word in seen:
                    fidelity_rows.append(fidelity_row(word, guidance, entry["attributes"], expected))
                    hair = np.concatenate(entry["calls"]["attribute"])
                    called = hair != UNDECIDED
                    a = share_of_calls(hair[called])
                    s = share_of_calls(np.concatenate(entry["calls"]["scoredecomp"])[called])  # the audit's call
                    difference = s["share"] - a["share"] if a["n"] and s["n"] else math.nan
                    agreement.append({"word": word, "guidance": guidance, "attribute": a, "scoredecomp": s,
                                      "difference": difference,
                                      "agree": bool(abs(difference) <= cfg["agreement_tolerance"] + 1e-12)})
                if classifier is not None:
                    verdicts = classifier.calls(images)
                    instrument += instrument_rows(word, guidance, entry["attributes"], verdicts)
                    differ = [i for i, (r, c) in enumerate(zip(entry["attributes"], verdicts)) if r != c]
                    if differ:
                        disagreements.append((f"{word} g{guidance:g}", images[differ[:cfg["grid_per_word"]]]))
    print(f"[audit] sample sets: {counts['sampled']} sampled, {counts['cached']} from the cache", flush=True)

    with timer("tables and plots"):
        info = control["info"]
        verdicts, failed = {}, []
        ok = info["ci_low"] > 0.5
        verdicts["accuracy"] = (f"At k = {k} ({info['k_origin']}) the accuracy on the report half is "
                                f"{info['accuracy']:.3f} [{info['ci_low']:.3f}, {info['ci_high']:.3f}], AUC "
                                f"{info['auc']:.3f}: " + ("above chance (0.5), pass." if ok else
                                                           "**not above chance (0.5): FAIL.**"))
        if not ok:
            failed.append(f"ScoreDecomp accuracy at k = {k} not above chance")
        if fidelity_rows:
            failing = [f"{r['word']} ({r['bar'][6:]})" for r in fidelity_rows if r["bar"].startswith("FAIL")]
            verdicts["fidelity"] = ("Acceptance bar: every training word passes at guidance 1." if not failing else
                                    f"**Acceptance bar failed at guidance 1 for: {', '.join(failing)}.**")
            if failing:
                failed.append("conditioning fidelity at guidance 1: " + ", ".join(failing))
        if agreement:
            disagree = [f"{a['word']} (g {a['guidance']:g})" for a in agreement if not a["agree"]]
            verdicts["agreement"] = (f"ScoreDecomp and the hair rule agree within {cfg['agreement_tolerance']:.0%} on "
                                     "every training word." if not disagree else
                                     f"**Disagreement beyond {cfg['agreement_tolerance']:.0%}: "
                                     f"{', '.join(disagree)}** (reported; not a control failure of the model: one "
                                     "of the two instruments is wrong on these samples).")
        atomic_write_text(out / "proportions.csv", compact_csv_text(rows, PROPORTION_COLUMNS))
        atomic_write_text(out / "seeds.csv", compact_csv_text(seed_rows, SEED_COLUMNS))
        if fidelity_rows:
            atomic_write_text(out / "fidelity.csv", compact_csv_text(fidelity_rows, list(fidelity_rows[0])))
        if instrument:
            atomic_write_text(out / "instruments.csv", compact_csv_text(instrument, INSTRUMENT_COLUMNS))
            if disagreements:
                width = max(len(images) for _, images in disagreements)
                padded = [torch.cat([images, torch.full((width - len(images), *images.shape[1:]), 255,
                                                        dtype=torch.uint8)]) for _, images in disagreements]
                save_image_grid(torch.cat(padded), out / "instrument_disagreements.png", nrow=width,
                                labels=[label for label, _ in disagreements])
        for guidance in guidances:
            save_image_grid(torch.cat(grids[guidance]), out / f"samples_g{guidance:g}.png",
                            nrow=cfg["grid_per_word"], labels=words_at[guidance])
        by_key = {(r["word"], r["guidance"], r["method"]): r for r in rows}
        bar_plots: dict[float, list[str]] = {}
        for guidance in guidances:
            for method in methods:
                chosen = [by_key[(w, guidance, method)] for w in words_at[guidance]
                          if by_key[(w, guidance, method)]["n"]]
                if not chosen:
                    continue
                plot = f"shares_g{guidance:g}_{method}.png"
                plot_proportions([{"label": ("* " if r["seen"] else "") + r["word"], "share": r["share"],
                                   "low": r["ci_low"], "high": r["ci_high"]} for r in chosen], out / plot,
                                 ylabel="female share (95% CI)",
                                 title=f"{METHOD_NAMES[method]}, guidance {guidance:g} (* = training word)")
                bar_plots.setdefault(guidance, []).append(plot)
        fits = regression_fits(rows, guidances, methods, cfg, out)
        atomic_write_text(out / "regression.csv", compact_csv_text(fits, REGRESSION_COLUMNS))
        summary = {
            "run": record_path(run.run_dir, run.run_dir.parent), "run_step": run.step,
            "embedding": run.config["embedding"],
            "debias": run.config["debias"], "jl_seed": run.config["jl_seed"], "jl_dim": run.config["jl_dim"],
            "dataset": record_path(dataset, run.run_dir), "dataset_source": source, "k": k, "k_origin": info["k_origin"],
            "accuracy_at_k": {key: info[key] for key in ("accuracy", "ci_low", "ci_high", "auc",
                                                         "calibrated_accuracy", "threshold")},
            "methods": methods, "guidance": guidances, "seen": seen, "unseen": unseen, "missing": missing,
            "unseen_at_every_scale": [w for w in unseen if w in every_scale], "trained_in_list": trained, "respelled": listing["respelled"], "controls_failed": failed,
            "config": recorded_flags(cfg, run.run_dir), "time_per_stage_s": timer.stages, **counts,
        }
        atomic_write_json(out / "audit.json", summary)
        ctx = dict(cfg=cfg, run=run, rows=rows, seed_rows=seed_rows, fits=fits, guidances=guidances, methods=methods,
                   embedding=embedding, control=control, k=k, t=score_model.timestep_for_k(k),
                   fidelity_rows=fidelity_rows, agreement=agreement, instrument=instrument,
                   instrument_info=classifier.info if classifier else {}, verdicts=verdicts, failed=failed,
                   attribute_note=attribute_note, dataset=record_path(dataset, run.run_dir), source=source,
                   run_name=summary["run"], elbo=cfg["elbo"], device=device,
                   origin=origin, unseen=unseen, n_usable=len(usable), missing=missing, trained=trained,
                   respelled=listing["respelled"], bar_plots=bar_plots, timer=timer, **counts)
    write_report(out, ctx)  # after the last stage, so its time is in the report
    print(f"[audit] wrote {out / 'report.md'}" + (f"; controls FAILED: {'; '.join(failed)}" if failed else ""))
    return summary


if __name__ == "__main__":
    run_main(main, "interrupted: rerun the same command to resume (sampled images are cached in the audit folder)")
