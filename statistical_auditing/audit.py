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
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bias_begets_bias.cli import (InputError, config_from_constants, constants_of, parse_distinct_numbers,
                                    require, run_main)
from bias_begets_bias.fidelity_bar import expected_shares, fidelity_row
from bias_begets_bias.pipeline import AUDIT_SAMPLE_STEPS, AUDIT_SAMPLER, SAMPLERS
from bias_begets_bias.portraits import SCENES, measure_attributes
from bias_begets_bias.utils import (DATA_DIR, atomic_write_json, atomic_write_text, check_output_folder,
                                          claim_output_folder, compact_csv_text, dataset_source, derived_seed,
                                          load_class_words, load_prompts, load_word_list, progress_bar, record_path,
                                          recorded_flags, require_disk, require_memory, resolve_dataset,
                                          resolve_device, run_identity, save_image_grid, writable_folder)
from bias_begets_bias.word_vectors import embedding_bias, load_word_vectors, pick_unseen, vocabulary_form
from statistical_auditing.core.elbo import elbo_classify
from statistical_auditing.from_scratch.audit_report import (AuditReport, Control, Measured, Verdicts, WordChoice,
                                                            write_report)
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


# ----------------------------------------------------------------------------- regression
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


# ----------------------------------------------------------------------------- the stages of main
@dataclasses.dataclass
class AuditInputs:
    """What every stage reads: the flags, the model, the output folder and the dataset, checked."""

    cfg: dict
    k_list: list[int]  # --k_list
    guidances: list[float]  # --guidance
    device: Any  # utils.resolve_device(--device)
    score_model: PixelScoreModel  # the run's model; its .run is the run
    out: Path  # the audit's folder, checked but not yet claimed
    owner: dict  # the record that claims it (utils.claim_output_folder)
    dataset: Path  # <root>/<size> with test/
    source: str  # the dataset's source (utils.dataset_source): "procedural" for the renders
    attribute_note: str  # why the attribute rules are skipped ("" on procedural data)
    methods: list[str]  # gender calls: scoredecomp, then attribute (procedural data) and elbo (--elbo)

    @property
    def run(self):
        return self.score_model.run

    @property
    def procedural(self) -> bool:
        return self.source == "procedural"


@dataclasses.dataclass
class WordDraws:
    """One word's sample sets at one guidance scale (one per sampling seed) and their calls."""

    base: str  # ScoreDecomp's base word for this word
    calls: dict[str, list[np.ndarray]]  # method -> its calls, one array per sample set
    images: list[torch.Tensor] = dataclasses.field(default_factory=list)  # uint8 (n, 3, S, S) per sample set
    weights: list[torch.Tensor] = dataclasses.field(default_factory=list)  # ScoreDecomp's (n, 2) per sample set
    attributes: list[dict] = dataclasses.field(default_factory=list)  # the rules' measures, image by image


@dataclasses.dataclass
class Draws:
    """Every sample set of the audit, drawn now or read from the cache, and called."""

    by_word: dict[tuple[str, float], WordDraws]  # (word, guidance) -> its sample sets
    seed_rows: list[dict]  # seeds.csv: training words, one row per sample set and method
    sampled: int = 0  # sample sets drawn now
    cached: int = 0  # sample sets read from the cache


def parse_flags(argv: list[str] | None) -> tuple[dict, list[int], list[float]]:
    """The flags, --k_list and --guidance; sets torch's CPU threads (--num_threads)."""
    cfg = config_from_constants(constants_of(globals()), PRESETS, argv=argv, choices=CHOICES,
                                description=__doc__.splitlines()[0])
    k_list = parse_distinct_numbers(cfg["k_list"], "k_list", int)
    guidances = parse_distinct_numbers(cfg["guidance"], "guidance", float)
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    return cfg, k_list, guidances


def resolve_inputs(cfg: dict, k_list: list[int], guidances: list[float], device, score_model: PixelScoreModel
                   ) -> AuditInputs:
    """Checks the flags against the run (every k in its timestep table, --sample_steps within its
    training timesteps) and finds the output folder and the dataset, all before any work."""
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
    return AuditInputs(cfg=cfg, k_list=k_list, guidances=guidances, device=device, score_model=score_model, out=out,
                       owner=owner, dataset=dataset, source=source, attribute_note=attribute_note, methods=methods)


def choose_words(inputs: AuditInputs) -> WordChoice:
    """The training words, the unseen words to audit (unseen_candidates, then --max_unseen of them
    picked by --unseen_pick), the words drawn at each scale and every word's embedding gaps; checks
    that --scoredecomp_base is in the embedding."""
    cfg, run = inputs.cfg, inputs.run
    wv = load_word_vectors(run.embedding_source)
    seen = list(run.words)
    listing = unseen_candidates(cfg, seen, wv)
    usable = listing["usable"]
    # Words are ranked by the gap in the original (not debiased) embedding, which no JL seed
    # changes, so every arm and seed of an experiment audits the same words.
    ranking = {w: embedding_bias(w, source=run.embedding_source)["cosine_gap"] for w in usable}
    unseen = pick_unseen(usable, ranking, 0 if cfg["words"] else cfg["max_unseen"], cfg["unseen_pick"])
    # the first scale draws every word; the others the seen words and --full_guidance_words of the unseen
    every_scale = set(unseen if cfg["words"] or not cfg["full_guidance_words"] else
                      pick_unseen(unseen, ranking, cfg["full_guidance_words"], cfg["unseen_pick"]))
    words_at = {g: seen + [w for w in unseen if i == 0 or w in every_scale] for i, g in enumerate(inputs.guidances)}
    embedding = {w: embedding_metrics(w, run) for w in seen + unseen}
    if cfg["scoredecomp_base"] != "word":
        try:
            run.word_vectors([cfg["scoredecomp_base"]])
        except InputError as error:
            raise InputError(f"--scoredecomp_base: {error}") from None
    return WordChoice(seen=seen, unseen=unseen, n_usable=len(usable), missing=listing["missing"],
                      respelled=listing["respelled"], trained=listing["trained"], origin=listing["origin"],
                      every_scale=every_scale, words_at=words_at, embedding=embedding)


def check_resources(inputs: AuditInputs, words: WordChoice) -> None:
    """Refuses sample counts whose images would not fit in memory or on disk; names the skipped words."""
    cfg, size = inputs.cfg, inputs.score_model.image_size
    n_images = sum(len(words.seen) * cfg["n_seeds"] * cfg["n_per_seed"]
                   + (len(words.words_at[g]) - len(words.seen)) * cfg["n_per_word"] for g in inputs.guidances)
    image_bytes = n_images * 3 * size ** 2
    what = (f"--n_seeds / --n_per_seed / --n_per_word ({n_images:,} images of {size} px, all kept "
            f"in memory and cached in {inputs.out / 'samples'})")
    require_memory(image_bytes, what)
    require_disk(inputs.out, image_bytes, what)
    if words.missing:
        print(f"[audit] skipped (not in the embedding): {', '.join(words.missing)}", file=sys.stderr)


def second_instrument(inputs: AuditInputs, timer: Timer):
    """Control 3's second instrument: the attribute classifier trained on the renders' ground truth
    (trained once, then loaded); None without procedural data or with --instrument false."""
    if not (inputs.procedural and inputs.cfg["instrument"]):
        return None
    with timer("second instrument: attribute classifier"):
        from bias_begets_bias.attribute_classifier import load_or_train

        return load_or_train(inputs.dataset, inputs.run.model.config.image_size)


def control_on_test_split(inputs: AuditInputs, timer: Timer) -> Control:
    """Control 1 (accuracy_control), then controls.csv and controls.png."""
    with timer("control 1: ScoreDecomp accuracy on test images"):
        control = Control(**accuracy_control(inputs.score_model, inputs.cfg, inputs.dataset, inputs.k_list,
                                             inputs.out))
    rows, info = control.rows, control.info
    atomic_write_text(inputs.out / "controls.csv", compact_csv_text([r | {"chosen": r["k"] == control.k} for r in rows],
                                                                    list(rows[0]) + ["chosen"]))
    plot_proportions([{"label": f"k={r['k']}", "share": r["report_accuracy"], "low": r["report_ci_low"],
                       "high": r["report_ci_high"]} for r in rows], inputs.out / "controls.png",
                     xlabel="ScoreDecomp k (timesteps from the clean end)", ylabel="gender accuracy (report half)",
                     title=f"ScoreDecomp accuracy on {info['n_images'] // 2} held-out test images")
    return control


def call_gender(inputs: AuditInputs, control: Control, images: torch.Tensor, key: str, entry: WordDraws
                ) -> dict[str, np.ndarray]:
    """One sample set's gender calls by each method: ScoreDecomp at the control's k (thresholded
    with --call calibrated), the hair rule (procedural data), the ELBO classifier (--elbo). The
    images, ScoreDecomp's weights and the rules' measures are added to ``entry``."""
    cfg = inputs.cfg
    sd_calls, weights = scoredecomp_calls(inputs.score_model, images, control.k, cfg["seed"], f"scoredecomp/{key}",
                                          entry.base, cfg["batch_size"])
    if cfg["call"] == "calibrated":
        sd_calls = threshold_calls(weights, control.threshold)
    entry.images.append(images)
    entry.weights.append(weights)
    per_method = {"scoredecomp": sd_calls}
    if inputs.procedural:
        attributes = measure_attributes(images)
        entry.attributes += attributes
        per_method["attribute"] = hair_calls([a["hair"] for a in attributes])
    if cfg["elbo"]:
        per_method["elbo"] = elbo_calls(inputs.score_model, images, derived_seed(cfg["seed"], "elbo", key), cfg)[0]
    return per_method


def draw_and_call(inputs: AuditInputs, words: WordChoice, control: Control, vectors: dict) -> Draws:
    """Every sample set, drawn or read from the cache (cached_samples), then called (call_gender):
    --n_seeds sets of --n_per_seed images per training word, one of --n_per_word per unseen word,
    at each scale of words.words_at. Each set's sampling seed derives from --seed and its key."""
    cfg, seen = inputs.cfg, words.seen
    draws = Draws(by_word={}, seed_rows=[])
    sets = [(g, w, s) for g in inputs.guidances for w in words.words_at[g]
            for s in range(cfg["n_seeds"] if w in seen else 1)]
    for guidance, word, seed_index in progress_bar(sets, desc="(scale, word, seed) sample sets"):
        n_images = cfg["n_per_seed"] if word in seen else cfg["n_per_word"]
        key = f"g{guidance:g}/{word}/s{seed_index}"
        sampling_seed = derived_seed(cfg["seed"], "audit-sample", word, f"{guidance:g}", seed_index)
        images, from_cache = cached_samples(inputs.run, key, vectors[word], guidance, n_images, sampling_seed,
                                            cfg["sampler"], cfg["sample_steps"], cfg["batch_size"],
                                            inputs.out / "samples")
        if from_cache:
            draws.cached += 1
        else:
            draws.sampled += 1
        base = cfg["scoredecomp_base"] if cfg["scoredecomp_base"] != "word" else (
            cfg["control_base"] if word in CANDIDATES else word)
        entry = draws.by_word.setdefault((word, guidance), WordDraws(base=base, calls={m: [] for m in inputs.methods}))
        for method, calls in call_gender(inputs, control, images, key, entry).items():
            entry.calls[method].append(calls)
            if word in seen:
                draws.seed_rows.append({"word": word, "guidance": guidance, "method": method, "seed_index": seed_index,
                                        "sampling_seed": sampling_seed, **share_of_calls(calls)})
    return draws


def proportion_rows(inputs: AuditInputs, words: WordChoice, control: Control, seed_rows: list[dict], word: str,
                    guidance: float, entry: WordDraws) -> list[dict]:
    """proportions.csv's rows of one word at one scale, one per method: the share pooled over the
    sample sets with its seed-to-seed spread (pooled_share), ScoreDecomp's settings and mean
    weight, the word's embedding gaps, and for the hair rule the scene shares."""
    cfg, seen = inputs.cfg, word in words.seen
    weights = torch.cat(entry.weights)
    rows = []
    for method in inputs.methods:
        calls = np.concatenate(entry.calls[method])
        pooled = share_of_calls(calls)
        spread = pooled_share([(s["successes"], s["n"]) for s in seed_rows
                               if (s["word"], s["guidance"], s["method"]) == (word, guidance, method)])
        row = {"word": word, "seen": seen, "guidance": guidance, "method": method,
               "call": cfg["call"] if method == "scoredecomp" else "", "base":
               entry.base if method == "scoredecomp" else "", "k": control.k if method == "scoredecomp" else "",
               **pooled, "n_undetermined": pooled["n_undecided"],
               "mean_weight": float(weights[:, 1].mean()) if method == "scoredecomp" else math.nan,
               "n_seeds": spread["n_seeds"] if seen else 1, "seed_sd": spread["seed_sd"],
               "seed_min": spread["seed_min"], "seed_max": spread["seed_max"],
               "homogeneity_p": spread["homogeneity_p"],
               **{key: words.embedding[word].get(key, "") for key in EMBEDDING_KEYS}}
        if method == "attribute":
            row.update(scene_shares(entry.attributes),
                       hair_called=float(np.mean([a["hair"] in ("long", "short") for a in entry.attributes])))
        rows.append(row)
    return rows


def agreement_row(word: str, guidance: float, entry: WordDraws, tolerance: float) -> dict:
    """Control 3 for one training word and scale: ScoreDecomp's female share against the hair
    rule's on the images the rule calls (long or short hair)."""
    hair = np.concatenate(entry.calls["attribute"])
    called = hair != UNDECIDED
    a = share_of_calls(hair[called])
    s = share_of_calls(np.concatenate(entry.calls["scoredecomp"])[called])  # the audit's call
    difference = s["share"] - a["share"] if a["n"] and s["n"] else math.nan
    return {"word": word, "guidance": guidance, "attribute": a, "scoredecomp": s, "difference": difference,
            "agree": bool(abs(difference) <= tolerance + 1e-12)}


def pool_draws(inputs: AuditInputs, words: WordChoice, control: Control, draws: Draws, classifier,
               expected: dict) -> Measured:
    """Each word's sample sets pooled per scale: its proportions rows, its first images for the
    grid, and for the training words control 2 (fidelity_row against ``expected``) and control 3
    (agreement_row); with the second instrument, the rules against it and the images they differ on."""
    cfg = inputs.cfg
    measured = Measured(rows=[], seed_rows=draws.seed_rows, fidelity_rows=[], agreement=[], instrument=[],
                        grids={g: [] for g in inputs.guidances}, disagreements=[])
    for guidance in inputs.guidances:
        for word in words.words_at[guidance]:
            entry = draws.by_word[(word, guidance)]
            images = torch.cat(entry.images)
            measured.grids[guidance].append(images[:cfg["grid_per_word"]])
            measured.rows += proportion_rows(inputs, words, control, draws.seed_rows, word, guidance, entry)
            if inputs.procedural and word in words.seen:
                measured.fidelity_rows.append(fidelity_row(word, guidance, entry.attributes, expected))
                measured.agreement.append(agreement_row(word, guidance, entry, cfg["agreement_tolerance"]))
            if classifier is not None:
                verdicts = classifier.calls(images)
                measured.instrument += instrument_rows(word, guidance, entry.attributes, verdicts)
                differ = [i for i, (r, c) in enumerate(zip(entry.attributes, verdicts)) if r != c]
                if differ:
                    measured.disagreements.append((f"{word} g{guidance:g}", images[differ[:cfg["grid_per_word"]]]))
    return measured


def judge_controls(cfg: dict, control: Control, measured: Measured) -> Verdicts:
    """The controls' verdicts: control 1 passes when the report half's accuracy interval lies above
    chance, control 2 when every training word passes the bar at guidance 1; control 3's
    disagreement is reported, not failed (one of the two instruments is wrong, not the model)."""
    info, k = control.info, control.k
    failed = []
    ok = info["ci_low"] > 0.5
    accuracy = (f"At k = {k} ({info['k_origin']}) the accuracy on the report half is "
                f"{info['accuracy']:.3f} [{info['ci_low']:.3f}, {info['ci_high']:.3f}], AUC "
                f"{info['auc']:.3f}: " + ("above chance (0.5), pass." if ok else
                                           "**not above chance (0.5): FAIL.**"))
    if not ok:
        failed.append(f"ScoreDecomp accuracy at k = {k} not above chance")
    fidelity = agreement = ""
    if measured.fidelity_rows:
        failing = [f"{r['word']} ({r['bar'][6:]})" for r in measured.fidelity_rows if r["bar"].startswith("FAIL")]
        fidelity = ("Acceptance bar: every training word passes at guidance 1." if not failing else
                    f"**Acceptance bar failed at guidance 1 for: {', '.join(failing)}.**")
        if failing:
            failed.append("conditioning fidelity at guidance 1: " + ", ".join(failing))
    if measured.agreement:
        disagree = [f"{a['word']} (g {a['guidance']:g})" for a in measured.agreement if not a["agree"]]
        agreement = (f"ScoreDecomp and the hair rule agree within {cfg['agreement_tolerance']:.0%} on "
                     "every training word." if not disagree else
                     f"**Disagreement beyond {cfg['agreement_tolerance']:.0%}: "
                     f"{', '.join(disagree)}** (reported; not a control failure of the model: one "
                     "of the two instruments is wrong on these samples).")
    return Verdicts(accuracy=accuracy, fidelity=fidelity, agreement=agreement, failed=failed)


def write_tables(inputs: AuditInputs, words: WordChoice, measured: Measured) -> None:
    """proportions.csv, seeds.csv, fidelity.csv and instruments.csv (where there are rows), the
    grid of the images the rules and the classifier disagree on, and one sample grid per scale."""
    cfg, out = inputs.cfg, inputs.out
    atomic_write_text(out / "proportions.csv", compact_csv_text(measured.rows, PROPORTION_COLUMNS))
    atomic_write_text(out / "seeds.csv", compact_csv_text(measured.seed_rows, SEED_COLUMNS))
    if measured.fidelity_rows:
        atomic_write_text(out / "fidelity.csv",
                          compact_csv_text(measured.fidelity_rows, list(measured.fidelity_rows[0])))
    if measured.instrument:
        atomic_write_text(out / "instruments.csv", compact_csv_text(measured.instrument, INSTRUMENT_COLUMNS))
        if measured.disagreements:
            width = max(len(images) for _, images in measured.disagreements)
            padded = [torch.cat([images, torch.full((width - len(images), *images.shape[1:]), 255,
                                                    dtype=torch.uint8)]) for _, images in measured.disagreements]
            save_image_grid(torch.cat(padded), out / "instrument_disagreements.png", nrow=width,
                            labels=[label for label, _ in measured.disagreements])
    for guidance in inputs.guidances:
        save_image_grid(torch.cat(measured.grids[guidance]), out / f"samples_g{guidance:g}.png",
                        nrow=cfg["grid_per_word"], labels=words.words_at[guidance])


def plot_shares(inputs: AuditInputs, words: WordChoice, measured: Measured) -> dict[float, list[str]]:
    """One bar plot of the female shares per scale and method (words with decided images only);
    returns the plots' names per scale."""
    by_key = {(r["word"], r["guidance"], r["method"]): r for r in measured.rows}
    bar_plots: dict[float, list[str]] = {}
    for guidance in inputs.guidances:
        for method in inputs.methods:
            chosen = [by_key[(w, guidance, method)] for w in words.words_at[guidance]
                      if by_key[(w, guidance, method)]["n"]]
            if not chosen:
                continue
            plot = f"shares_g{guidance:g}_{method}.png"
            plot_proportions([{"label": ("* " if r["seen"] else "") + r["word"], "share": r["share"],
                               "low": r["ci_low"], "high": r["ci_high"]} for r in chosen], inputs.out / plot,
                             ylabel="female share (95% CI)",
                             title=f"{METHOD_NAMES[method]}, guidance {guidance:g} (* = training word)")
            bar_plots.setdefault(guidance, []).append(plot)
    return bar_plots


def audit_summary(inputs: AuditInputs, words: WordChoice, control: Control, verdicts: Verdicts, draws: Draws,
                  timer: Timer) -> dict:
    """audit.json's record: the run, the dataset, the chosen k and its accuracy, the words, the failed
    controls, the flags and the time per stage (the timer's own dict: stages ending later count too)."""
    run, info = inputs.run, control.info
    return {
        "run": record_path(run.run_dir, run.run_dir.parent), "run_step": run.step,
        "embedding": run.config["embedding"],
        "debias": run.config["debias"], "jl_seed": run.config["jl_seed"], "jl_dim": run.config["jl_dim"],
        "dataset": record_path(inputs.dataset, run.run_dir), "dataset_source": inputs.source, "k": control.k,
        "k_origin": info["k_origin"],
        "accuracy_at_k": {key: info[key] for key in ("accuracy", "ci_low", "ci_high", "auc",
                                                     "calibrated_accuracy", "threshold")},
        "methods": inputs.methods, "guidance": inputs.guidances, "seen": words.seen, "unseen": words.unseen,
        "missing": words.missing, "unseen_at_every_scale": [w for w in words.unseen if w in words.every_scale],
        "trained_in_list": words.trained, "respelled": words.respelled, "controls_failed": verdicts.failed,
        "config": recorded_flags(inputs.cfg, run.run_dir), "time_per_stage_s": timer.stages,
        "sampled": draws.sampled, "cached": draws.cached,
    }


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    """The audit's stages in order (the module docstring says what each does); returns audit.json's record."""
    cfg, k_list, guidances = parse_flags(argv)
    timer = Timer()
    device = resolve_device(cfg["device"])
    with timer("loading the run"):
        score_model = PixelScoreModel(cfg["run"], device, num_inference_steps=cfg["num_inference_steps"])
    inputs = resolve_inputs(cfg, k_list, guidances, device, score_model)
    with timer("choosing words"):
        words = choose_words(inputs)
    check_resources(inputs, words)
    classifier = second_instrument(inputs, timer)
    claim_output_folder(inputs.out, **inputs.owner)
    clear_previous_outputs(inputs.out)

    control = control_on_test_split(inputs, timer)
    vectors = dict(zip(words.all, inputs.run.word_vectors(words.all)))
    expected = expected_shares(inputs.run.config["class_words"], load_prompts()) if inputs.procedural else {}
    with timer("sampling and calling gender"):
        draws = draw_and_call(inputs, words, control, vectors)
        measured = pool_draws(inputs, words, control, draws, classifier, expected)
    print(f"[audit] sample sets: {draws.sampled} sampled, {draws.cached} from the cache", flush=True)

    with timer("tables and plots"):
        verdicts = judge_controls(cfg, control, measured)
        write_tables(inputs, words, measured)
        bar_plots = plot_shares(inputs, words, measured)
        fits = regression_fits(measured.rows, guidances, inputs.methods, cfg, inputs.out)
        atomic_write_text(inputs.out / "regression.csv", compact_csv_text(fits, REGRESSION_COLUMNS))
        summary = audit_summary(inputs, words, control, verdicts, draws, timer)
        atomic_write_json(inputs.out / "audit.json", summary)
        report = AuditReport(
            cfg=cfg, run=inputs.run, run_name=summary["run"], dataset=summary["dataset"], source=inputs.source,
            device=device, guidances=guidances, methods=inputs.methods,
            timestep=score_model.timestep_for_k(control.k), words=words, control=control, measured=measured,
            verdicts=verdicts, attribute_note=inputs.attribute_note,
            instrument_info=classifier.info if classifier else {}, fits=fits, bar_plots=bar_plots,
            sampled=draws.sampled, cached=draws.cached, stage_seconds=timer.stages)
    write_report(inputs.out, report)  # after the last stage, so its time is in the report
    failed = verdicts.failed
    print(f"[audit] wrote {inputs.out / 'report.md'}" + (f"; controls FAILED: {'; '.join(failed)}" if failed else ""))
    return summary


if __name__ == "__main__":
    run_main(main, "interrupted: rerun the same command to resume (sampled images are cached in the audit folder)")
