"""Command-line pieces shared by fairface.py, diffusion_classifier.py and diff_prompts_same_score.py.

They read the flags of data_flags.py and model_flags.py from a script's config dict: list
flags, the model, the labelled images and which of them to use, the conditions (words or
prompts) and the classes they stand for, and the accuracy rows the scripts write.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from bias_begets_bias.cli import InputError, parse_distinct_numbers, require
from bias_begets_bias.utils import read_text_file, resolve_device
from statistical_auditing.core.labelled_images import (FAIRFACE_RACES, LabelledImages, check_header, images_to_tensor,
                                                  open_labelled_images)
from statistical_auditing.core.score_interface import DEFAULT_INFERENCE_STEPS, ScoreModel
from statistical_auditing.core.score_models import PixelScoreModel
from statistical_auditing.core.stats import wilson_interval

SD_BASE = "photo of a person's face"  # the original's base prompt
PIXEL_BASE = "person"  # the from-scratch vocabulary's neutral word
SD_RESIZE = 224  # the original's FairFace transform: Resize((224, 224))
SUMMARY_COLUMNS = ("method", "call", "k", "timestep", "budget", "accuracy", "ci_low", "ci_high", "n", "ties",
                   "threshold", "calibration_n", "seconds_per_image", "evals_per_image", "auc")


# ----------------------------------------------------------------------------- list flags


def load_score_model(spec: str, device: torch.device | None = None,
                     num_inference_steps: int = DEFAULT_INFERENCE_STEPS, **sd_options) -> ScoreModel:
    """A from-scratch run folder (has config.json and checkpoints/) or a Stable Diffusion pipeline
    (hub id or local folder); both get the timestep table of ``num_inference_steps``
    (``timestep_table``); ``sd_options`` go to StableDiffusionScoreModel.from_pretrained."""
    if (Path(spec) / "config.json").is_file() and (Path(spec) / "checkpoints").is_dir():
        return PixelScoreModel(spec, device, num_inference_steps=num_inference_steps)
    from statistical_auditing.sd_audits.sd_models import StableDiffusionScoreModel

    return StableDiffusionScoreModel.from_pretrained(spec, device=device, num_inference_steps=num_inference_steps,
                                                     **sd_options)


def split_list(text: str, flag: str) -> list[str]:
    """Items of a list flag: split on "|" when the text has one (prompts contain commas), else on ","."""
    separator = "|" if "|" in text else ","
    items = [item.strip() for item in text.split(separator)]
    if not text.strip() or any(not item for item in items):
        raise InputError(f"--{flag}: expected a non-empty {separator!r}-separated list without empty items, "
                         f"got {text!r}")
    return items


def parse_k_list(text: str, flag: str = "k_list") -> list[int]:
    """Distinct positive integers of a comma-separated list, in the order given (an empty list or
    item, a non-integer or one below 1 raises InputError naming the flag)."""
    ks = parse_distinct_numbers(text, flag, int)
    require(all(k >= 1 for k in ks), f"--{flag}: k counts steps from the clean end and must be >= 1, got {text!r}")
    return ks


def read_list_file(path: str, flag: str) -> list[str]:
    """Non-empty lines of a text file (lines starting with # are comments)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"--{flag}: no such file {path}")
    items = [line.strip() for line in read_text_file(file, f"the --{flag} list").splitlines()]
    items = [item for item in items if item and not item.startswith("#")]
    require(bool(items), f"--{flag}: {path} lists nothing (one item per line expected)")
    return items


# ----------------------------------------------------------------------------- the model


def load_model(cfg: dict) -> ScoreModel:
    """--model through ``load_score_model`` with --num_inference_steps (the SD-only options are
    ignored for a run folder)."""
    device = resolve_device(cfg["device"])
    return load_score_model(cfg["model"], device, num_inference_steps=cfg.get("num_inference_steps",
                                                                                DEFAULT_INFERENCE_STEPS),
                            dtype=cfg["dtype"], scheduler=cfg["scheduler"])


def timesteps_for(score_model: ScoreModel, ks: Sequence[int], flag: str = "k_list") -> dict[int, int]:
    """k -> timesteps[-k] for every k, so that a k outside the table fails before any work
    (InputError naming ``flag``)."""
    try:
        return {k: score_model.timestep_for_k(k) for k in ks}
    except InputError as error:
        raise InputError(f"--{flag}: {error}") from None


def is_pixel_model(score_model: ScoreModel) -> bool:
    return isinstance(score_model, PixelScoreModel)


# ----------------------------------------------------------------------------- conditions and classes


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
                         f"cover gender only); pass --candidates (one word per class) or --template")
    if attribute == "gender":
        return SD_BASE, [f"{SD_BASE}, man", f"{SD_BASE}, woman"]
    if attribute == "race":
        return SD_BASE, [f"{SD_BASE}, {race.replace('_', ' ')}" for race in FAIRFACE_RACES]
    raise InputError(f"no default prompts for --attribute {attribute}; pass --candidates (one prompt per class, "
                     f"separated by |) or --template")


def template_prompts(template: str, classes: Sequence[str]) -> list[str]:
    """--template with "{class}" replaced by each class name: "a blurry photo of a {class}." and
    ["cat", "dog"] -> ["a blurry photo of a cat.", "a blurry photo of a dog."] (the original's
    CIFAR-10 prompts)."""
    require("{class}" in template, f"--template: expected a text containing {{class}}, such as "
                                   f"\"a blurry photo of a {{class}}.\", got {template!r}")
    return [template.replace("{class}", name) for name in classes]


def resolve_classes(cfg: dict, images: LabelledImages) -> list[str]:
    """The class labels, in candidate order: --classes, else the dataset's class order."""
    return split_list(cfg["classes"], "classes") if cfg["classes"] else list(images.classes)


def resolve_conditions(cfg: dict, score_model: ScoreModel, classes: Sequence[str],
                       need_base: bool = True) -> tuple[str, list[str]]:
    """(base, candidates), candidate i standing for ``classes[i]``.

    --candidates if given; else --template applied to the class names (base: --base, by default
    "" = the unconditional prompt, the original's default ``uncond_prompt``); else the family's
    ``default_conditions`` for --attribute. --base overrides the base in every case.
    """
    template = cfg.get("template", "")
    if cfg["candidates"]:
        require(not template, "--template and --candidates both given: the template builds the candidates, "
                              "so give one of them")
        candidates = split_list(cfg["candidates"], "candidates")
        base = cfg.get("base") or (PIXEL_BASE if is_pixel_model(score_model) else SD_BASE)
    elif template:
        candidates = template_prompts(template, classes)
        base = cfg.get("base", "")
    else:
        base, candidates = default_conditions(score_model, cfg["attribute"])
        base = cfg.get("base") or base
    require(len(candidates) >= 2, f"--candidates: need at least two candidates, got {candidates}")
    require(len(set(candidates)) == len(candidates), f"--candidates: repeated candidate in {candidates}")
    if need_base:
        require(base not in candidates, f"--base {base!r} is also a candidate")
    if len(classes) != len(candidates):
        raise InputError(f"{len(candidates)} candidates {candidates} for {len(classes)} classes {list(classes)}: "
                         f"candidate i stands for class i, so give one per class (--candidates / --classes / "
                         f"--template)")
    check_conditions(score_model, ([base] if need_base else []) + candidates, "--candidates / --base / --template")
    return base, candidates


def check_conditions(score_model: ScoreModel, conditions: Sequence[str], flags: str) -> None:
    """Every condition usable by the model before any work: a from-scratch run's words must be in
    its word vectors (a Stable Diffusion prompt is any text). InputError names ``flags``."""
    if is_pixel_model(score_model):
        try:
            score_model.condition_vectors(list(conditions))
        except InputError as error:
            raise InputError(f"{flags}: {error}") from None


# ----------------------------------------------------------------------------- the labelled images


def effective_resize(cfg: dict, score_model: ScoreModel) -> int:
    """--resize, or the family default: the run's image size for a pixel model, 224 for SD."""
    if cfg["resize"] >= 0:
        return cfg["resize"]
    return score_model.image_size if is_pixel_model(score_model) else SD_RESIZE


def open_data(cfg: dict, score_model: ScoreModel) -> LabelledImages:
    """The labelled images of --data (all data flags), resized for the model; empty -> InputError."""
    images = open_labelled_images(
        cfg["data"], cfg["kind"], cfg["attribute"], config=cfg["data_config"] or None, split=cfg["split"] or None,
        images_root=cfg["images_root"] or None, label_column=cfg["label_column"] or cfg["attribute"],
        image_column=cfg["image_column"], size=cfg["size"] or None, resize=effective_resize(cfg, score_model),
        skip_bad=cfg["skip_bad"])
    if len(images) == 0:
        raise InputError(f"--data {cfg['data']}: no images (the source lists none)")
    return images


def selected_indices(n_records: int, n: int, selection: str = "random", seed: int = 0, offset: int = 0) -> list[int]:
    """Record indices to use, in increasing order: positions offset .. offset + n - 1 of the
    order of --selection, that is the dataset order (first) or a permutation of all records
    seeded by ``seed`` (random: the original shuffled its loader; a class-ordered folder then
    still gives a mix of classes). ``offset`` > 0 takes images after the first ``offset``
    (disjoint from them: calibration images)."""
    if selection == "first":
        return list(range(min(offset, n_records), min(offset + n, n_records)))
    generator = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(n_records, generator=generator)[offset:offset + n].tolist())


def select_records(images: LabelledImages, indices: Sequence[int], classes: list[str] | None = None
                   ) -> list[tuple[int, str, Any, str]]:
    """(index, image id, undecoded source, label) of the records at ``indices``; every label must
    be one of ``classes`` (unless None). The records are read without decoding the images
    (``records``), so images that are already done, or belong to another shard, cost nothing; only
    their headers are read (without --skip_bad), so that an unreadable image stops the run before
    any work rather than in the middle of it."""
    wanted, last = set(indices), max(indices, default=-1)
    selected = []
    for index, (image_id, source, label) in enumerate(images.records()):
        if index > last:
            break
        if index not in wanted:
            continue
        if classes is not None and label not in classes:
            raise InputError(f"image {image_id} has label {label!r}, which is not one of the classes {classes} "
                             f"(set --classes, or --attribute / --label_column)")
        if not images.skip_bad:
            check_header(image_id, source)
        selected.append((index, image_id, source, label))
    return selected


def decoded_batches(images: LabelledImages, records: Sequence[tuple[int, str, Any, str]], batch_size: int
                    ) -> Iterator[tuple[list[tuple[int, str, Any, str]], torch.Tensor | None, int]]:
    """The records (from ``select_records``) in batches of ``batch_size``, decoded: yields (the
    batch's readable records, their images as one (B, 3, H, W) tensor in [0, 1] or None when
    none is readable, the number of records the batch consumed, for progress counts).
    Unreadable images are skipped or stop the run, as ``images.decode`` says."""
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        decoded = [(record, images.decode(record[1], record[2])) for record in chunk]
        kept = [(record, image) for record, image in decoded if image is not None]
        pixels = images_to_tensor([image for _, image in kept]) if kept else None
        yield [record for record, _ in kept], pixels, len(chunk)


# ----------------------------------------------------------------------------- results


def confusion_text(matrix: list[list[int]], classes: list[str]) -> str:
    """CSV of a confusion matrix: rows true class, columns predicted class, then "tie" (no call)."""
    rows = [["true\\predicted"] + classes + ["tie"]]
    rows += [[c] + [str(v) for v in r] for c, r in zip(classes, matrix)]
    return "".join(",".join(row) + "\n" for row in rows)


def accuracy_row(method: str, k: Any, timestep: Any, budget: int, correct: int, n: int, seconds: float,
                 evals: float, auc: float | None = None, call: str = "argmax", ties: int = 0,
                 threshold: float | None = None, calibration_n: int = 0) -> dict:
    """One summary.csv row: accuracy = correct / n (a tie counts as wrong) with its 95% Wilson
    interval, cost per image, AUC, and how the call was made (argmax, or a calibrated threshold)."""
    low, high = wilson_interval(correct, n)
    return {"method": method, "call": call, "k": k, "timestep": timestep, "budget": budget,
            "accuracy": round(correct / n, 6), "ci_low": round(low, 6), "ci_high": round(high, 6), "n": n,
            "ties": ties, "threshold": "" if threshold is None else round(threshold, 9),
            "calibration_n": calibration_n or "", "seconds_per_image": round(seconds / n, 6),
            "evals_per_image": round(evals / n, 3), "auc": None if auc is None else round(auc, 6)}
