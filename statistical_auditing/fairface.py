"""ScoreDecomp accuracy on labelled images, beside the ELBO classifier (ORIGINAL.md section 6).

For each image x (FairFace faces, or the test split of the project's six-class data) the
model itself says which candidate condition it sees: x0 = encode(x), one noise draw eps
per image (seeded by the image's id, shared by the base and every candidate), and for each
k in --k_list the timestep t = timesteps[-k] (k counted from the clean end, as the
original's ``timesteps[-k]``); ScoreDecomp solves
    min_w || sum_i w_i eps(x_t, t, c_i) - eps(x_t, t, base) ||_2,  w >= 0, sum_i w_i = 1
and predicts argmax_i w_i, i.e. 1 + K UNet evaluations per image and k. Candidate i stands
for class label i of the dataset (``--classes``, default the dataset's order: male, female
for gender). The ELBO classifier (diffusion_classifier.py) runs on the same images at
--elbo_samples timesteps and at the budget matched to ScoreDecomp's evaluations
(n = ceil((1 + K) / K) samples, K evaluations each).

Either model family: --model is a from-scratch run folder (conditions are words; defaults
base "person", candidates "man", "woman") or a Stable Diffusion hub id / pipeline folder
(prompts; defaults "photo of a person's face" and "..., man" / "..., woman", or the seven
FairFace races for --attribute race). Lists are comma-separated; when the items contain
commas (prompts) separate them with "|" instead.

Outputs in --out: per_image/<id>.json (one per image, so a rerun resumes and redoes only
missing images or ones made with other settings; --shard i/n splits the images between
processes, and the last shard to finish summarises them all), summary.csv (method, k,
timestep, budget = noise draws per image (1 for ScoreDecomp, n for the ELBO), accuracy
with a 95% Wilson interval, n, seconds and UNet evaluations per image, and for two classes
the AUC of score_1 - score_0), confusion_k{k}.csv and confusion_elbo_n{n}.csv (rows: true
class, columns: predicted), report.md, config.json. Seconds count the UNet calls and the
solver, not decoding or encoding the images (common to every method).
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

import torch

from diffusion_from_scratch.cli import InputError, config_from_constants, constants_of, require, run_main
from diffusion_from_scratch.synthetic_data import parse_shard
from diffusion_from_scratch.utils import (atomic_write_json, csv_text, atomic_write_text, derived_seed,
                                         remove_orphaned_temporaries, resolve_device, progress_bar)
from statistical_auditing.diffusion_classifier import ELBO_LOSSES, elbo_classify
from statistical_auditing.labelled_images import (FAIRFACE_HUB_ID, FAIRFACE_RACES, KINDS, LabelledImages,
                                                  images_to_tensor, open_labelled_images)
from statistical_auditing.score_models import PixelScoreModel, ScoreModel, load_score_model
from statistical_auditing.stats import wilson_interval
from statistical_auditing.utils_classifier import SCORE_METHODS, score_decomp

MODEL = "stabilityai/stable-diffusion-2-1"  # from-scratch run folder, or Stable Diffusion hub id / pipeline folder
DATA = FAIRFACE_HUB_ID  # HF dataset id or save_to_disk folder, FairFace CSV, label CSV, or six-class dataset root
KIND = "auto"  # data kind: auto | hf | fairface_csv | csv | sixclass
ATTRIBUTE = "gender"  # label: gender | race (FairFace) | class (six-class data) | a CSV column
DATA_CONFIG = "0.25"  # Hugging Face dataset config (FairFace: 0.25 or 1.25 margin)
SPLIT = ""  # dataset split ("" = train for Hugging Face datasets, as the original; test for six-class data)
IMAGES_ROOT = ""  # CSV kinds: folder the CSV's file paths are relative to ("" = the CSV's folder)
LABEL_COLUMN = ""  # csv kind: label column ("" = --attribute)
SIZE = ""  # six-class data: the <size> folder under the root ("" = the only one)
SKIP_BAD = False  # skip unreadable images (noted on stderr) instead of stopping
NUM_IMAGES = 250  # images evaluated (the original: the first 250)
SELECTION = "first"  # which images: first (dataset order, as the original) | random (a seeded random subset)
RESIZE = -1  # square side images are resized to (-1 = family default: 512 for SD, the run's size for a pixel model)
BASE = ""  # base condition ("" = family default: "person" / "photo of a person's face")
CANDIDATES = ""  # candidate conditions, candidate i <-> class i ("" = family default for --attribute)
CLASSES = ""  # class labels the candidates stand for, in order ("" = the dataset's class order)
METHOD = "simplex"  # score: simplex (ScoreDecomp) | cosine | lp | pca
LP_ORDER = 2  # p of the lp method (score = -||base - candidate||_p)
K_LIST = "5,20"  # comma-separated k: timestep = timesteps[-k], counted from the clean end (the original: 5, 20)
SEED = 0  # base seed: each image's noise is seeded by (seed, image id); ELBO noise by seed
BATCH_SIZE = 8  # images per UNet call (times 1 + K conditions)
ELBO = True  # also run the ELBO classifier on the same images
ELBO_SAMPLES = "100"  # comma-separated ELBO budgets (timesteps per image; the matched budget is added)
ELBO_LOSS = "l2"  # ELBO error: l2 | l1 | huber
SHARD = ""  # i/n: this process does every n-th image starting at i ("" = RANK/WORLD_SIZE or 0/1)
OUT = "runs/fairface"  # output folder
DEVICE = ""  # torch device ("" = the accelerator if available, else cpu)
DTYPE = "auto"  # Stable Diffusion only: auto | fp32 | fp16 | bf16
SCHEDULER = "ddpm"  # Stable Diffusion only: ddpm | ddim | euler (built from the model's scheduler config)

CHOICES = {"kind": KINDS, "selection": ("first", "random"), "method": SCORE_METHODS, "elbo_loss": ELBO_LOSSES,
           "dtype": ("auto", "fp32", "fp16", "bf16"), "scheduler": ("ddpm", "ddim", "euler")}
PRESETS = {"smoke": {"num_images": 4, "k_list": "5", "elbo_samples": "2", "batch_size": 2}}
SD_BASE = "photo of a person's face"  # the original's base prompt
PIXEL_BASE = "person"  # the from-scratch vocabulary's neutral word
SD_RESIZE = 512
SUMMARY_COLUMNS = ("method", "k", "timestep", "budget", "accuracy", "ci_low", "ci_high", "n", "seconds_per_image",
                   "evals_per_image", "auc")


# ----------------------------------------------------------------------------- flags shared by the scripts


def split_list(text: str, flag: str) -> list[str]:
    """Items of a list flag: split on "|" when the text has one (prompts contain commas), else on ","."""
    separator = "|" if "|" in text else ","
    items = [item.strip() for item in text.split(separator)]
    if not text.strip() or any(not item for item in items):
        raise InputError(f"--{flag}: expected a non-empty {separator!r}-separated list without empty items, "
                         f"got {text!r}")
    return items


def parse_k_list(text: str, flag: str = "k_list") -> list[int]:
    """Distinct positive integers of a comma-separated list, in the order given."""
    try:
        ks = [int(item) for item in split_list(text, flag)]
    except ValueError:
        raise InputError(f"--{flag}: expected comma-separated integers such as 5,20, got {text!r}") from None
    require(all(k >= 1 for k in ks), f"--{flag}: k counts steps from the clean end and must be >= 1, got {text!r}")
    return list(dict.fromkeys(ks))


def read_list_file(path: str, flag: str) -> list[str]:
    """Non-empty lines of a text file (lines starting with # are comments)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"--{flag}: no such file {path}")
    items = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    items = [item for item in items if item and not item.startswith("#")]
    require(bool(items), f"--{flag}: {path} lists nothing (one item per line expected)")
    return items


def timesteps_for(score_model: ScoreModel, ks: Sequence[int]) -> dict[int, int]:
    """k -> timesteps[-k] for every k, so that a k outside the table fails before any work."""
    return {k: score_model.timestep_for_k(k) for k in ks}


def is_pixel_model(score_model: ScoreModel) -> bool:
    return isinstance(score_model, PixelScoreModel)


def default_conditions(score_model: ScoreModel, attribute: str = "gender") -> tuple[str, list[str]]:
    """(base, candidates) of the model's family for ``attribute``; candidate i <-> class i of
    the dataset (gender: male, female; race: FairFace's seven races in its order).

    From-scratch model (words): "person" and "man" / "woman". Stable Diffusion (prompts):
    "photo of a person's face" and "photo of a person's face, man" / "..., woman" (the
    original's), or "photo of a person's face, <race>" for race.
    """
    if is_pixel_model(score_model):
        if attribute == "gender":
            return PIXEL_BASE, ["man", "woman"]
        raise InputError(f"no default words for --attribute {attribute} with a from-scratch model (its defaults "
                         f"cover gender only); pass --candidates (one word per class)")
    if attribute == "gender":
        return SD_BASE, [f"{SD_BASE}, man", f"{SD_BASE}, woman"]
    if attribute == "race":
        return SD_BASE, [f"{SD_BASE}, {race.replace('_', ' ')}" for race in FAIRFACE_RACES]
    raise InputError(f"no default prompts for --attribute {attribute}; pass --candidates (one prompt per class, "
                     f"separated by |)")


def resolve_conditions(cfg: dict, score_model: ScoreModel, need_base: bool = True) -> tuple[str, list[str]]:
    """--base / --candidates, each defaulting to the family's ``default_conditions``."""
    if cfg["candidates"]:
        candidates = split_list(cfg["candidates"], "candidates")
        base = cfg["base"] or (PIXEL_BASE if is_pixel_model(score_model) else SD_BASE)
    else:
        base, candidates = default_conditions(score_model, cfg["attribute"])
        base = cfg["base"] or base
    require(len(candidates) >= 2, f"--candidates: need at least two candidates, got {candidates}")
    require(len(set(candidates)) == len(candidates), f"--candidates: repeated candidate in {candidates}")
    if need_base:
        require(base not in candidates, f"--base {base!r} is also a candidate")
    return base, candidates


def load_model(cfg: dict) -> ScoreModel:
    """--model through ``load_score_model`` (the SD-only options are ignored for a run folder)."""
    device = resolve_device(cfg["device"])
    return load_score_model(cfg["model"], device, dtype=cfg["dtype"], scheduler=cfg["scheduler"])


def effective_resize(cfg: dict, score_model: ScoreModel) -> int:
    if cfg["resize"] >= 0:
        return cfg["resize"]
    return score_model.image_size if is_pixel_model(score_model) else SD_RESIZE


def open_data(cfg: dict, score_model: ScoreModel) -> LabelledImages:
    """The labelled images of --data (all data flags), resized for the model; empty -> InputError."""
    require(cfg["resize"] >= -1, f"--resize: expected -1 (family default), 0 (keep) or a size, got {cfg['resize']}")
    images = open_labelled_images(
        cfg["data"], cfg["kind"], cfg["attribute"], config=cfg["data_config"] or None, split=cfg["split"] or None,
        images_root=cfg["images_root"] or None, label_column=cfg["label_column"] or cfg["attribute"],
        size=cfg["size"] or None, resize=effective_resize(cfg, score_model), skip_bad=cfg["skip_bad"])
    if len(images) == 0:
        raise InputError(f"--data {cfg['data']}: no images (the source lists none)")
    return images


def resolve_classes(cfg: dict, images: LabelledImages, candidates: list[str]) -> list[str]:
    """Class label of each candidate: --classes, else the dataset's class order."""
    classes = split_list(cfg["classes"], "classes") if cfg["classes"] else list(images.classes)
    if len(classes) != len(candidates):
        raise InputError(f"{len(candidates)} candidates {candidates} for {len(classes)} classes {classes}: "
                         f"candidate i stands for class i, so give one per class (--candidates / --classes)")
    return classes


def selected_indices(n_records: int, n: int, selection: str = "first", seed: int = 0) -> list[int]:
    """Record indices to evaluate, in increasing order: the first n, or (random) the first n of
    a permutation of all records seeded by ``seed`` (a class-ordered folder then still gives
    a mix of classes)."""
    if selection == "first":
        return list(range(min(n, n_records)))
    generator = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(n_records, generator=generator)[:n].tolist())


def select_records(images: LabelledImages, indices: Sequence[int], classes: list[str] | None = None
                   ) -> list[tuple[int, str, Any, str]]:
    """(index, image id, undecoded source, label) of the records at ``indices``; every label must
    be one of ``classes`` (unless None). The records are read without decoding the images (``records``), so images
    that are already done, or belong to another shard, cost nothing."""
    wanted, last = set(indices), max(indices, default=-1)
    selected = []
    for index, (image_id, source, label) in enumerate(images.records()):
        if index > last:
            break
        if index not in wanted:
            continue
        if classes is not None and label not in classes:
            raise InputError(f"image {image_id} has label {label!r}, which is not one of the classes {classes} "
                             f"(set --classes, or --attribute)")
        selected.append((index, image_id, source, label))
    return selected


def image_noise(shape: Sequence[int], seed: int, image_id: str) -> torch.Tensor:
    """N(0, I) noise of ``shape`` seeded by (seed, image id): the same image always gets the same
    draw, whatever its batch, shard or rerun."""
    generator = torch.Generator().manual_seed(derived_seed(seed, image_id))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


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
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("settings") == settings else None


def confusion_text(matrix: list[list[int]], classes: list[str]) -> str:
    rows = [["true\\predicted"] + classes] + [[c] + [str(v) for v in r] for c, r in zip(classes, matrix)]
    return "".join(",".join(row) + "\n" for row in rows)


def binary_auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve = P(score of a random positive > score of a random negative),
    ties counting 1/2: the Mann-Whitney U statistic over n_pos * n_neg (Hanley & McNeil 1982).
    None when either class is absent. Threshold-free: it says whether the scores separate the
    classes even when a shifted decision threshold (a biased model) spoils the accuracy."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return None
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def accuracy_row(method: str, k: Any, timestep: Any, budget: int, correct: int, n: int, seconds: float,
                 evals: float, auc: float | None = None) -> dict:
    low, high = wilson_interval(correct, n)
    return {"method": method, "k": k, "timestep": timestep, "budget": budget, "accuracy": round(correct / n, 6),
            "ci_low": round(low, 6), "ci_high": round(high, 6), "n": n,
            "seconds_per_image": round(seconds / n, 6), "evals_per_image": round(evals / n, 3),
            "auc": None if auc is None else round(auc, 6)}


# ----------------------------------------------------------------------------- the evaluation


@torch.no_grad()
def scoredecomp_scores(score_model: ScoreModel, x0: torch.Tensor, noise: torch.Tensor, timestep: int, base: str,
                       candidates: list[str], method: str = "simplex", p: int = 2) -> torch.Tensor:
    """ScoreDecomp scores (B, K) at one timestep: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise,
    y = eps(x_t, t, base), X = eps(x_t, t, candidates) from one batched ``predict_eps`` call
    (1 + K evaluations per image), scores = ``score_decomp(y, X, method)`` (CPU, float64)."""
    t = torch.full((x0.shape[0],), int(timestep), dtype=torch.long, device=x0.device)
    x_t = score_model.add_noise(x0, noise.to(x0.device, x0.dtype), t)
    eps = score_model.predict_eps(x_t, t, [base, *candidates])
    return score_decomp(eps[:, 0], eps[:, 1:], method, p=p).double().cpu()


def evaluate_batch(score_model: ScoreModel, x0: torch.Tensor, image_ids: list[str], setup: dict) -> list[dict]:
    """Per-image results for one encoded batch: ScoreDecomp at every k, the ELBO at every budget."""
    noise = torch.stack([image_noise(x0.shape[1:], setup["seed"], image_id) for image_id in image_ids])
    batch = len(image_ids)
    results: list[dict] = [{"scoredecomp": {}, "elbo": {}} for _ in image_ids]
    n_conditions = 1 + len(setup["candidates"])
    for k, timestep in setup["timesteps"].items():
        start = time.perf_counter()
        scores = scoredecomp_scores(score_model, x0, noise, timestep, setup["base"], setup["candidates"],
                                    setup["method"], setup["lp_order"])
        seconds = (time.perf_counter() - start) / batch
        for i, result in enumerate(results):
            result["scoredecomp"][str(k)] = {"timestep": timestep, "scores": scores[i].tolist(),
                                            "pred": int(scores[i].argmax()), "seconds": seconds,
                                            "evals": n_conditions}
    for n_samples in setup["elbo_budgets"]:
        start = time.perf_counter()
        out = elbo_classify(score_model, x0, setup["candidates"], n_samples=n_samples, loss=setup["elbo_loss"],
                            seed=setup["seed"])
        seconds = (time.perf_counter() - start) / batch
        for i, result in enumerate(results):
            result["elbo"][str(n_samples)] = {"scores": out["scores"][i].tolist(), "pred": int(out["pred"][i]),
                                              "seconds": seconds, "evals": int(out["n_evals"][i])}
    return results


def summarise(records: list[dict], setup: dict, classes: list[str]) -> tuple[list[dict], dict[str, list[list[int]]]]:
    """Summary rows and confusion matrices (name -> rows true, columns predicted) over finished images."""
    rows, confusions = [], {}
    n = len(records)
    if n == 0:
        return rows, confusions

    def tally(entries: list[tuple[int, dict]]) -> tuple[int, float, float, list[list[int]], float | None]:
        matrix = [[0] * len(classes) for _ in classes]
        for label_index, entry in entries:
            matrix[label_index][entry["pred"]] += 1
        correct = sum(matrix[i][i] for i in range(len(classes)))
        # two classes: how well the margin score_1 - score_0 separates class 1 from class 0
        auc = binary_auc([e["scores"][1] - e["scores"][0] for _, e in entries],
                         [label == 1 for label, _ in entries]) if len(classes) == 2 else None
        return correct, sum(e["seconds"] for _, e in entries), sum(e["evals"] for _, e in entries), matrix, auc

    for k, timestep in setup["timesteps"].items():
        correct, seconds, evals, matrix, auc = tally([(r["label_index"], r["scoredecomp"][str(k)]) for r in records])
        rows.append(accuracy_row(f"scoredecomp_{setup['method']}" if setup["method"] != "simplex" else "scoredecomp",
                                 k, timestep, 1, correct, n, seconds, evals, auc))
        confusions[f"k{k}"] = matrix
    for n_samples in setup["elbo_budgets"]:
        correct, seconds, evals, matrix, auc = tally([(r["label_index"], r["elbo"][str(n_samples)])
                                                      for r in records])
        for method in ("elbo", "elbo_matched"):
            listed = n_samples in setup["elbo_listed"] if method == "elbo" else n_samples == setup["elbo_matched"]
            if listed:
                rows.append(accuracy_row(method, "", "", n_samples, correct, n, seconds, evals, auc))
        confusions[f"elbo_n{n_samples}"] = matrix
    return rows, confusions


def report_text(cfg: dict, setup: dict, classes: list[str], rows: list[dict], n_done: int, n_selected: int,
                skipped: list[tuple[str, str]]) -> str:
    family = "from-scratch pixel model (words)" if setup["pixel"] else "Stable Diffusion (prompts)"
    lines = ["# ScoreDecomp accuracy on labelled images", "",
             f"- model: `{cfg['model']}` ({family}); data: `{cfg['data']}` ({setup['kind']}), "
             f"label `{cfg['attribute']}`",
             f"- images: {n_done} with results of {n_selected} selected ({cfg['selection']}); resize {setup['resize']}; "
             f"seed {cfg['seed']} (noise per image from (seed, image id))",
             f"- base condition: `{setup['base']}`; method: {cfg['method']}",
             "", "| class | candidate |", "|---|---|"]
    lines += [f"| {c} | `{cand}` |" for c, cand in zip(classes, setup["candidates"])]
    lines += ["", "k -> timestep (timesteps[-k], k from the clean end): "
              + ", ".join(f"{k} -> {t}" for k, t in setup["timesteps"].items()), ""]
    if setup["elbo_budgets"]:
        lines += [f"ELBO ({cfg['elbo_loss']} error): budgets {setup['elbo_listed']} timesteps per image, and "
                  f"{setup['elbo_matched']} (elbo_matched: the fewest whose {len(classes)} evaluations each reach "
                  f"ScoreDecomp's {1 + len(classes)}).", ""]
    lines += ["| method | k | budget | accuracy [95% CI] | n | s / image | UNet evals / image | AUC |",
              "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        auc = "" if row["auc"] is None else f"{row['auc']:.3f}"
        lines.append(f"| {row['method']} | {row['k']} | {row['budget']} | {row['accuracy']:.3f} "
                     f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] | {row['n']} | {row['seconds_per_image']:.4f} | "
                     f"{row['evals_per_image']:g} | {auc} |")
    if not rows:
        lines.append("| (no finished image yet) | | | | | | | |")
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
    require(cfg["num_images"] >= 1, f"--num_images must be >= 1, got {cfg['num_images']}")
    require(cfg["batch_size"] >= 1, f"--batch_size must be >= 1, got {cfg['batch_size']}")
    ks = parse_k_list(cfg["k_list"])
    listed = parse_k_list(cfg["elbo_samples"], "elbo_samples") if cfg["elbo"] else []
    shard_index, shard_count = parse_shard(cfg["shard"])
    out = Path(cfg["out"])

    score_model = load_model(cfg)
    timesteps = timesteps_for(score_model, ks)  # a k outside the table stops here, before any image
    base, candidates = resolve_conditions(cfg, score_model)
    images = open_data(cfg, score_model)
    classes = resolve_classes(cfg, images, candidates)
    selected = select_records(images, selected_indices(len(images), cfg["num_images"], cfg["selection"],
                                                       cfg["seed"]), classes)
    matched = matched_elbo_samples(len(candidates)) if cfg["elbo"] else None
    setup = {"pixel": is_pixel_model(score_model), "kind": type(images).__name__, "resize": images.resize,
             "base": base, "candidates": candidates, "timesteps": timesteps, "method": cfg["method"],
             "lp_order": cfg["lp_order"], "seed": cfg["seed"], "elbo_loss": cfg["elbo_loss"],
             "elbo_listed": listed, "elbo_matched": matched,
             "elbo_budgets": sorted(set(listed) | ({matched} if matched else set()))}
    # what a per-image result depends on; a result made otherwise is redone
    settings = {key: cfg[key] for key in ("model", "data", "attribute", "split", "data_config", "method", "lp_order",
                                          "seed", "elbo_loss")}
    settings |= {"resize": images.resize, "base": base, "candidates": candidates, "classes": classes, "k_list": ks,
                 "elbo_budgets": setup["elbo_budgets"], "dtype": "" if setup["pixel"] else cfg["dtype"],
                 "scheduler": "" if setup["pixel"] else cfg["scheduler"]}
    out.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(out)  # half-written results of a killed run
    atomic_write_json(out / "config.json", cfg | {"resolved": settings,
                                                  "timesteps": {str(k): t for k, t in timesteps.items()}})

    mine = [r for position, r in enumerate(selected) if position % shard_count == shard_index]
    todo = [r for r in mine if read_result(result_file(out, r[1]), settings) is None]
    stale = sum(1 for r in todo if result_file(out, r[1]).exists())
    print(f"{len(selected)} images selected, {len(mine)} in shard {shard_index}/{shard_count}: "
          f"{len(mine) - len(todo)} already done, {len(todo)} to do"
          + (f" ({stale} made with other settings are redone)" if stale else ""), flush=True)
    progress = progress_bar(total=len(todo), desc="ScoreDecomp" + (" + ELBO" if cfg["elbo"] else ""), unit="image")
    for start in range(0, len(todo), cfg["batch_size"]):
        chunk = todo[start:start + cfg["batch_size"]]
        decoded = [(r, images.decode(r[1], r[2])) for r in chunk]  # None when skipped as bad
        decoded = [(r, image) for r, image in decoded if image is not None]
        if decoded:
            x0 = score_model.encode(images_to_tensor([image for _, image in decoded]))
            ids = [r[1] for r, _ in decoded]
            for (index, image_id, _, label), result in zip([r for r, _ in decoded],
                                                           evaluate_batch(score_model, x0, ids, setup)):
                record = {"image_id": image_id, "index": index, "label": label, "label_index": classes.index(label),
                          "settings": settings, **result}
                atomic_write_json(result_file(out, image_id), record)
        progress.update(len(chunk))
    progress.close()

    records = [rec for r in selected if (rec := read_result(result_file(out, r[1]), settings)) is not None]
    rows, confusions = summarise(records, setup, classes)
    atomic_write_text(out / "summary.csv", csv_text(rows, SUMMARY_COLUMNS))
    for name, matrix in confusions.items():
        atomic_write_text(out / f"confusion_{name}.csv", confusion_text(matrix, classes))
    atomic_write_text(out / "report.md", report_text(cfg, setup, classes, rows, len(records), len(selected),
                                                     images.skipped))
    for row in rows:
        auc = "" if row["auc"] is None else f", AUC {row['auc']:.3f}"
        print(f"{row['method']:>14} k={row['k']!s:>4} budget={row['budget']:>4}: accuracy {row['accuracy']:.3f} "
              f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] (n={row['n']}{auc}), {row['evals_per_image']:g} UNet "
              f"evals and {row['seconds_per_image']:.4f} s per image")
    if len(records) < len(selected):
        print(f"{len(selected) - len(records)} of {len(selected)} images have no result yet", file=sys.stderr)
    print(f"results in {out}")
    return {"rows": rows, "confusions": confusions, "classes": classes, "records": records, "n_done": len(records),
            "n_selected": len(selected), "out": str(out), "setup": setup}


if __name__ == "__main__":
    run_main(main)
