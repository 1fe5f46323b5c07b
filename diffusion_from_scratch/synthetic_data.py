"""Make the balanced six-class training set, procedurally or with Stable Diffusion.

    python diffusion_from_scratch/synthetic_data.py --source procedural --out data/generated/portraits
    python diffusion_from_scratch/synthetic_data.py --source stable-diffusion --per_class 6000 --batch_size 15

One loop over the classes of data/prompts.json. Each image gets its own seed, derived from
the base seed, its class and its index (the original reused 15 seeds for every batch).
Layout: <out>/<size>/{train,test}/<class>/<index>.png, plus <out>/manifest.jsonl (one line
per image: class, prompt, source, model, seed, split, files, ground-truth attributes for
procedural images) and <out>/dataset.json (the settings). Every PNG is written to a
temporary name and renamed, so a killed run leaves no half-written file; a rerun skips
finished images and writes the manifest once the set is complete. Shard the work with
--shard i/n (or run under `accelerate launch`, whose RANK / WORLD_SIZE are used).
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bias_begets_bias.cli import InputError, config_from_constants, constants_of, parse_shard, require, run_main
from bias_begets_bias.portraits import RENDER_SIZE, attributes_from_prompt, render_portrait
from bias_begets_bias.utils import (DATA_DIR, atomic_write_bytes, atomic_write_json, derived_seed, load_json,
                                          load_prompts, remove_orphaned_temporaries, require_disk, require_memory,
                                          require_writable, resolve_device, to_rgb8, write_jsonl, progress_bar,
                                          writable_folder)

# ----------------------------------------------------------------------------- config
SOURCE = "procedural"  # procedural (built-in renderer, CPU) | stable-diffusion (the paper's data)
OUT = "data/generated/portraits"  # output folder
PER_CLASS = 1000  # [1, inf) images per class (the paper used 6000)
SIZES = ""  # comma-separated side lengths; "full" = native size; empty = source default
TEST_FRACTION = 0.1  # [0, 1) share of each class held out in test/
SEED = 0  # [0, 2**63) base seed; each image's seed is derived from it, its class and its index
PROMPTS = str(DATA_DIR / "prompts.json")  # class -> prompt
MODEL = "stabilityai/stable-diffusion-2-1"  # stable-diffusion: hub id or local pipeline folder
NUM_INFERENCE_STEPS = 20  # [1, inf) stable-diffusion: DPMSolverSDEScheduler steps
BATCH_SIZE = 15  # [1, inf) images generated together (one class per batch)
DTYPE = "auto"  # auto (fp16 on an accelerator, fp32 on CPU) | fp32 | fp16 | bf16
DEVICE = ""  # empty = the accelerator if there is one, else cpu
SHARD = ""  # i/n: this process makes every n-th image starting at i (empty = RANK/WORLD_SIZE or 0/1)

DEFAULT_SIZES = {"procedural": "32,64", "stable-diffusion": "full,64,128"}
CHOICES = {"source": ("procedural", "stable-diffusion"), "dtype": ("auto", "fp32", "fp16", "bf16")}
# Settings that define the dataset: a rerun into the same folder must not change them.
# What makes two datasets the same: the prompts by their text (class -> prompt), not by the path of the
# file they were read from, so that a moved or re-cloned repository still resumes its dataset.
IDENTITY_KEYS = ("source", "per_class", "sizes", "test_fraction", "seed", "model", "num_inference_steps",
                 "prompt_texts")


# ----------------------------------------------------------------------------- validation
def parse_sizes(text: str, native: int) -> list[int]:
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if part == "full":
            sizes.append(native)
            continue
        try:
            size = int(part)
        except ValueError:
            raise InputError(f"--sizes: expected comma-separated positive integers or 'full', got {text!r}") from None
        require(size > 0, f"--sizes: sizes must be positive, got {size}")
        sizes.append(size)
    return sorted(set(sizes))


# ----------------------------------------------------------------------------- image sources
class ProceduralSource:
    """The built-in portrait renderer: attributes parsed from each prompt."""

    native_size = RENDER_SIZE
    model = "procedural-portraits-v1"

    def __init__(self, prompts: dict[str, str]):
        try:
            self.attributes = {name: attributes_from_prompt(prompt) for name, prompt in prompts.items()}
        except ValueError as error:
            raise InputError(f"--prompts: {error}") from None

    def generate(self, class_name: str, prompt: str, seeds: list[int]) -> list[Image.Image]:
        return [render_portrait(self.attributes[class_name], np.random.default_rng(seed), RENDER_SIZE)
                for seed in seeds]


class StableDiffusionSource:
    """A diffusers text-to-image pipeline with the paper's DPMSolverSDEScheduler."""

    def __init__(self, model: str, steps: int, dtype_name: str, device: torch.device):
        from diffusers import DPMSolverSDEScheduler, StableDiffusionPipeline

        from bias_begets_bias.hub import resolve_pipeline_folder

        try:
            folder = resolve_pipeline_folder(model)
        except InputError as error:
            message = str(error)
            raise InputError(message if message.startswith("--model") else f"--model: {message}") from None
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=pipeline_dtype(dtype_name, device),
                                                       safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DPMSolverSDEScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        self.device = device
        self.steps = steps
        self.model = model
        self.native_size = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)

    def generate(self, class_name: str, prompt: str, seeds: list[int]) -> list[Image.Image]:
        generators = [torch.Generator(self.device).manual_seed(seed) for seed in seeds]
        return self.pipe(prompt=[prompt] * len(seeds), generator=generators,
                         num_inference_steps=self.steps, output_type="pil").images


def pipeline_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp16/bf16 only on an accelerator; the CPU computes in fp32."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    require(device.type != "cpu" or dtype == torch.float32, f"--dtype {name}: half precision needs an accelerator")
    return dtype


# ----------------------------------------------------------------------------- the plan
def plan_images(prompts: dict[str, str], per_class: int, test_fraction: float, seed: int) -> list[dict]:
    """Every image of the dataset, in a fixed order, with its seed and deterministic split."""
    n_test = int(round(per_class * test_fraction))
    records = []
    for class_name, prompt in prompts.items():
        test_indices = set(np.random.default_rng(derived_seed(seed, "split", class_name))
                           .permutation(per_class)[:n_test].tolist())
        for index in range(per_class):
            records.append({"class": class_name, "index": index, "prompt": prompt,
                            "seed": derived_seed(seed, class_name, index),
                            "split": "test" if index in test_indices else "train"})
    return records


def image_files(record: dict, sizes: list[int]) -> dict[str, str]:
    name = f"{record['index']:06d}.png"
    return {str(size): f"{size}/{record['split']}/{record['class']}/{name}" for size in sizes}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_image(image: Image.Image, out: Path, files: dict[str, str]) -> None:
    """The source's image as 8-bit RGB (any mode or bit depth, ``utils.to_rgb8``), resized
    bicubically to each size and written atomically."""
    image = to_rgb8(image, out / next(iter(files.values())))
    for size, relative in files.items():
        side = int(size)
        resized = image if image.size == (side, side) else image.resize((side, side), Image.Resampling.BICUBIC)
        atomic_write_bytes(out / relative, png_bytes(resized))


def check_dataset_settings(out: Path, settings: dict | None) -> None:
    """Refuse to mix two datasets in one folder; record the settings on first use (``settings``
    None: only check that an existing dataset.json is readable)."""
    path = out / "dataset.json"
    if path.exists():
        previous = load_json(path)
        if not isinstance(previous, dict):
            raise InputError(f"{path}: expected a JSON object of the dataset's settings; move it away or use "
                             f"another --out")
        if settings is None:
            return
        upgraded = "prompt_texts" not in previous
        if upgraded:  # written before the prompts' text was recorded: it names the prompts file instead
            try:
                previous["prompt_texts"] = load_prompts(Path(str(previous.get("prompts", ""))))
            except (InputError, OSError):
                raise InputError(f"--out: {path} records its prompts only as the file {previous.get('prompts')!r}, "
                                 f"which cannot be read now, so whether --prompts matches cannot be checked; "
                                 f"restore that file or use another folder") from None
        changed = [k for k in IDENTITY_KEYS if previous.get(k) != settings.get(k)]
        require(not changed, f"--out: {out} holds a dataset made with other settings ({', '.join(changed)}); "
                             f"use another folder")
        if upgraded or previous.get("prompts") != settings.get("prompts"):  # the file the finishing command names
            atomic_write_json(path, previous | {"prompts": settings.get("prompts")})
    elif settings is not None:
        atomic_write_json(path, settings)


_PNG_BYTES_PER_PIXEL = 1 / 32  # a lower bound of a portrait PNG's size per pixel (renders at 256 px: 0.09)
_PLAN_BYTES_PER_IMAGE = 300  # a lower bound of the memory the plan of the images takes per image (measured: 303)


def check_room(out: Path, n_images: int, sizes: list[int]) -> None:
    """Refuse, before anything is written, a dataset whose plan cannot fit in memory or whose
    PNGs cannot fit on the disk of ``out`` (lower bounds: a request that fits is never refused)."""
    what = f"--per_class / --sizes ({n_images:,} images at {', '.join(map(str, sizes))} px)"
    require_memory(n_images * _PLAN_BYTES_PER_IMAGE + max(sizes) ** 2 * 3 * 2, what)
    require_disk(out, n_images * sum(side * side * _PNG_BYTES_PER_PIXEL for side in sizes), what)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> Path:
    cfg = config_from_constants(constants_of(globals()), argv=argv, choices=CHOICES,
                                description=__doc__.splitlines()[0])
    shard_index, shard_count = parse_shard(cfg["shard"])
    prompts = load_prompts(Path(cfg["prompts"]))
    sizes_text = cfg["sizes"] or DEFAULT_SIZES[cfg["source"]]
    # validate before loading anything heavy (a Stable Diffusion model's native size is known once it is loaded)
    check_room(Path(cfg["out"]), len(prompts) * cfg["per_class"],
               parse_sizes(sizes_text, native=ProceduralSource.native_size if cfg["source"] == "procedural" else 1))
    out = Path(cfg["out"])
    require_writable(out, "out")
    check_dataset_settings(out, None)  # a damaged dataset.json stops here, before any model is loaded

    if cfg["source"] == "procedural":
        source = ProceduralSource(prompts)
    else:
        source = StableDiffusionSource(cfg["model"], cfg["num_inference_steps"], cfg["dtype"],
                                       resolve_device(cfg["device"]))
    sizes = parse_sizes(sizes_text, native=source.native_size)
    check_room(out, len(prompts) * cfg["per_class"], sizes)
    writable_folder(out, "out")

    settings = ({k: cfg[k] for k in IDENTITY_KEYS if k in cfg}
                | {"sizes": sizes, "model": source.model, "prompts": cfg["prompts"], "prompt_texts": prompts})
    check_dataset_settings(out, settings)
    remove_orphaned_temporaries(out)

    plan = plan_images(prompts, cfg["per_class"], cfg["test_fraction"], cfg["seed"])
    # Fixed batches (a class's images in chunks of batch_size): a batch's images depend on the
    # batch (the SDE sampler draws shared Brownian noise), so a resumed run must rebuild whole batches.
    batches = []
    for class_name in prompts:
        records = [r for r in plan if r["class"] == class_name]
        batches += [records[i:i + cfg["batch_size"]] for i in range(0, len(records), cfg["batch_size"])]
    mine = [batch for b, batch in enumerate(batches) if b % shard_count == shard_index]
    done = lambda record: all((out / f).is_file() for f in image_files(record, sizes).values())  # noqa: E731
    pending = [batch for batch in mine if not all(done(r) for r in batch)]
    n_pending = sum(len(batch) for batch in pending)
    print(f"{sum(map(len, mine)) - n_pending} of {sum(map(len, mine))} images already done "
          f"(shard {shard_index}/{shard_count}); writing {n_pending} to {out}")

    started = time.perf_counter()
    with progress_bar(total=n_pending, unit="img", desc=f"{cfg['source']} images") as progress:
        for batch in pending:
            torch.manual_seed(batch[0]["seed"])  # the SDE scheduler's noise seed comes from the global RNG
            images = source.generate(batch[0]["class"], batch[0]["prompt"], [r["seed"] for r in batch])
            for record, image in zip(batch, images):
                if not done(record):
                    save_image(image, out, image_files(record, sizes))
            progress.update(len(batch))
    elapsed = time.perf_counter() - started
    if n_pending:
        print(f"made {n_pending} images in {elapsed:.1f} s ({n_pending / max(elapsed, 1e-9):.1f} images/s)")

    missing = [r for r in plan if not all((out / f).is_file() for f in image_files(r, sizes).values())]
    if missing:
        print(f"{len(missing)} images are still made by other shards; the manifest is written by the last one")
        return out
    rows = []
    for record in plan:
        row = {k: record[k] for k in ("class", "index", "prompt", "seed", "split")}
        row |= {"source": cfg["source"], "model": source.model, "files": image_files(record, sizes)}
        if isinstance(source, ProceduralSource):
            row["attributes"] = source.attributes[record["class"]]
        rows.append(row)
    write_jsonl(out / "manifest.jsonl", rows)
    print(f"dataset complete: {len(rows)} images x {len(sizes)} sizes in {out} (manifest.jsonl)")
    return out


if __name__ == "__main__":
    run_main(main, "interrupted: rerun the same command to resume (finished images are kept)")
