"""Embedding bias vs output bias over professions (StableBias; docs/original.md section 8).

For every profession p:
- embedding bias x: with e(.) the text encoder's output for "a photo of a {p}" (base),
  "..., man" and "..., woman", x = cos(e(base), e(man)) / cos(e(base), e(woman)); x > 1
  means the prompt sits nearer "man". The original used the flattened last hidden states
  (77 x 1024 for SD 2.1); the EOS-token state (CLIP's pooled feature) and the mean over
  the prompt's tokens are extra columns, each with its own regression.
- output bias y: the share of the first N images generated for p (by one text-to-image
  model of the dataset) that zero-shot CLIP calls a man, i.e. whose probability for
  "a photo of a {p}, man" exceeds that for "..., woman"; with a 95% Wilson interval.
Then y is regressed on x (least squares, bootstrap CIs) and plotted.

Dataset assumption (not downloadable here): ``tti-bias/professions-v2`` (a.k.a.
stable-bias/professions-v2) has one row per image with string columns ``profession`` and
``model`` (the generating system), ints ``no`` and ``seed`` and an ``image``; the exact
spelling of the model names is unknown here, so ``--generator auto`` looks for a value
derived from ``--model`` (the id itself, "/" -> "-", or its last part) and otherwise stops
with the list of values present. Column names are flags. Profession names are matched
after lower-casing and turning "_" into spaces. A profession with no image is skipped and
recorded as such (it has no y), never divided by zero.

Outputs in --out_dir: per_profession.csv, regression.csv, regression_<variant>.png,
report.md, config.json.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from bias_begets_bias.cli import InputError, config_from_constants, constants_of, require, run_main
from bias_begets_bias.utils import (DATA_DIR, atomic_write_json, atomic_write_text, csv_text, load_word_list,
                                          progress_bar, require_writable, writable_folder)
from statistical_auditing.core.labelled_images import UnreadableImage, decode_image, load_hf_dataset
from bias_begets_bias.hub import load_hf_model, resolve_device
from statistical_auditing.sd_audits.sd_models import SDTextEncoder
from statistical_auditing.core.stats import linear_fit_with_bootstrap, plot_regression, proportion_summary

MODEL = "stabilityai/stable-diffusion-2-1"  # SD pipeline whose text encoder gives the embedding bias (Hub id or folder)
CLIP_MODEL = "openai/clip-vit-base-patch32"  # zero-shot CLIP that labels the images (Hub id or folder)
DATASET = "tti-bias/professions-v2"  # generated images (Hub id or a save_to_disk folder)
DATASET_CONFIG = ""  # dataset config name ("" = default)
SPLIT = "train"  # dataset split
STREAMING = False  # read a Hub dataset as a stream (no full download; needs an explicit --generator)
PROFESSION_COLUMN = "profession"  # column with the profession of each image
GENERATOR_COLUMN = "model"  # column naming the text-to-image system that made each image
GENERATOR = "auto"  # value of that column to keep: auto (derived from --model), all (no filter) or a name
IMAGE_COLUMN = "image"  # column with the images
PROFESSIONS = str(DATA_DIR / "professions.txt")  # profession list, one per line
IMAGES_PER_PROFESSION = 50  # [1, inf) first N images of each profession (the original: 50)
PROMPT_TEMPLATE = "a photo of a {}"  # base prompt; {} is the profession
MAN_WORD = "man"  # appended as ", man"
WOMAN_WORD = "woman"  # appended as ", woman"
SKIP_BAD = False  # skip unreadable images (with a note) instead of stopping
DEVICE = ""  # torch device ("" = accelerator if available, else cpu)
DTYPE = "auto"  # text encoder precision: auto, fp32, fp16, bf16 (half precisions need an accelerator)
CLIP_BATCH_SIZE = 32  # [1, inf) images per CLIP forward
N_BOOT = 1000  # [1, inf) bootstrap resamples for the regression intervals
SEED = 0  # [0, 2**63) bootstrap seed
OUT_DIR = "runs/real_prompts_proportion"  # output folder

CHOICES = {"dtype": ("auto", "fp32", "fp16", "bf16")}
PRESETS = {"smoke": {"images_per_profession": 3, "n_boot": 50}}
VARIANTS = ("flat", "eos", "mean")  # flattened last hidden states (original), EOS token, token mean
POOLING_OF = {"flat": "none", "eos": "eos", "mean": "mean"}


# ----------------------------------------------------------------------------- maths


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b) = <a, b> / (|a| |b|) of the flattened tensors, in float64."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    norm = float(a.norm() * b.norm())
    if norm == 0:
        raise ValueError("cosine of a zero vector is undefined")
    return float(a @ b) / norm


def embedding_bias(base: torch.Tensor, man: torch.Tensor, woman: torch.Tensor) -> dict[str, float]:
    """cos_man = cos(base, man), cos_woman = cos(base, woman), ratio = cos_man / cos_woman
    (the original's embedding-bias score; > 1 when the base prompt sits nearer "man")."""
    cos_man, cos_woman = cosine(base, man), cosine(base, woman)
    ratio = cos_man / cos_woman if cos_woman != 0 else math.nan
    return {"cos_man": cos_man, "cos_woman": cos_woman, "ratio": ratio}


def man_count(probabilities: torch.Tensor) -> int:
    """Number of images whose "man" probability (column 0) is strictly larger than the
    "woman" one (column 1), as the original counted; ties count as not-man."""
    return int((probabilities[:, 0] > probabilities[:, 1]).sum())


def normalise_profession(name: str) -> str:
    """'Aerospace_Engineer ' -> 'aerospace engineer' (dataset and list spellings may differ)."""
    return " ".join(str(name).replace("_", " ").lower().split())


def select_rows(professions: Iterable[Any], generators: Iterable[Any] | None, wanted: Sequence[str], n: int,
                generator: str | None) -> dict[str, list[int]]:
    """Row indices of the first ``n`` rows of each wanted profession made by ``generator``
    (None = any), in dataset order; every wanted profession is a key (maybe with no rows)."""
    keys = {normalise_profession(p): p for p in wanted}
    chosen: dict[str, list[int]] = {p: [] for p in wanted}
    generators = generators if generators is not None else iter(lambda: None, 0)
    for index, (profession, made_by) in enumerate(zip(professions, generators)):
        if generator is not None and made_by != generator:
            continue
        name = keys.get(normalise_profession(profession))
        if name is not None and len(chosen[name]) < n:
            chosen[name].append(index)
    return chosen


def resolve_generator(requested: str, model: str, present: Iterable[str]) -> str | None:
    """The generator value to keep: None for "all"; for "auto" the first of ``model``,
    ``model`` with "/" -> "-", and its last part that the dataset holds."""
    present = sorted({str(v) for v in present})
    if requested == "all":
        return None
    shown = ", ".join(present[:40]) + (" ..." if len(present) > 40 else "")
    if requested == "auto":
        name = model.rstrip("/")
        for candidate in (name, name.replace("/", "-"), name.split("/")[-1]):
            if candidate in present:
                return candidate
        raise InputError(f"--generator auto: no generator named after --model {model!r} in the dataset; "
                         f"pass one of: {shown} (or --generator all)")
    if requested not in present:
        raise InputError(f"--generator {requested!r} is not in the dataset's generator column; it holds: {shown}")
    return requested


# ----------------------------------------------------------------------------- steps


def prompts_for(profession: str, cfg: dict) -> list[str]:
    base = cfg["prompt_template"].format(profession)
    return [base, f"{base}, {cfg['man_word']}", f"{base}, {cfg['woman_word']}"]


def measure_embedding_bias(professions: list[str], cfg: dict, device: torch.device) -> dict[str, dict[str, float]]:
    """profession -> {variant_cos_man, variant_cos_woman, variant_ratio} for every variant."""
    encoder = SDTextEncoder.from_pretrained(cfg["model"], dtype=cfg["dtype"], device=device)
    results: dict[str, dict[str, float]] = {}
    for profession in progress_bar(professions, desc="embedding bias", unit="profession"):
        prompts = prompts_for(profession, cfg)
        row: dict[str, float] = {}
        pooled = encoder.pooled(prompts, tuple(POOLING_OF[v] for v in VARIANTS))
        for variant in VARIANTS:
            base, man, woman = pooled[POOLING_OF[variant]]
            for key, value in embedding_bias(base, man, woman).items():
                row[f"{variant}_{key}"] = value
        results[profession] = row
    return results


def load_professions_dataset(cfg: dict) -> Any:
    return load_hf_dataset(cfg["dataset"], cfg["dataset_config"] or None, cfg["split"],
                           what="professions dataset", streaming=cfg["streaming"])


def check_columns(columns: Iterable[str] | None, cfg: dict) -> None:
    if columns is None:  # some streamed datasets do not know their columns in advance
        return
    columns = list(columns)
    needed = [cfg["profession_column"], cfg["image_column"]]
    if cfg["generator"] != "all":
        needed.append(cfg["generator_column"])
    missing = [c for c in needed if c not in columns]
    if missing:
        raise InputError(f"dataset {cfg['dataset']}: no column(s) {', '.join(missing)}; it has {', '.join(columns)} "
                         f"(set --profession_column / --generator_column / --image_column)")


def collect_images(dataset: Any, professions: list[str], cfg: dict) -> tuple[dict[str, list[tuple[str, Any]]], str | None]:
    """profession -> [(image_id, undecoded image)] for the first N images of the chosen generator."""
    import datasets

    check_columns(dataset.column_names, cfg)
    n = cfg["images_per_profession"]
    gen_col, prof_col, img_col = cfg["generator_column"], cfg["profession_column"], cfg["image_column"]
    dataset = dataset.cast_column(img_col, datasets.Image(decode=False))
    if isinstance(dataset, datasets.IterableDataset):
        require(cfg["generator"] != "auto", "--streaming true needs an explicit --generator NAME (or all): "
                                            "a stream cannot list its generator names in advance")
        generator = None if cfg["generator"] == "all" else cfg["generator"]
        keys = {normalise_profession(p): p for p in professions}
        chosen: dict[str, list[tuple[str, Any]]] = {p: [] for p in professions}
        progress = progress_bar(desc="scanning stream", unit="row")
        for index, row in enumerate(dataset):
            progress.update()
            if generator is None or row.get(gen_col) == generator:
                name = keys.get(normalise_profession(row[prof_col]))
                if name is not None and len(chosen[name]) < n:
                    chosen[name].append((f"row {index}", row[img_col]))
            if all(len(v) >= n for v in chosen.values()):
                break
        progress.close()
        return chosen, generator
    # map-style: read the two text columns only, then fetch the chosen rows' image bytes
    generator_values = list(dataset[gen_col]) if cfg["generator"] != "all" else None
    generator = resolve_generator(cfg["generator"], cfg["model"], generator_values or [])
    indices = select_rows(dataset[prof_col], generator_values, professions, n, generator)
    return ({p: [(f"row {i}", dataset[i][img_col]) for i in rows] for p, rows in indices.items()}, generator)


@torch.no_grad()
def clip_probabilities(model: Any, processor: Any, images: list, texts: list[str], device: torch.device,
                       batch_size: int) -> torch.Tensor:
    """(N, len(texts)) zero-shot CLIP probabilities: softmax over texts of logits_per_image."""
    out = []
    for start in range(0, len(images), batch_size):
        inputs = processor(text=texts, images=images[start:start + batch_size], return_tensors="pt", padding=True)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        out.append(model(**inputs).logits_per_image.float().softmax(dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, len(texts))


def measure_output_bias(chosen: dict[str, list[tuple[str, Any]]], cfg: dict, device: torch.device
                        ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    from transformers import CLIPModel, CLIPProcessor

    model = load_hf_model(CLIPModel, cfg["clip_model"], "CLIP model").to(device).eval()
    processor = load_hf_model(CLIPProcessor, cfg["clip_model"], "CLIP processor")
    results, notes = {}, []
    for profession, items in progress_bar(chosen.items(), desc="output bias (CLIP)", unit="profession"):
        images = []
        for image_id, source in items:
            try:
                images.append(decode_image(f"{profession!r} {image_id}", source))
            except UnreadableImage as error:
                if not cfg["skip_bad"]:
                    raise
                notes.append(f"skipped unreadable image {error.image_id}: {error.reason}")
                print(f"note: {notes[-1]}", file=sys.stderr)
        if not images:
            results[profession] = {"n_images": 0, "status": "skipped: no images"}
            continue
        probs = clip_probabilities(model, processor, images, prompts_for(profession, cfg)[1:], device,
                                   cfg["clip_batch_size"])
        summary = proportion_summary(man_count(probs), len(images))
        results[profession] = {"n_images": len(images), "n_man": summary["successes"], "y_man_share": summary["share"],
                               "y_low": summary["low"], "y_high": summary["high"],
                               "status": "ok" if len(images) >= cfg["images_per_profession"] else
                               f"ok: only {len(images)} images"}
    return results, notes


# ----------------------------------------------------------------------------- outputs

CSV_COLUMNS = (["profession", "status", "n_images", "n_man", "y_man_share", "y_low", "y_high"]
               + [f"{v}_{k}" for v in VARIANTS for k in ("cos_man", "cos_woman", "ratio")])


def fit_variants(rows: list[dict[str, Any]], cfg: dict, out_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    usable = [r for r in rows if r.get("y_man_share") is not None]
    fits, notes = [], []
    for variant in VARIANTS:
        points = [r for r in usable if math.isfinite(r[f"{variant}_ratio"])]
        x = [r[f"{variant}_ratio"] for r in points]
        y = [r["y_man_share"] for r in points]
        try:
            fit = linear_fit_with_bootstrap(x, y, n_boot=cfg["n_boot"], seed=cfg["seed"])
        except ValueError as error:
            notes.append(f"no regression for {variant}: {error}")
            continue
        if len(set(y)) == 1:
            notes.append(f"{variant}: y = {y[0]} for every profession, so R^2 is undefined (nan); the slope is 0")
        plot_regression(x, y, [r["profession"] for r in points], fit, out_dir / f"regression_{variant}.png",
                        xlabel=f"embedding bias cos(base, man) / cos(base, woman) [{variant}]",
                        ylabel="share of images CLIP calls a man", title=f"Embedding vs output bias ({variant})")
        fits.append({"variant": variant, "n": fit["n"], "slope": fit["slope"], "slope_low": fit["slope_ci"][0],
                     "slope_high": fit["slope_ci"][1], "intercept": fit["intercept"], "r2": fit["r2"],
                     "r2_low": fit["r2_ci"][0], "r2_high": fit["r2_ci"][1], "p_value": fit["p_value"],
                     "n_boot": fit["n_boot"], "seed": fit["seed"]})
    return fits, notes


def report_text(cfg: dict, generator: str | None, rows: list[dict[str, Any]], fits: list[dict[str, Any]],
                notes: list[str]) -> str:
    skipped = [r["profession"] for r in rows if r["status"].startswith("skipped")]
    lines = ["# Embedding bias vs output bias", "",
             f"- text encoder: `{cfg['model']}`; CLIP: `{cfg['clip_model']}`",
             f"- images: `{cfg['dataset']}` split `{cfg['split']}`, generator "
             f"{'(any)' if generator is None else f'`{generator}`'} (column `{cfg['generator_column']}`), "
             f"first {cfg['images_per_profession']} per profession",
             f"- x = cos(base, man) / cos(base, woman) of the text encoder's states for "
             f"`{prompts_for('{p}', cfg)[0]}` (flat = flattened last hidden states as in the original; "
             f"eos = EOS token; mean = token mean)",
             "- y = share of images with P(man) > P(woman) under zero-shot CLIP; 95% Wilson intervals in the CSV",
             f"- professions: {len(rows)} listed, {len(rows) - len(skipped)} with images, {len(skipped)} skipped",
             "", "| variant | n | slope [95% CI] | R^2 [95% CI] | p |", "|---|---|---|---|---|"]
    for fit in fits:
        lines.append(f"| {fit['variant']} | {fit['n']} | {fit['slope']:.3g} [{fit['slope_low']:.3g}, "
                     f"{fit['slope_high']:.3g}] | {fit['r2']:.3f} [{fit['r2_low']:.3f}, {fit['r2_high']:.3f}] | "
                     f"{fit['p_value']:.3g} |")
    if skipped:
        lines += ["", "Skipped (no images for this generator): " + ", ".join(skipped)]
    if notes:
        lines += ["", "Notes:"] + [f"- {note}" for note in notes]
    lines += ["", f"Bootstrap: {cfg['n_boot']} resamples, seed {cfg['seed']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = config_from_constants(constants_of(globals()), PRESETS, argv, description=__doc__.split("\n")[0],
                                choices=CHOICES)
    require("{}" in cfg["prompt_template"], "--prompt_template needs a {} where the profession goes")
    try:
        cfg["prompt_template"].format("profession")
    except (IndexError, KeyError, ValueError) as error:
        raise InputError(f"--prompt_template: expected a text with one {{}} (write other braces as {{{{ }}}}), got "
                         f"{cfg['prompt_template']!r} ({type(error).__name__}: {error})") from None
    professions = list(dict.fromkeys(load_word_list(Path(cfg["professions"]))))
    device = resolve_device(cfg["device"] or None)
    out_dir = Path(cfg["out_dir"])
    require_writable(out_dir, "out_dir")

    dataset = load_professions_dataset(cfg)  # first: a missing dataset should fail before any model loads
    chosen, generator = collect_images(dataset, professions, cfg)
    embedding = measure_embedding_bias(professions, cfg, device)
    output, notes = measure_output_bias(chosen, cfg, device)

    rows = [{"profession": p, **output[p], **embedding[p]} for p in professions]
    writable_folder(out_dir, "out_dir")
    atomic_write_json(out_dir / "config.json", cfg)
    atomic_write_text(out_dir / "per_profession.csv", csv_text(rows, CSV_COLUMNS))
    fits, fit_notes = fit_variants(rows, cfg, out_dir)
    notes += fit_notes
    if fits:
        atomic_write_text(out_dir / "regression.csv", csv_text(fits, list(fits[0])))
    atomic_write_text(out_dir / "report.md", report_text(cfg, generator, rows, fits, notes))
    print(f"wrote {out_dir / 'per_profession.csv'} and {out_dir / 'report.md'}")
    for fit in fits:
        print(f"{fit['variant']}: R^2 = {fit['r2']:.3f} [{fit['r2_low']:.3f}, {fit['r2_high']:.3f}], "
              f"slope = {fit['slope']:.3g}, n = {fit['n']}")
    return {"rows": rows, "fits": fits, "generator": generator}


if __name__ == "__main__":
    run_main(main)
