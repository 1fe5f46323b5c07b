"""Dose-response: move one word's gender component and nothing else, and count the images.

    python statistical_auditing/dose_response.py --run runs/tiny

The cross-word regression of the audit compares different words, which differ in more than
their gender component. Here each word is held fixed and only its gender component moves:
the model is conditioned on v(alpha) = unit(u + alpha g), u the word's unit vector as the
run sees it before the JL projection and g the embedding's gender direction (the
definitional-pairs direction that hard-debiasing uses, female side positive), projected
exactly as training does; as a check, the same move is made directly in the space the
model sees (c + alpha ||c|| g_P, g_P the gender direction of the projected definitional
pairs). For every word and alpha the script samples N images and calls their gender with
the hair rule and with ScoreDecomp; a binomial logistic regression of the calls on alpha
gives one slope per word (the log-odds of a female-presenting image per unit of alpha).

Words: "person" (trained on balanced data) and --n_unseen professions from --words_file at
evenly spaced ranks of the original embedding's cosine gap (so they span the range the
audit's regression spans), or --words. The alphas span the gaps of real professions: at
alpha = +-0.4 the cosine gap cos(v, woman) - cos(v, man) of a typical word moves by about
+-0.2, more than the professions' spread (-0.11 to +0.19 in the bundled word2vec).

Outputs in <run>/dose_response (or --out): dose_response.csv (word, space, alpha, the
resulting cosine gaps before and after the projection, method, female share with its 95%
Wilson interval), slopes.csv (logistic slope per word, space and method with its 95% Wald
interval), dose_response.png, report.md, samples/ (cache; a rerun resumes). --out must be the
dose-response's own folder (utils.check_output_folder).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bias_begets_bias.cli import (InputError, config_from_constants, constants_of, parse_distinct_numbers,
                                    require, run_main)
from bias_begets_bias.pipeline import AUDIT_SAMPLE_STEPS, AUDIT_SAMPLER, SAMPLERS
from bias_begets_bias.portraits import measure_attributes
from bias_begets_bias.utils import (DATA_DIR, atomic_write_json, atomic_write_text, check_output_folder,
                                          claim_output_folder, compact_csv_text, derived_seed, load_word_list,
                                          progress_bar, record_path, recorded_flags, require_disk, require_memory,
                                          resolve_device, run_identity, writable_folder)
from bias_begets_bias.word_vectors import (FEMALE_WORD, MALE_WORD, SHIFT_SPACES, conditioning_table,
                                                 cosine_gap, gender_shifted_table, pick_unseen, unit_rows,
                                                 vocabulary_form)
from statistical_auditing.from_scratch.experiment_stats import logistic_fit
from statistical_auditing.from_scratch.sampling import cached_samples, hair_calls, scoredecomp_calls, share_of_calls

# ----------------------------------------------------------------------------- config
RUN = "runs/tiny"  # training run folder
OUT = ""  # output folder (empty = <run>/dose_response)
WORDS = ""  # comma-separated words (empty = person + --n_unseen professions from --words_file)
ANCHOR_WORDS = "person"  # always included (comma-separated; trained on balanced data)
WORDS_FILE = str(DATA_DIR / "professions.txt")  # unseen words to pick from (missing ones are skipped)
N_UNSEEN = 5  # [1, inf) how many professions, at evenly spaced ranks of the original cosine gap (all if fewer are usable)
ALPHAS = "-0.4,-0.3,-0.2,-0.1,0,0.1,0.2,0.3,0.4"  # list of numbers in (-inf, inf): multiples of the unit gender direction added
SPACES = "embedding,projected"  # where the move is made: embedding (before the JL projection) | projected
N_PER_POINT = 128  # [1, inf) images per (word, space, alpha)
CHECK_ALPHAS = "-0.4,-0.2,0,0.2,0.4"  # alphas of the check made after the projection (space "projected")
CHECK_N_PER_POINT = 64  # [1, inf) images per point of that check
GUIDANCE = 1.0  # (0, inf) classifier-free guidance scale (1 = the model's own conditional)
SAMPLER = AUDIT_SAMPLER  # ddpm | ddim | dpm (default: the audit's, "dpm" = DPM-Solver++)
SAMPLE_STEPS = AUDIT_SAMPLE_STEPS  # [1, inf) sampler steps (default: the audit's, pipeline.AUDIT_SAMPLE_STEPS)
K = 0  # [0, inf) ScoreDecomp k (0 = the k the run's audit chose, read from <run>/audit/audit.json)
SEED = 0  # [0, 2**63) base seed of sampling and ScoreDecomp noise
BATCH_SIZE = 128  # [1, inf) images per model batch
DEVICE = ""  # empty = the accelerator if there is one, else cpu
NUM_THREADS = 0  # [0, inf) torch CPU threads (0 = torch's default)

PRESETS = {"smoke": dict(n_unseen=1, alphas="-0.4,0,0.4", check_alphas="-0.4,0,0.4", n_per_point=4,
                         check_n_per_point=4, sample_steps=2, k=10)}
CHOICES = {"sampler": SAMPLERS}
METHODS = ("attribute", "scoredecomp")
COLUMNS = ("word", "space", "alpha", "gap_before", "gap_after", "method", "successes", "n", "n_undecided", "share",
           "ci_low", "ci_high")
SLOPE_COLUMNS = ("word", "space", "method", "slope", "slope_se", "slope_ci_low", "slope_ci_high", "converged",
                 "share_at_min_alpha", "share_at_max_alpha")


def choose_words(cfg: dict, run, wv) -> list[str]:
    """--words, else the anchor words plus --n_unseen unseen words spread over the original gap."""
    if cfg["words"]:
        words = [w.strip() for w in cfg["words"].split(",") if w.strip()]
        missing = [w for w in words if w not in wv]
        require(not missing, f"--words: not in the word vectors {wv.source!r}: {', '.join(missing)}")
        return list(dict.fromkeys(words))
    anchors = [w.strip() for w in cfg["anchor_words"].split(",") if w.strip()]
    missing = [w for w in anchors if w not in wv]
    require(not missing, f"--anchor_words: not in the word vectors {wv.source!r}: {', '.join(missing)}")
    listed = [vocabulary_form(w, wv) for w in load_word_list(Path(cfg["words_file"]))]
    usable = [w for w in dict.fromkeys(listed) if w and w not in run.words and w not in anchors]
    woman, man = wv.unit(FEMALE_WORD), wv.unit(MALE_WORD)
    gaps = {w: cosine_gap(wv.unit(w), woman, man) for w in usable}
    return anchors + pick_unseen(usable, gaps, cfg["n_unseen"], "spread")


def gaps_of(vectors: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """cos(v, woman) - cos(v, man) for rows v, with ``reference`` = the (woman, man) rows of the same space."""
    units, ref = unit_rows(np.asarray(vectors, dtype=np.float64)), unit_rows(np.asarray(reference, dtype=np.float64))
    return units @ ref[0] - units @ ref[1]


def audit_k(run_dir: Path) -> int:
    import json

    path = run_dir / "audit" / "audit.json"
    try:
        return int(json.loads(path.read_text())["k"])
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"--k 0 reads the k the run's audit chose from {path}, which is missing or unreadable; "
                         f"run statistical_auditing/audit.py --run {run_dir} first or pass --k") from None


def plot(rows: list[dict], words: list[str], spaces: list[str], path: Path) -> None:
    from statistical_auditing.core.stats import pyplot, save_figure_atomically

    plt = pyplot()
    fig, axes = plt.subplots(1, len(METHODS), figsize=(6 * len(METHODS), 4.5), squeeze=False)
    try:
        for ax, method in zip(axes[0], METHODS):
            for i, word in enumerate(words):
                for space in spaces:
                    points = [r for r in rows if r["word"] == word and r["space"] == space and r["method"] == method
                              and r["n"]]
                    if not points:
                        continue
                    alpha = np.array([r["alpha"] for r in points])
                    share = np.array([r["share"] for r in points])
                    err = np.vstack([share - [r["ci_low"] for r in points], [r["ci_high"] for r in points] - share])
                    ax.errorbar(alpha + (0.006 if space == "projected" else 0.0), share, yerr=err,
                                color=f"C{i}", fmt="o-" if space == "embedding" else "s--", capsize=2, markersize=3,
                                label=f"{word}" + ("" if space == "embedding" else " (moved after the projection)"))
            ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("alpha (multiples of the unit gender direction added to the word)")
            ax.set_ylabel("female share (95% Wilson CI)")
            ax.set_title({"attribute": "hair rule", "scoredecomp": "ScoreDecomp"}[method])
            ax.legend(fontsize=7)
        fig.suptitle("Dose-response: only the gender component of each word moves")
        save_figure_atomically(fig, path)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- the stages of main
@dataclasses.dataclass
class DosePlan:
    """Where each word moves and how far: per space (embedding = before the JL projection,
    projected = the check after it) the alphas and the images per point."""

    spaces: list[str]  # --spaces, in the order given
    alphas: dict[str, list[float]]  # space -> --alphas (embedding) or --check_alphas (projected)
    n_per_point: dict[str, int]  # space -> --n_per_point or --check_n_per_point


@dataclasses.dataclass
class ScoringModel:
    """The run's score model and the ScoreDecomp k its calls use."""

    score_model: Any  # score_models.PixelScoreModel; .run is the pipeline.TrainedRun
    k: int  # --k, or the k the run's audit chose


@dataclasses.dataclass
class DoseResponse:
    """What the tables, the plot, report.md and dose_response.json are rendered from."""

    cfg: dict
    plan: DosePlan
    words: list[str]
    k: int
    rows: list[dict]  # dose_response.csv: per word, space, alpha and method
    slopes: list[dict]  # slopes.csv: per word, space and method


def parse_flags(argv: list[str] | None) -> tuple[dict, DosePlan]:
    """The flags, and the alphas, images per point and spaces they name."""
    cfg = config_from_constants(constants_of(globals()), PRESETS, argv, choices=CHOICES,
                                description=__doc__.splitlines()[0])
    alphas = {"embedding": parse_distinct_numbers(cfg["alphas"], "alphas"),
              "projected": parse_distinct_numbers(cfg["check_alphas"], "check_alphas")}
    n_per_point = {"embedding": cfg["n_per_point"], "projected": cfg["check_n_per_point"]}
    spaces = [s.strip() for s in cfg["spaces"].split(",") if s.strip()]
    unknown = [s for s in spaces if s not in SHIFT_SPACES]
    require(bool(spaces) and not unknown, f"--spaces: expected a comma-separated subset of {SHIFT_SPACES}, "
                                          f"got {cfg['spaces']!r}")
    return cfg, DosePlan(spaces, alphas, n_per_point)


def load_model(cfg: dict) -> ScoringModel:
    """The run's score model, once --sample_steps fits its schedule and the k (--k, or with 0 the
    audit's) names a timestep of its table."""
    from statistical_auditing.core.score_models import PixelScoreModel

    score_model = PixelScoreModel(cfg["run"], resolve_device(cfg["device"]))
    run = score_model.run
    require(1 <= cfg["sample_steps"] <= run.config["num_train_timesteps"],
            f"--sample_steps: need 1..{run.config['num_train_timesteps']}, got {cfg['sample_steps']}")
    k = cfg["k"] or audit_k(run.run_dir)
    try:
        score_model.timestep_for_k(k)
    except InputError as error:
        origin = "" if cfg["k"] else f" (the k of {run.run_dir / 'audit' / 'audit.json'})"
        raise InputError(f"--k: {error}{origin}") from None
    return ScoringModel(score_model, k)


def claimed_output(cfg: dict, run, plan: DosePlan, words: list[str], image_size: int) -> Path:
    """--out (default <run>/dose_response), claimed once it is this tool's and this run's folder
    (another's is refused before any work) and the cached images fit in memory and on disk."""
    owner = dict(tool="dose_response", run_dir=run.run_dir, run_id=run_identity(run.run_dir, run.config),
                 default=run.run_dir / "dose_response")
    out = Path(cfg["out"] or run.run_dir / "dose_response")
    check_output_folder(out, **owner)
    out = writable_folder(out, "out")
    n_images = len(words) * sum(len(plan.alphas[s]) * plan.n_per_point[s] for s in plan.spaces)
    what = f"--n_per_point {cfg['n_per_point']} ({n_images:,} images of {image_size} px, cached in {out})"
    require_memory(cfg["n_per_point"] * 3 * image_size ** 2, what)
    require_disk(out, n_images * 3 * image_size ** 2, what)
    claim_output_folder(out, **owner)
    return out


def measure_points(cfg: dict, plan: DosePlan, words: list[str], model: ScoringModel, out: Path) -> list[dict]:
    """dose_response.csv: for every word, space and alpha, the moved vector's cosine gaps before
    and after the projection, and the female share of its images by each method (images cached
    in <out>/samples)."""
    score_model, k = model.score_model, model.k
    run = score_model.run
    wv, mode = run.embedding, run.config["debias"]
    before_reference = np.stack([wv.unit(FEMALE_WORD), wv.unit(MALE_WORD)])
    seen_reference = conditioning_table([FEMALE_WORD, MALE_WORD], wv, run.jl_matrix, mode)
    rows = []
    points = [(w, s, a) for w in words for s in plan.spaces for a in plan.alphas[s]]
    for word, space, alpha in progress_bar(points, desc="dose-response (word, space, alpha)"):
        vector = gender_shifted_table(word, [alpha], wv, run.jl_matrix, mode, space)
        before = (float(gaps_of(unit_rows(wv.unit(word)[None] + alpha * wv.gender_direction[None]), before_reference)[0])
                  if space == "embedding" else math.nan)
        after = float(gaps_of(vector, seen_reference)[0])
        key = f"{word}/{space}/{alpha:+.4f}"
        images, _ = cached_samples(run, key, torch.from_numpy(vector[0]), cfg["guidance"], plan.n_per_point[space],
                                   derived_seed(cfg["seed"], "dose", key), cfg["sampler"], cfg["sample_steps"],
                                   cfg["batch_size"], out / "samples")
        calls = {"attribute": hair_calls([a["hair"] for a in measure_attributes(images)]),
                 "scoredecomp": scoredecomp_calls(score_model, images, k, cfg["seed"], f"dose/{key}",
                                                  batch_size=cfg["batch_size"])[0]}
        for method in METHODS:
            rows.append({"word": word, "space": space, "alpha": alpha, "gap_before": before, "gap_after": after,
                         "method": method, **share_of_calls(calls[method])})
    return rows


def fit_slopes(rows: list[dict], words: list[str], spaces: list[str]) -> list[dict]:
    """slopes.csv: per word, space and method the logistic slope of the calls on alpha (NaN, not
    converged, with a note where it cannot be fitted)."""
    slopes = []
    for word in words:
        for space in spaces:
            for method in METHODS:
                pts = [r for r in rows if r["word"] == word and r["space"] == space and r["method"] == method]
                entry = {"word": word, "space": space, "method": method,
                         "share_at_min_alpha": pts[0]["share"], "share_at_max_alpha": pts[-1]["share"]}
                try:
                    fit = logistic_fit([r["alpha"] for r in pts], [r["successes"] for r in pts], [r["n"] for r in pts])
                    entry.update(slope=fit["slope"], slope_se=fit["slope_se"], slope_ci_low=fit["slope_ci"][0],
                                 slope_ci_high=fit["slope_ci"][1], converged=fit["converged"])
                except ValueError as error:
                    entry.update(slope=math.nan, converged=False, note=str(error))
                slopes.append(entry)
    return slopes


def report_text(result: DoseResponse, run_name: str, seconds: float) -> str:
    """report.md: what was moved and how, then the slopes."""
    cfg, alphas = result.cfg, result.plan.alphas
    lines = [f"# Dose-response of `{run_name}`", "",
             f"Words {', '.join(result.words)}; alphas {', '.join(f'{a:g}' for a in alphas['embedding'])} (moved "
             f"before the projection, {cfg['n_per_point']} images per point) and "
             f"{', '.join(f'{a:g}' for a in alphas['projected'])} (the check after it, {cfg['check_n_per_point']} per "
             f"point); spaces: {', '.join(result.plan.spaces)}; guidance {cfg['guidance']:g}; {cfg['sampler']} "
             f"{cfg['sample_steps']} steps; ScoreDecomp k = {result.k}; seed {cfg['seed']}; {seconds / 60:.1f} min.",
             "", "| word | space | method | logistic slope [95% CI] | share at lowest / highest alpha |",
             "|---|---|---|---|---|"]
    for s in result.slopes:
        ci = f"[{s['slope_ci_low']:.2f}, {s['slope_ci_high']:.2f}]" if "slope_ci_low" in s else ""
        flag = "" if s.get("converged") else " (not converged: separated data)"
        lines.append(f"| {s['word']} | {s['space']} | {s['method']} | {s['slope']:.2f} {ci}{flag} | "
                     f"{s['share_at_min_alpha']:.2f} / {s['share_at_max_alpha']:.2f} |")
    lines += ["", "![dose-response](dose_response.png)", ""]
    return "\n".join(lines)


def write_outputs(out: Path, run, result: DoseResponse, started: float) -> None:
    """dose_response.csv, slopes.csv, dose_response.png, report.md and dose_response.json."""
    atomic_write_text(out / "dose_response.csv", compact_csv_text(result.rows, COLUMNS))
    atomic_write_text(out / "slopes.csv", compact_csv_text(result.slopes, SLOPE_COLUMNS))
    plot(result.rows, result.words, result.plan.spaces, out / "dose_response.png")
    seconds = time.perf_counter() - started
    atomic_write_text(out / "report.md", report_text(result, record_path(run.run_dir, run.run_dir.parent), seconds))
    atomic_write_json(out / "dose_response.json", {"config": recorded_flags(result.cfg, run.run_dir), "k": result.k,
                                                   "words": result.words, "run_step": run.step, "seconds": seconds})
    print(f"[dose-response] wrote {out / 'report.md'} ({seconds / 60:.1f} min)")


def main(argv: list[str] | None = None) -> dict:
    cfg, plan = parse_flags(argv)
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    started = time.perf_counter()
    model = load_model(cfg)
    run = model.score_model.run
    words = choose_words(cfg, run, run.embedding)
    out = claimed_output(cfg, run, plan, words, model.score_model.image_size)
    rows = measure_points(cfg, plan, words, model, out)
    result = DoseResponse(cfg, plan, words, model.k, rows, fit_slopes(rows, words, plan.spaces))
    write_outputs(out, run, result, started)
    return {"rows": rows, "slopes": result.slopes, "words": words, "out": str(out)}


if __name__ == "__main__":
    run_main(main, "interrupted: rerun the same command to resume (sampled images are cached)")
