"""The Lipschitz view: how fast the learned score moves with the conditioning, and what the
images do about it.

    python statistical_auditing/lipschitz.py --run runs/tiny

The seed's motivation: theory assumes the score s_t(x, y) is L-Lipschitz in the
conditioning y, ||s_t(x, y1) - s_t(x, y2)|| <= L ||y1 - y2||, and that assumption is an
individual-fairness constraint (similar conditionings, similar outputs). Two measurements:

1. The noise predictor itself: for pairs (y1, y2) of conditioning vectors (the training
   words, the audit's unseen words and the dose-response points of one word) and noised
   held-out test images x_t at --timesteps, the ratio
   ||eps(x_t, t, y1) - eps(x_t, t, y2)||_2 / ||y1 - y2||_2 (each ratio is a lower bound on
   L at that x_t). Reported per timestep: median and maximum over pairs and images. The
   predictor's output is RMS-normalised (divided by sqrt(D), D = 3 x S x S) so a ratio of 1
   means one unit of conditioning moves every pixel's noise prediction by about one unit.
2. The images: for the same pairs of words, the distance between their output
   distributions, |female share(y1) - female share(y2)| and the total-variation distance
   of their scene shares, against ||y1 - y2|| (shares from the run's audit at guidance 1
   and from its dose-response). The largest ratio of output distance to conditioning
   distance is the smallest L for which the word -> images map is L-Lipschitz (individually
   fair with constant L) on these words.

Outputs in <run>/lipschitz (or --out): predictor.csv (per timestep: median, quartiles, max
of the ratio), pairs.csv (per pair: ||y1 - y2||, mean ratio over images per timestep, output
distances), lipschitz.png, report.md. --guidance_for_outputs and --method_for_outputs must name what
the run's audit measured, and --dose_word a word of its dose-response when it has one; --out must be
lipschitz's own folder (utils.check_output_folder).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from bias_begets_bias.cli import (InputError, config_from_constants, constants_of, parse_distinct_numbers,
                                    parse_number_list, require, run_main)
from bias_begets_bias.utils import (atomic_write_json, atomic_write_text, check_output_folder,
                                          claim_output_folder, compact_csv_text, progress_bar, read_csv_table,
                                          record_path, recorded_flags, require_memory, require_writable,
                                          resolve_device, run_identity)
from bias_begets_bias.word_vectors import gender_shifted_table
from statistical_auditing.from_scratch.experiment_stats import distinct_rows, lipschitz_ratios
from statistical_auditing.core.score_interface import to_epsilon

# ----------------------------------------------------------------------------- config
RUN = "runs/tiny"  # training run folder
OUT = ""  # output folder (empty = <run>/lipschitz)
TIMESTEPS = "25,100,200,300,400,500,600,700,800,900,975"  # list of ints in [0, inf): training timesteps t at which x_t is formed
N_IMAGES = 24  # [1, inf) held-out test images (balanced over the classes)
DOSE_WORD = "person"  # its dose-response points join the pairs (empty = none)
DOSE_ALPHAS = "-0.4,-0.2,0,0.2,0.4"  # list of numbers in (-inf, inf): alphas of those points (moved before the projection)
GUIDANCE_FOR_OUTPUTS = 1.0  # (0, inf) audit guidance scale whose shares are compared
METHOD_FOR_OUTPUTS = "scoredecomp"  # audit method whose female shares are compared: scoredecomp | attribute
SEED = 0  # [0, 2**63) noise seed
BATCH_SIZE = 128  # [1, inf) rows per model call
DEVICE = ""  # empty = the accelerator if there is one, else cpu
NUM_THREADS = 0  # [0, inf) torch CPU threads (0 = torch's default)

PRESETS = {"smoke": dict(timesteps="100,500,900", n_images=4)}
CHOICES = {"method_for_outputs": ("scoredecomp", "attribute")}
SCENE_KEYS = ("neutral", "hospital", "library")


def audit_outputs(run_dir: Path, guidance: float, method: str) -> dict[str, dict]:
    """word -> {"female": share, "scenes": {scene: share}} from the run's audit (empty if not audited)."""
    outputs: dict[str, dict] = {}
    for row in read_csv_table(run_dir / "audit" / "proportions.csv", missing_ok=True):
        try:
            if abs(float(row["guidance"]) - guidance) > 1e-9 or row["method"] != method or not row["share"]:
                continue
            entry = outputs.setdefault(row["word"], {})
            entry["female"] = float(row["share"])
            if all(row.get(f"scene_{s}", "") != "" for s in SCENE_KEYS):
                entry["scenes"] = {s: float(row[f"scene_{s}"]) for s in SCENE_KEYS}
        except (KeyError, ValueError):
            continue
    return outputs


def measured_outputs(run_dir: Path, audit: dict) -> tuple[dict[str, set[float]], set[str]]:
    """What the run's audit measured: method -> the guidance scales its proportions.csv holds
    (audit.json's lists where the table has no rows), and the words of its dose-response."""
    measured: dict[str, set[float]] = {}
    for row in read_csv_table(run_dir / "audit" / "proportions.csv", missing_ok=True):
        try:
            measured.setdefault(row["method"], set()).add(float(row["guidance"]))
        except (KeyError, ValueError, TypeError):
            continue
    if not measured and isinstance(audit.get("methods"), list) and isinstance(audit.get("guidance"), list):
        measured = {str(m): {float(g) for g in audit["guidance"]} for m in audit["methods"]}
    dose_rows = read_csv_table(run_dir / "dose_response" / "dose_response.csv", missing_ok=True)
    dose_words = {row.get("word", "") for row in dose_rows}
    return measured, dose_words - {""}


def check_measured(cfg: dict, run_dir: Path, audit: dict, alphas: list[float]) -> None:
    """--method_for_outputs and --guidance_for_outputs must select what the audit measured (else
    every output distance would be NaN), and --dose_word, when the run has a dose-response, one
    of its words: InputError naming the flag and the values available."""
    measured, dose_words = measured_outputs(run_dir, audit)
    where = run_dir / "audit" / "proportions.csv"
    if not measured:
        return  # an audit without rows: nothing to select, the report says so
    method, guidance = cfg["method_for_outputs"], cfg["guidance_for_outputs"]
    if method not in measured:
        raise InputError(f"--method_for_outputs: the run's audit ({where}) measured {', '.join(sorted(measured))}, "
                         f"not {method}")
    if not any(abs(g - guidance) <= 1e-9 for g in measured[method]):
        raise InputError(f"--guidance_for_outputs: the run's audit ({where}) drew guidance "
                         f"{', '.join(f'{g:g}' for g in sorted(measured[method]))} for {method}, not {guidance:g}")
    if alphas and dose_words and cfg["dose_word"] not in dose_words:
        raise InputError(f"--dose_word: the run's dose-response ({run_dir / 'dose_response'}) moved "
                         f"{', '.join(sorted(dose_words))}, not {cfg['dose_word']!r}")


def dose_outputs(run_dir: Path, word: str, method: str) -> dict[float, float]:
    """alpha -> female share of the run's dose-response for ``word`` (moved before the projection)."""
    shares = {}
    for row in read_csv_table(run_dir / "dose_response" / "dose_response.csv", missing_ok=True):
        try:
            if row["word"] == word and row["space"] == "embedding" and row["method"] == method and row["share"]:
                shares[round(float(row["alpha"]), 6)] = float(row["share"])
        except (KeyError, ValueError):
            continue
    return shares


def test_images(run, n: int) -> torch.Tensor:
    """n held-out test images of the run's dataset, round-robin over the classes, in [0, 1]."""
    from bias_begets_bias.utils import load_split
    from bias_begets_bias.utils import resolve_dataset

    dataset = resolve_dataset(run.config, "", run.run_dir)
    images, labels = load_split(dataset, "test", list(run.config["classes"]), run.model.config.image_size)
    order = sorted(range(len(labels)), key=lambda i: (sum(1 for j in range(i) if labels[j] == labels[i]), int(labels[i])))
    return images[order[:n]].float() / 255.0


@torch.no_grad()
def eps_for_vectors(run, x0: torch.Tensor, timesteps: list[int], vectors: torch.Tensor, seed: int,
                    batch_size: int) -> torch.Tensor:
    """eps(x_t, t, y) for every timestep, image and vector: (T, N, V, D), RMS-normalised (/ sqrt(D))."""
    from statistical_auditing.core.scoring import batch_noise

    model, scheduler = run.model, run.scheduler
    abar = scheduler.alphas_cumprod
    noise = batch_noise(x0.shape[1:], seed, [f"lipschitz/{i}" for i in range(len(x0))])
    out = torch.empty(len(timesteps), len(x0), len(vectors), x0[0].numel())
    for ti, t in enumerate(progress_bar(timesteps, desc="noise predictions per timestep", leave=False)):
        tt = torch.full((len(x0),), t, dtype=torch.long)
        a = abar[tt].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        rows_x = x_t.repeat_interleave(len(vectors), 0)
        rows_t = tt.repeat_interleave(len(vectors), 0)
        rows_y = vectors.repeat(len(x0), 1)
        outputs = []
        for s in range(0, len(rows_x), batch_size):
            raw = model(rows_x[s:s + batch_size].to(run.device), rows_t[s:s + batch_size].to(run.device),
                        rows_y[s:s + batch_size].to(run.device)).float().cpu()
            outputs.append(to_epsilon(raw, rows_x[s:s + batch_size], rows_t[s:s + batch_size], abar,
                                      run.config["prediction"]))
        out[ti] = torch.cat(outputs).view(len(x0), len(vectors), -1)
    return out / math.sqrt(x0[0].numel())


def plot(per_t: list[dict], pairs: list[dict], path: Path) -> None:
    from statistical_auditing.core.stats import pyplot, save_figure_atomically

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    try:
        t = [r["t"] for r in per_t]
        for i, (key, name) in enumerate((("", "eps"), ("score_", "score"), ("x0_", "x0 prediction"))):
            axes[0].plot(t, [r[f"{key}median"] for r in per_t], "o-", color=f"C{i}", label=f"{name}: median")
            axes[0].plot(t, [r[f"{key}max"] for r in per_t], "s--", color=f"C{i}", label=f"{name}: maximum")
        axes[0].set_yscale("log")
        axes[0].set_xlabel("timestep t")
        axes[0].set_ylabel("||f(x_t, y1) - f(x_t, y2)||_rms / ||y1 - y2||")
        axes[0].set_title("The learned predictor: empirical Lipschitz ratios in y")
        axes[0].legend(fontsize=7)
        with_output = [p for p in pairs if p.get("female_gap") is not None and not math.isnan(p["female_gap"])]
        kinds = sorted({p["kind"] for p in with_output})
        for i, kind in enumerate(kinds):
            sel = [p for p in with_output if p["kind"] == kind]
            axes[1].scatter([p["distance"] for p in sel], [p["female_gap"] for p in sel], s=10, alpha=0.6,
                            color=f"C{i}", label=kind)
        axes[1].set_xlabel("||y1 - y2|| (conditioning distance)")
        axes[1].set_ylabel("|female share(y1) - female share(y2)|")
        axes[1].set_title("Images: output gap against conditioning distance")
        axes[1].legend(fontsize=8)
        save_figure_atomically(fig, path)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- the stages of main
@dataclasses.dataclass
class Conditioning:
    """The conditioning vectors compared: the audit's words, then the dose-response points of
    --dose_word, each distinct vector once (alpha = 0 is the word itself, up to float rounding)."""

    words: list[str]  # the audit's seen, then unseen words
    vectors: torch.Tensor  # (V, dim) float32, distinct rows
    labels: list[tuple[str, str]]  # per vector: ("word", word) or ("dose", f"{dose_word}{alpha:+g}")


@dataclasses.dataclass
class ObservedOutputs:
    """What the run's images showed, from its audit and its dose-response."""

    shares: dict[str, dict]  # word -> {"female": share, ...} of --method_for_outputs (audit_outputs)
    scenes: dict[str, dict]  # word -> {"scenes": {scene: share}, ...} of the attribute method
    dose: dict[float, float]  # alpha -> female share of --dose_word (empty without dose points)


@dataclasses.dataclass
class PredictorRatios:
    """The noise predictor's Lipschitz ratios over every pair of conditioning vectors."""

    pair_index: list[tuple[int, int]]  # (i, j), i < j: indices into Conditioning.vectors
    distances: np.ndarray  # (P,) ||y_i - y_j||
    ratios: np.ndarray  # (T, P, N): per timestep, pair and image
    per_t: list[dict]  # per timestep: the ratio's quantiles for eps, score and x0 (predictor.csv)


@dataclasses.dataclass
class OutputGaps:
    """The images: per pair of conditionings, their output distances against their distance."""

    pairs: list[dict]  # pairs.csv
    n_with_gap: int  # pairs whose two female shares are both known
    output_lipschitz: float  # the largest female gap / distance over those pairs (NaN: none)
    distance_p10: float  # 10th percentile of the pair distances
    worst_close: dict | None  # among the pairs within distance_p10, the one of the largest female gap


@dataclasses.dataclass
class Lipschitz:
    """What lipschitz.json and report.md are rendered from."""

    cfg: dict
    timesteps: list[int]
    alphas: list[float]  # --dose_alphas (none without --dose_word)
    conditioning: Conditioning
    n_images: int  # held-out test images x_0
    predictor: PredictorRatios
    outputs: OutputGaps


def parse_flags(argv: list[str] | None) -> tuple[dict, list[int], list[float]]:
    """The flags, --timesteps, and --dose_alphas (none without --dose_word)."""
    cfg = config_from_constants(constants_of(globals()), PRESETS, argv, choices=CHOICES,
                                description=__doc__.splitlines()[0])
    timesteps = parse_distinct_numbers(cfg["timesteps"], "timesteps", int)
    alphas = parse_number_list(cfg["dose_alphas"], "dose_alphas") if cfg["dose_word"] else []
    return cfg, timesteps, alphas


def trained_run(cfg: dict, timesteps: list[int]):
    """The run (pipeline.TrainedRun), whose training timesteps must hold every --timesteps."""
    from bias_begets_bias.pipeline import TrainedRun

    run = TrainedRun(cfg["run"], resolve_device(cfg["device"]))
    n_train = run.config["num_train_timesteps"]
    bad = [t for t in timesteps if not 0 <= t < n_train]
    require(not bad, f"--timesteps: {bad} outside 0..{n_train - 1}")
    return run


def output_folder(cfg: dict, run) -> tuple[Path, dict]:
    """--out (default <run>/lipschitz) and the owner record claiming it; another tool's or another
    run's folder is refused here, before any work."""
    out = Path(cfg["out"] or run.run_dir / "lipschitz")
    require_writable(out, "out")
    owner = dict(tool="lipschitz", run_dir=run.run_dir, run_id=run_identity(run.run_dir, run.config),
                 default=run.run_dir / "lipschitz")
    check_output_folder(out, **owner)
    return out, owner


def read_audit(run_dir: Path) -> dict:
    """The run's audit.json: its words and shares are compared here."""
    audit_path = run_dir / "audit" / "audit.json"
    try:
        audit = json.loads(audit_path.read_text())
    except (OSError, ValueError):
        raise InputError(f"{audit_path}: missing or unreadable; run statistical_auditing/audit.py --run "
                         f"{run_dir} first (its words and shares are compared here)") from None
    if not isinstance(audit, dict) or not all(isinstance(audit.get(key, []), list) for key in ("seen", "unseen")):
        raise InputError(f"{audit_path}: not an audit summary (a JSON object with the lists seen and unseen); rerun "
                         f"statistical_auditing/audit.py --run {run_dir}")
    return audit


def conditioning_vectors(cfg: dict, run, audit: dict, alphas: list[float]) -> Conditioning:
    """The audit's words (the run's own when the audit lists no seen words) and the dose-response
    points of --dose_word, as the model sees them."""
    words = list(dict.fromkeys(list(audit.get("seen", run.words)) + list(audit.get("unseen", []))))
    labels = [("word", w) for w in words]
    vectors = [run.word_vectors(words)]
    if alphas:
        try:
            shifted = gender_shifted_table(cfg["dose_word"], alphas, run.embedding, run.jl_matrix,
                                           run.config["debias"])
        except InputError as error:
            raise InputError(f"--dose_word: {error}") from None
        vectors.append(torch.from_numpy(shifted))
        labels += [("dose", f"{cfg['dose_word']}{a:+g}") for a in alphas]
    vectors = torch.cat(vectors).float()
    distinct = distinct_rows(vectors.numpy())  # alpha = 0 is the word itself, up to float rounding
    return Conditioning(words, vectors[distinct], [labels[i] for i in distinct])


def held_out_inputs(cfg: dict, run, n_timesteps: int, n_vectors: int) -> torch.Tensor:
    """--n_images held-out test images in [-1, 1], once their noise predictions fit in memory."""
    x0 = test_images(run, cfg["n_images"]) * 2 - 1
    require_memory(n_timesteps * len(x0) * n_vectors * x0[0].numel() * 4 * 2,
                   f"--timesteps / --n_images ({n_timesteps} timesteps x {len(x0)} images x {n_vectors} vectors "
                   f"of noise predictions)")
    return x0


def observed_outputs(cfg: dict, run_dir: Path, alphas: list[float]) -> ObservedOutputs:
    """The shares the run's audit (at --guidance_for_outputs) and dose-response measured."""
    guidance, method = cfg["guidance_for_outputs"], cfg["method_for_outputs"]
    return ObservedOutputs(shares=audit_outputs(run_dir, guidance, method),
                           scenes=audit_outputs(run_dir, guidance, "attribute"),
                           dose=dose_outputs(run_dir, cfg["dose_word"], method) if alphas else {})


def predictor_ratios(run, eps: torch.Tensor, vectors: torch.Tensor, timesteps: list[int]) -> PredictorRatios:
    """Per timestep, pair of vectors and image: ||eps(y1) - eps(y2)||_rms / ||y1 - y2|| (eps: (T, N, V, D))."""
    pair_index = list(itertools.combinations(range(len(vectors)), 2))
    distances = np.array([float((vectors[i] - vectors[j]).norm()) for i, j in pair_index])
    ratios = np.empty((len(timesteps), len(pair_index), eps.shape[1]))
    for ti in range(len(timesteps)):
        for p, (i, j) in enumerate(pair_index):
            ratios[ti, p] = lipschitz_ratios(eps[ti, :, i].numpy(), eps[ti, :, j].numpy(), vectors[i].numpy(),
                                             vectors[j].numpy())
    return PredictorRatios(pair_index, distances, ratios, per_timestep(run, ratios, timesteps))


def per_timestep(run, ratios: np.ndarray, timesteps: list[int]) -> list[dict]:
    """predictor.csv: the ratios' median, quartiles and maximum per timestep, in eps, and rescaled
    to the score and to the clean-image prediction."""
    per_t = []
    for ti, t in enumerate(timesteps):
        abar = float(run.scheduler.alphas_cumprod[t])
        # eps -> score: s = -eps / sqrt(1 - abar); eps -> x0 prediction: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
        score_scale, x0_scale = 1 / math.sqrt(1 - abar), math.sqrt((1 - abar) / abar)
        per_t.append({"t": t, "abar": abar, "median": float(np.median(ratios[ti])),
                      "q25": float(np.percentile(ratios[ti], 25)), "q75": float(np.percentile(ratios[ti], 75)),
                      "max": float(ratios[ti].max()), "score_median": float(np.median(ratios[ti])) * score_scale,
                      "score_max": float(ratios[ti].max()) * score_scale,
                      "x0_median": float(np.median(ratios[ti])) * x0_scale, "x0_max": float(ratios[ti].max()) * x0_scale,
                      "n_pairs": ratios.shape[1], "n_images": ratios.shape[2]})
    return per_t


def output_gaps(cfg: dict, conditioning: Conditioning, observed: ObservedOutputs, predictor: PredictorRatios,
                timesteps: list[int]) -> OutputGaps:
    """pairs.csv (per pair: distance, female-share gap, scene total variation, mean ratio per
    timestep) and the output-level Lipschitz constant over the pairs whose shares are known."""
    labels, ratios, distances = conditioning.labels, predictor.ratios, predictor.distances

    def female(label: tuple[str, str]) -> float:
        kind, name = label
        if kind == "word":
            return observed.shares.get(name, {}).get("female", math.nan)
        alpha = round(float(name[len(cfg["dose_word"]):]), 6)
        return observed.dose.get(alpha, math.nan)

    pairs = []
    for p, (i, j) in enumerate(predictor.pair_index):
        a, b = labels[i], labels[j]
        scene_a, scene_b = observed.scenes.get(a[1], {}).get("scenes"), observed.scenes.get(b[1], {}).get("scenes")
        tv = (0.5 * sum(abs(scene_a[s] - scene_b[s]) for s in SCENE_KEYS)
              if a[0] == b[0] == "word" and scene_a and scene_b else math.nan)
        kind = "dose points" if a[0] == b[0] == "dose" else ("words" if a[0] == b[0] == "word" else "word vs dose")
        pairs.append({"y1": a[1], "y2": b[1], "kind": kind, "distance": distances[p],
                      "female_gap": abs(female(a) - female(b)), "scene_tv": tv,
                      **{f"ratio_t{t}": float(ratios[ti, p].mean()) for ti, t in enumerate(timesteps)}})
    with_gap = [q for q in pairs if not math.isnan(q["female_gap"])]
    output_lipschitz = max((q["female_gap"] / q["distance"] for q in with_gap), default=math.nan)
    small = np.percentile(distances, 10)
    close_pairs = [q for q in with_gap if q["distance"] <= small]
    worst_close = max(close_pairs, key=lambda q: q["female_gap"], default=None)
    return OutputGaps(pairs, len(with_gap), output_lipschitz, small, worst_close)


def report_text(result: Lipschitz, run_name: str) -> str:
    """report.md: the predictor's ratios per timestep, then the output level."""
    cfg, conditioning, predictor, outputs = result.cfg, result.conditioning, result.predictor, result.outputs
    worst_close, small = outputs.worst_close, outputs.distance_p10
    lines = [f"# Lipschitz view of `{run_name}`", "",
             f"{len(conditioning.vectors)} conditioning vectors ({len(conditioning.words)} words"
             + (f", {len(result.alphas)} dose-response points of {cfg['dose_word']}" if result.alphas else "")
             + f"), {len(predictor.pair_index)} pairs, {result.n_images} test images, timesteps "
             f"{', '.join(map(str, result.timesteps))}.", "",
             "Ratios ||f(x_t, y1) - f(x_t, y2)||_rms / ||y1 - y2|| for three views of the same prediction: the "
             "noise eps, the score s = -eps / sqrt(1 - abar_t) (the quantity the Lipschitz assumption is about) and "
             "the clean-image prediction x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (pixel units in [-1, 1]).",
             "", "| t | eps: median [quartiles] | eps: max | score: median | score: max | x0: median | x0: max |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['t']} | {r['median']:.3f} [{r['q25']:.3f}, {r['q75']:.3f}] | {r['max']:.3f} | "
              f"{r['score_median']:.3f} | {r['score_max']:.3f} | {r['x0_median']:.3f} | {r['x0_max']:.3f} |"
              for r in predictor.per_t]
    lines += ["", f"Output level ({cfg['method_for_outputs']} female shares, guidance {cfg['guidance_for_outputs']:g}): "
              f"the largest |female share gap| / ||y1 - y2|| over {outputs.n_with_gap} pairs is "
              f"{outputs.output_lipschitz:.3f}."]
    if worst_close:
        lines.append(f"Among the pairs closest in conditioning (distance <= {small:.3f}, the 10th percentile), the "
                     f"largest female-share gap is {worst_close['female_gap']:.2f} ({worst_close['y1']} vs "
                     f"{worst_close['y2']}, distance {worst_close['distance']:.3f}).")
    lines += ["", "![Lipschitz](lipschitz.png)", ""]
    return "\n".join(lines)


def write_outputs(out: Path, owner: dict, run, result: Lipschitz, started: float) -> dict:
    """Claim --out, write predictor.csv, pairs.csv, lipschitz.png, lipschitz.json and report.md;
    returns the summary (lipschitz.json)."""
    predictor, outputs = result.predictor, result.outputs
    claim_output_folder(out, **owner)
    atomic_write_text(out / "predictor.csv", compact_csv_text(predictor.per_t, list(predictor.per_t[0])))
    atomic_write_text(out / "pairs.csv", compact_csv_text(outputs.pairs, list(outputs.pairs[0]) if outputs.pairs
                                                          else ["y1"]))
    plot(predictor.per_t, outputs.pairs, out / "lipschitz.png")
    summary = {"run": record_path(run.run_dir, run.run_dir.parent), "run_step": run.step,
               "timesteps": result.timesteps, "n_vectors": len(result.conditioning.vectors),
               "n_pairs": len(predictor.pair_index), "n_images": result.n_images, "per_timestep": predictor.per_t,
               "output_lipschitz": outputs.output_lipschitz, "distance_p10": float(outputs.distance_p10),
               "worst_close_pair": outputs.worst_close, "config": recorded_flags(result.cfg, run.run_dir),
               "seconds": time.perf_counter() - started}
    atomic_write_json(out / "lipschitz.json", summary)
    atomic_write_text(out / "report.md", report_text(result, summary["run"]))
    print(f"[lipschitz] wrote {out / 'report.md'}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    cfg, timesteps, alphas = parse_flags(argv)
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    started = time.perf_counter()
    run = trained_run(cfg, timesteps)
    out, owner = output_folder(cfg, run)
    audit = read_audit(run.run_dir)
    check_measured(cfg, run.run_dir, audit, alphas)
    conditioning = conditioning_vectors(cfg, run, audit, alphas)
    x0 = held_out_inputs(cfg, run, len(timesteps), len(conditioning.vectors))
    observed = observed_outputs(cfg, run.run_dir, alphas)
    eps = eps_for_vectors(run, x0, timesteps, conditioning.vectors, cfg["seed"], cfg["batch_size"])  # (T, N, V, D)
    predictor = predictor_ratios(run, eps, conditioning.vectors, timesteps)
    outputs = output_gaps(cfg, conditioning, observed, predictor, timesteps)
    result = Lipschitz(cfg, timesteps, alphas, conditioning, len(x0), predictor, outputs)
    return write_outputs(out, owner, run, result, started)


if __name__ == "__main__":
    run_main(main)
