"""ScoreDecomp accuracy on labelled images, beside the ELBO classifier (docs/original.md section 6).

For each image x (FairFace faces, the test split of the project's six-class data, or any
labelled Hugging Face dataset such as CIFAR-10) the model itself says which candidate
condition it sees: x0 = encode(x), one noise draw eps per image (``scoring.image_noise``,
keyed by the image id, shared by the base and every candidate and every k), and for each k
in --k_list the timestep t = timesteps[-k] of the scheduler's table after
``set_timesteps(--num_inference_steps)`` (k counted from the clean end, as the original's
``timesteps[-k]``; with SD's steps_offset 1 and the original's 1000 steps, k = 5 is t = 5);
ScoreDecomp (``scoring.scoredecomp_scores``) solves
    min_w || sum_i w_i eps(x_t, t, c_i) - eps(x_t, t, base) ||_2,  w >= 0, sum_i w_i = 1
i.e. 1 + K UNet evaluations per image and k. Candidate i stands for class label i of the
dataset (``--classes``, default the dataset's order: male, female for gender).

The call (--call): argmax (the original's) names the candidate of the largest score; an exact
tie names none and counts as wrong (``scoring.decide``, the project's one tie rule). With
two classes, calibrated calls class 1 when score_1 - score_0 exceeds the threshold of best
accuracy on --calibration_images other labelled images (``stats.calibrated_threshold``),
the next ones after the evaluated images in the same seeded order. The ELBO classifier
(diffusion_classifier.py) runs on the same images at --elbo_samples timesteps and at the
budget matched to ScoreDecomp's evaluations (n = ceil((1 + K) / K) samples, K evaluations
each), with the same call.

Either model family: --model is a from-scratch run folder (conditions are words; defaults
base "person", candidates "man", "woman") or a Stable Diffusion hub id / pipeline folder
(prompts; defaults "photo of a person's face" and "..., man" / "..., woman", or the seven
FairFace races for --attribute race; --template builds prompts from the class names, e.g.
"a blurry photo of a {class}." on CIFAR-10). Lists are comma-separated; when the items
contain commas (prompts) separate them with "|" instead.

Outputs in --out: per_image/<id>.json (one per image, so a rerun resumes and redoes only
missing images or ones made with other settings or another model checkpoint; --shard i/n
splits the images between processes, and the last shard to finish summarises them all),
summary.csv (method, call, k, timestep, budget = noise draws per image (1 for ScoreDecomp, n
for the ELBO), accuracy with a 95% Wilson interval, n, ties, the calibrated threshold and its
number of images, seconds and UNet evaluations per image, and for two classes the AUC of
score_1 - score_0), confusion_k{k}.csv and confusion_elbo_n{n}.csv (rows: true class,
columns: predicted, then ties), report.md, config.json. Seconds count the UNet calls and
the solver, not decoding or encoding the images (common to every method).
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from bias_begets_bias.cli import config_from_constants, constants_of, parse_shard, require, run_main
from bias_begets_bias.utils import (atomic_write_json, atomic_write_text, csv_text, progress_bar,
                                          remove_orphaned_temporaries, require_writable, writable_folder)
from statistical_auditing.sd_audits import cli_common as cc
from statistical_auditing.sd_audits.data_flags import (ATTRIBUTE, CLASSES, DATA, DATA_CHOICES, DATA_CONFIG,  # noqa: F401
                                             IMAGE_COLUMN, IMAGES_ROOT, KIND, LABEL_COLUMN, RESIZE, SELECTION,
                                             SIZE, SKIP_BAD, SPLIT, TEMPLATE)  # data-source flags, shared
from statistical_auditing.core.elbo import ELBO_LOSSES, elbo_classify
from statistical_auditing.sd_audits.model_flags import (DEVICE, DTYPE, MODEL, MODEL_CHOICES,  # noqa: F401
                                              NUM_INFERENCE_STEPS, SCHEDULER)  # model flags, shared
from statistical_auditing.core.score_interface import ScoreModel
from statistical_auditing.core.scoring import batch_noise, decide, scoredecomp_scores
from statistical_auditing.core.stats import binary_auc, calibrated_threshold
from statistical_auditing.core.utils_classifier import SCORE_METHODS

NUM_IMAGES = 250  # [1, inf) images evaluated (the original: 250 of its shuffled loader)
BASE = ""  # base condition ("" = family default: "person" / "photo of a person's face"; with --template: unconditional)
CANDIDATES = ""  # candidate conditions, candidate i <-> class i ("" = family default for --attribute, or --template)
METHOD = "simplex"  # score: simplex (ScoreDecomp, the original's convex_opt) | cosine | lp | pca
LP_ORDER = 2  # [1, inf) p of the lp method (score = -||base - candidate||_p)
PCA_COMPONENTS = 2  # [1, inf) pca method: principal components kept (the original: 2)
PCA_NORMALIZE = True  # pca method: L2-normalise each centred prediction before the PCA (the original's default)
K_LIST = "5,20"  # list of ints in [1, inf): comma-separated k: timestep = timesteps[-k], counted from the clean end (the original: 5, 20)
CALL = "argmax"  # argmax (the original; an exact tie counts as wrong) | calibrated (two classes: held-out threshold)
CALIBRATION_IMAGES = 100  # [0, inf) --call calibrated: labelled images choosing the threshold, after the evaluated ones
SEED = 0  # [0, 2**63) base seed: image selection, each image's noise (seeded by (seed, image id)), ELBO noise
BATCH_SIZE = 8  # [1, inf) images per UNet call (times 1 + K conditions)
ELBO = True  # also run the ELBO classifier on the same images
ELBO_SAMPLES = "100"  # list of ints in [1, inf): comma-separated ELBO budgets (timesteps per image; the matched budget is added)
ELBO_LOSS = "l2"  # ELBO error: l2 | l1 | huber
SHARD = ""  # i/n: this process does every n-th image starting at i ("" = RANK/WORLD_SIZE or 0/1)
OUT = "runs/fairface"  # output folder

CHOICES = {**DATA_CHOICES, **MODEL_CHOICES, "method": SCORE_METHODS, "elbo_loss": ELBO_LOSSES,
           "call": ("argmax", "calibrated")}
PRESETS = {"smoke": {"num_images": 4, "k_list": "5", "elbo_samples": "2", "batch_size": 2}}


def matched_elbo_samples(n_candidates: int) -> int:
    """ELBO timesteps whose K evaluations each first reach ScoreDecomp's 1 + K: ceil((1 + K) / K)."""
    return math.ceil((1 + n_candidates) / n_candidates)


def result_file(out: Path, image_id: str) -> Path:
    """per_image/<readable id>-<crc32>.json: safe characters only, distinct ids never collide."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("._")[-80:] or "image"
    return out / "per_image" / f"{readable}-{zlib.crc32(image_id.encode()):08x}.json"


def read_result(path: Path, settings: dict) -> dict | None:
    """A per-image result made with exactly these settings, else None (missing, partial or stale)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("settings") == settings else None


def result_settings(cfg: dict, score_model: ScoreModel, images, setup: dict) -> dict:
    """Everything a per-image result depends on; a result saved with other settings is redone.

    The model's ``identity()`` (a pixel run's checkpoint step and config.json CRC32; SD's
    pipeline folder, scheduler and precision), the timestep of every k, the data source and
    its columns, the resize, the conditions, the scoring method and its options, the seeds,
    the ELBO budgets. JSON-shaped (string keys, lists), so that it compares equal after a
    round trip through the file.
    """
    keys = ("model", "num_inference_steps", "data", "attribute", "label_column", "image_column", "data_config",
            "split", "size", "images_root", "method", "lp_order", "pca_components", "pca_normalize", "seed",
            "elbo_loss")
    settings = {key: cfg[key] for key in keys}
    return settings | {
        "model_identity": score_model.identity(), "kind": type(images).__name__, "resize": images.resize,
        "base": setup["base"], "candidates": setup["candidates"], "classes": setup["classes"],
        "timesteps": {str(k): t for k, t in setup["timesteps"].items()}, "elbo_budgets": setup["elbo_budgets"],
        "dtype": "" if setup["pixel"] else cfg["dtype"], "scheduler": "" if setup["pixel"] else cfg["scheduler"]}


# ----------------------------------------------------------------------------- the evaluation


def evaluate_batch(score_model: ScoreModel, x0: torch.Tensor, image_ids: list[str], setup: dict) -> list[dict]:
    """Per-image results for one encoded batch: ScoreDecomp at every k, the ELBO at every budget.
    "pred" is ``decide`` of the scores (-1 for an exact tie)."""
    noise = batch_noise(x0.shape[1:], setup["seed"], image_ids)
    batch = len(image_ids)
    results: list[dict] = [{"scoredecomp": {}, "elbo": {}} for _ in image_ids]
    n_conditions = 1 + len(setup["candidates"])
    for k, timestep in setup["timesteps"].items():
        start = time.perf_counter()
        scores = scoredecomp_scores(score_model, x0, timestep, noise, setup["base"], setup["candidates"],
                                    setup["method"], setup["lp_order"], setup["pca_components"],
                                    setup["pca_normalize"])
        seconds = (time.perf_counter() - start) / batch
        for result, row, pred in zip(results, scores, decide(scores).tolist()):
            result["scoredecomp"][str(k)] = {"timestep": timestep, "scores": row.tolist(), "pred": pred,
                                            "seconds": seconds, "evals": n_conditions}
    for n_samples in setup["elbo_budgets"]:
        start = time.perf_counter()
        out = elbo_classify(score_model, x0, setup["candidates"], n_samples=n_samples, loss=setup["elbo_loss"],
                            seed=setup["seed"])
        seconds = (time.perf_counter() - start) / batch
        for i, result in enumerate(results):
            result["elbo"][str(n_samples)] = {"scores": out["scores"][i].tolist(), "pred": int(out["pred"][i]),
                                              "seconds": seconds, "evals": int(out["n_evals"][i])}
    return results


def margin(entry: dict) -> float:
    """score_1 - score_0 of a two-class result: what the AUC ranks and the calibrated call thresholds."""
    return entry["scores"][1] - entry["scores"][0]


def summarise(records: list[dict], setup: dict, classes: list[str], call: str = "argmax",
              calibration: list[dict] | None = None) -> tuple[list[dict], dict[str, list[list[int]]]]:
    """Summary rows and confusion matrices (name -> rows true, columns predicted then ties) over
    finished images. ``call`` "calibrated" thresholds each method's margin at the
    ``calibrated_threshold`` of the ``calibration`` records (none yet: no rows)."""
    rows, confusions = [], {}
    n = len(records)
    calibration = calibration or []
    if n == 0 or (call == "calibrated" and not calibration):
        return rows, confusions
    methods = [("scoredecomp" if setup["method"] == "simplex" else f"scoredecomp_{setup['method']}", "scoredecomp",
                str(k), k, timestep, 1) for k, timestep in setup["timesteps"].items()]
    for n_samples in setup["elbo_budgets"]:
        for name in ("elbo", "elbo_matched"):
            if (n_samples in setup["elbo_listed"]) if name == "elbo" else n_samples == setup["elbo_matched"]:
                methods.append((name, "elbo", str(n_samples), "", "", n_samples))
    for name, group, key, k, timestep, budget in methods:
        entries = [(r["label_index"], r[group][key]) for r in records]
        threshold = None
        if call == "calibrated":
            threshold = calibrated_threshold([margin(r[group][key]) for r in calibration],
                                             [r["label_index"] == 1 for r in calibration])
            preds = [int(margin(entry) > threshold) for _, entry in entries]
        else:
            preds = [entry["pred"] for _, entry in entries]
        matrix = [[0] * (len(classes) + 1) for _ in classes]  # the last column counts ties (-1)
        for (label_index, _), pred in zip(entries, preds):
            matrix[label_index][pred] += 1
        correct = sum(matrix[i][i] for i in range(len(classes)))
        # two classes: how well the margin score_1 - score_0 separates class 1 from class 0
        auc = binary_auc([margin(e) for _, e in entries], [label == 1 for label, _ in entries]) \
            if len(classes) == 2 else None
        rows.append(cc.accuracy_row(name, k, timestep, budget, correct, n, sum(e["seconds"] for _, e in entries),
                                    sum(e["evals"] for _, e in entries), auc, call=call,
                                    ties=sum(pred == -1 for pred in preds), threshold=threshold,
                                    calibration_n=len(calibration) if call == "calibrated" else 0))
        confusions[f"k{key}" if group == "scoredecomp" else f"elbo_n{key}"] = matrix
    return rows, confusions


def report_text(cfg: dict, setup: dict, classes: list[str], rows: list[dict], n_done: int, n_selected: int,
                skipped: list[tuple[str, str]], n_calibration: tuple[int, int] = (0, 0)) -> str:
    family = "from-scratch pixel model (words)" if setup["pixel"] else "Stable Diffusion (prompts)"
    method = cfg["method"] + (f" ({cfg['pca_components']} components, rows L2-normalised: {cfg['pca_normalize']})"
                              if cfg["method"] == "pca" else "")
    order = (f"a shuffle seeded by --seed {cfg['seed']}" if cfg["selection"] == "random" else "dataset order")
    lines = ["# ScoreDecomp accuracy on labelled images", "",
             f"- model: `{cfg['model']}` ({family}); data: `{cfg['data']}` ({setup['kind']}), "
             f"label `{cfg['label_column'] or cfg['attribute']}`",
             f"- images: {n_done} with results of {n_selected} selected ({cfg['selection']}: {order}); "
             f"resize {setup['resize']}; seed {cfg['seed']} (noise per image from (seed, image id))",
             f"- base condition: `{setup['base']}`; method: {method}",
             "", "| class | candidate |", "|---|---|"]
    lines += [f"| {c} | `{cand}` |" for c, cand in zip(classes, setup["candidates"])]
    lines += ["", f"k -> timestep (timesteps[-k], k from the clean end, after set_timesteps("
                  f"{cfg['num_inference_steps']})): " + ", ".join(f"{k} -> {t}" for k, t in setup["timesteps"].items()),
              ""]
    if cfg["call"] == "calibrated":
        done, asked = n_calibration
        lines += [f"Call: calibrated. For each method, class `{classes[1]}` is called when score({classes[1]}) - "
                  f"score({classes[0]}) exceeds the threshold of best accuracy on {done} other labelled images "
                  f"(of {asked} chosen: the next ones in the same order after the evaluated images); the threshold "
                  f"is in the table.", ""]
    else:
        lines += ["Call: argmax, the candidate of the largest score. An exact tie (several candidates share the "
                  "largest score) names no candidate and counts as wrong (column ties).", ""]
    if setup["elbo_budgets"]:
        lines += [f"ELBO ({cfg['elbo_loss']} error): budgets {setup['elbo_listed']} timesteps per image, and "
                  f"{setup['elbo_matched']} (elbo_matched: the fewest whose {len(classes)} evaluations each reach "
                  f"ScoreDecomp's {1 + len(classes)}).", ""]
    lines += ["| method | k | budget | accuracy [95% CI] | n | ties | threshold | s / image | UNet evals / image | "
              "AUC |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        auc = "" if row["auc"] is None else f"{row['auc']:.3f}"
        threshold = "" if row["threshold"] == "" else f"{row['threshold']:.4g}"
        lines.append(f"| {row['method']} | {row['k']} | {row['budget']} | {row['accuracy']:.3f} "
                     f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] | {row['n']} | {row['ties']} | {threshold} | "
                     f"{row['seconds_per_image']:.4f} | {row['evals_per_image']:g} | {auc} |")
    if not rows:
        lines.append("| (no finished image yet) | | | | | | | | | |")
    if len(classes) == 2:
        lines += ["", f"AUC: how well score({classes[1]}) - score({classes[0]}) separates the two classes, whatever "
                      f"the threshold (0.5 = not at all). A high AUC with a low accuracy means the scores carry the "
                      f"label but are shifted towards one candidate: the model's own bias."]
    pending = n_selected - n_done - len(skipped)
    if pending > 0:
        lines += ["", f"{pending} selected images have no result yet (other shards still running, or an "
                      f"interrupted run: rerun the same command to finish)."]
    if skipped:
        lines += ["", "Skipped unreadable images:"] + [f"- {image_id}: {reason}" for image_id, reason in skipped]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = config_from_constants(constants_of(globals()), PRESETS, argv, description=__doc__.splitlines()[0],
                                choices=CHOICES)
    calibrated = cfg["call"] == "calibrated"
    require(not calibrated or cfg["calibration_images"] >= 1,
            f"--calibration_images must be >= 1 with --call calibrated, got {cfg['calibration_images']}")
    ks = cc.parse_k_list(cfg["k_list"])
    listed = cc.parse_k_list(cfg["elbo_samples"], "elbo_samples") if cfg["elbo"] else []
    shard_index, shard_count = parse_shard(cfg["shard"])
    out = Path(cfg["out"])
    require_writable(out, "out")

    score_model = cc.load_model(cfg)
    timesteps = cc.timesteps_for(score_model, ks)  # a k outside the table stops here, before any image
    images = cc.open_data(cfg, score_model)
    classes = cc.resolve_classes(cfg, images)
    base, candidates = cc.resolve_conditions(cfg, score_model, classes)
    require(not calibrated or len(classes) == 2, f"--call calibrated thresholds score_1 - score_0, so it needs two "
                                                 f"classes; got {len(classes)}: {classes}")
    require(cfg["method"] != "pca" or 1 <= cfg["pca_components"] <= 1 + len(candidates),
            f"--pca_components must be between 1 and 1 + {len(candidates)} candidates, got {cfg['pca_components']}")
    selected = cc.select_records(images, cc.selected_indices(len(images), cfg["num_images"], cfg["selection"],
                                                             cfg["seed"]), classes)
    calibration = cc.select_records(images, cc.selected_indices(
        len(images), cfg["calibration_images"], cfg["selection"], cfg["seed"], offset=cfg["num_images"]),
        classes) if calibrated else []
    require(not calibrated or bool(calibration), f"--call calibrated: no labelled image is left for calibration "
                                                 f"after the {cfg['num_images']} evaluated ones ({cfg['data']} has "
                                                 f"{len(images)}); lower --num_images")
    matched = matched_elbo_samples(len(candidates)) if cfg["elbo"] else None
    setup = {"pixel": cc.is_pixel_model(score_model), "kind": type(images).__name__, "resize": images.resize,
             "base": base, "candidates": candidates, "classes": classes, "timesteps": timesteps,
             "method": cfg["method"], "lp_order": cfg["lp_order"], "pca_components": cfg["pca_components"],
             "pca_normalize": cfg["pca_normalize"], "seed": cfg["seed"], "elbo_loss": cfg["elbo_loss"],
             "elbo_listed": listed, "elbo_matched": matched,
             "elbo_budgets": sorted(set(listed) | ({matched} if matched else set()))}
    settings = result_settings(cfg, score_model, images, setup)
    writable_folder(out, "out")
    remove_orphaned_temporaries(out)  # half-written results of a killed run
    atomic_write_json(out / "config.json", cfg | {
        "resolved": settings, "timesteps": {str(k): t for k, t in timesteps.items()},
        "calibration_ids": [r[1] for r in calibration]})

    work = selected + calibration
    mine = [r for position, r in enumerate(work) if position % shard_count == shard_index]
    todo = [r for r in mine if read_result(result_file(out, r[1]), settings) is None]
    stale = sum(1 for r in todo if result_file(out, r[1]).exists())
    print(f"{len(selected)} images selected" + (f" and {len(calibration)} for calibration" if calibrated else "")
          + f", {len(mine)} in shard {shard_index}/{shard_count}: {len(mine) - len(todo)} already done, "
          f"{len(todo)} to do" + (f" ({stale} made with other settings are redone)" if stale else ""), flush=True)
    progress = progress_bar(total=len(todo), desc="ScoreDecomp" + (" + ELBO" if cfg["elbo"] else ""), unit="image")
    for chunk, pixels, consumed in cc.decoded_batches(images, todo, cfg["batch_size"]):
        if chunk:
            x0 = score_model.encode(pixels)
            for (index, image_id, _, label), result in zip(chunk, evaluate_batch(score_model, x0,
                                                                                 [r[1] for r in chunk], setup)):
                record = {"image_id": image_id, "index": index, "label": label, "label_index": classes.index(label),
                          "settings": settings, **result}
                atomic_write_json(result_file(out, image_id), record)
        progress.update(consumed)
    progress.close()

    def finished(chosen: list) -> list[dict]:
        return [rec for r in chosen if (rec := read_result(result_file(out, r[1]), settings)) is not None]

    records, calibration_records = finished(selected), finished(calibration)
    rows, confusions = summarise(records, setup, classes, cfg["call"], calibration_records)
    atomic_write_text(out / "summary.csv", csv_text(rows, cc.SUMMARY_COLUMNS))
    for name, matrix in confusions.items():
        atomic_write_text(out / f"confusion_{name}.csv", cc.confusion_text(matrix, classes))
    atomic_write_text(out / "report.md", report_text(cfg, setup, classes, rows, len(records), len(selected),
                                                     images.skipped, (len(calibration_records), len(calibration))))
    for row in rows:
        auc = "" if row["auc"] is None else f", AUC {row['auc']:.3f}"
        print(f"{row['method']:>14} k={row['k']!s:>4} budget={row['budget']:>4}: accuracy {row['accuracy']:.3f} "
              f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] (n={row['n']}{auc}), {row['evals_per_image']:g} UNet "
              f"evals and {row['seconds_per_image']:.4f} s per image")
    missing = len(work) - len(records) - len(calibration_records)
    if missing:
        print(f"{missing} of {len(work)} images have no result yet", file=sys.stderr)
    print(f"results in {out}")
    return {"rows": rows, "confusions": confusions, "classes": classes, "records": records,
            "calibration_records": calibration_records, "n_done": len(records), "n_selected": len(selected),
            "out": str(out), "setup": setup, "settings": settings}


if __name__ == "__main__":
    run_main(main, "interrupted: rerun the same command to resume (finished images are kept)")
