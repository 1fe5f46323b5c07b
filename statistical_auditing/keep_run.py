"""Keep a finished run of the experiment: copy what a reader needs into a folder to commit.

    python statistical_auditing/keep_run.py --run runs/experiment/w2v-jl0 --dest results/experiment/runs \
        --records runs/experiment/records [--weights true]

The experiment's workflow (workflow/Snakefile, `--keep`) runs this once each run's last job
has finished. The copy <dest>/<run>/ holds the run's CSV, JSON and markdown outputs (none
under checkpoints/ or samples/, nor the per-image, per-step and per-pair records NOT_KEPT), the
KEPT_IMAGES (a sample grid of more than GRID_ROWS words cut to GRID_ROWS of them), records.json (every start of each of the run's jobs: commit, local changes,
times; paths relative to the repository or the run) and, with --weights, the EMA weights in
half precision with the conditioning (pipeline.export_weights), so that
`audit.py --run <dest>/<run> --out <elsewhere>` re-audits it without training. Its reports
name the plots left behind instead of linking to them (mark_unkept_images).

The copy replaces <dest>/<run> as a whole (built beside it, then swapped in), so a copy
never mixes two keeps; a folder there that is not a kept copy of the same run (another arm,
JL seed, training seed or recipe) is refused, never overwritten.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from bias_begets_bias.cli import InputError, config_from_constants, constants_of, require, run_main
from bias_begets_bias.pipeline import IDENTITY_KEYS, export_weights, read_run_config, training_recipe
from bias_begets_bias.utils import REPO_ROOT, atomic_write_json, atomic_write_text, load_json

# ----------------------------------------------------------------------------- config
RUN = ""  # the finished run folder to keep
DEST = ""  # folder that receives <DEST>/<run name>/
RECORDS = ""  # the experiment's job records (workflow/job.py); empty = none
WEIGHTS = True  # also keep the EMA weights (half precision, ~7 MB for the tiny UNet) and the conditioning

KEPT_SUFFIXES = (".csv", ".json", ".md")  # what is kept of a run, besides KEPT_IMAGES
KEPT_IMAGES = ("loss.png", "audit/samples_g1.png")  # the loss curve and the model's own (guidance 1) samples
NOT_KEPT = ("audit/controls.json", "metrics.csv",  # per-image / per-step records (controls.csv, loss.png sum them up)
            "lipschitz/pairs.csv")  # per word pair (10,000+ rows with 137 words; lipschitz.json sums them up)
GRID_ROWS = 25  # [1, inf) rows (words) kept of a sample grid: the training words, then unseen ones evenly spaced
CUT_GRIDS = ("audit/samples_g1.png",)  # grids cut to their first GRID_ROWS rows (the whole grid is redrawn from weights)
MARKER = "kept.json"  # written last: the copy is complete
IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^()\s]+)\)")  # ![alt](target) in a report


def run_identity(config: dict) -> dict:
    """The identity of a run from its config.json: the design's keys (pipeline.IDENTITY_KEYS) and
    the training recipe (pipeline.training_recipe: every other training setting, the same one the
    combine compares; where the run's files and data lie is not identity)."""
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    return {key: train.get(key, config.get(key)) for key in IDENTITY_KEYS} | {"recipe": training_recipe(config)}


def portable_text(text: str, run_dir: Path) -> str:
    """``text`` with absolute paths written relative to the repository or the run folder; any
    other absolute path keeps only its last two parts (a reader's machine has neither)."""
    def replace(match: re.Match) -> str:
        path = Path(match.group(0))
        for base, prefix in ((run_dir.resolve(), ""), (REPO_ROOT, "")):
            try:
                return prefix + (path.relative_to(base).as_posix() or ".")
            except ValueError:
                continue
        return ".../" + "/".join(path.parts[-2:])
    return re.sub(r"/(?:[^\s\"',:;)\]]+/)*[^\s\"',:;)\]]+", lambda m: replace(m) if m.group(0).startswith(
        ("/root/", "/work/", "/tmp/", "/home/", "/mnt/", "/scratch/", "/data/", "/opt/", "/var/", "/Users/"))
        else m.group(0), text)


def cut_grid(source: Path, target: Path, rows: int, image_size: int, head: int = 0) -> Path:
    """Copy a sample grid (utils.save_image_grid: one word per row, rows of image_size + 2 pixels,
    the word's label at the left) as it is when it has at most ``rows`` rows; else keep ``rows`` of
    them as ``<stem>_selected.png``: the first ``head`` (the training words) and the rest evenly
    spaced over the other rows, so both ends of the audit's word order show (the full name then
    stays absent, so reports say it was not kept). A 141-row grid of 8 images is 2.5 MB; the
    repository keeps many runs."""
    from PIL import Image

    pitch = image_size + 2
    with Image.open(source) as picture:
        total = picture.height // pitch
        if total <= rows:
            shutil.copy2(source, target)
            return target
        head = min(head, rows)
        chosen = list(range(head)) + sorted({int(round(i)) for i in np.linspace(head, total - 1, rows - head)})
        cut = Image.new(picture.mode, (picture.width, len(chosen) * pitch), "white")
        for slot, row in enumerate(chosen):
            cut.paste(picture.crop((0, row * pitch, picture.width, (row + 1) * pitch)), (0, slot * pitch))
        path = target.with_name(f"{target.stem}_selected{target.suffix}")
        cut.save(path, format="PNG", optimize=True)
    return path


def mark_unkept_images(folder: Path) -> int:
    """Replace every markdown image link under ``folder`` whose local target is missing with a line
    that names the image and says it was not kept, so a kept report never shows a broken image;
    the run's own folder still has the plot. Idempotent; returns how many links it replaced."""
    replaced = 0
    for report in sorted(folder.rglob("*.md")):
        def unkept(match: re.Match) -> str:
            nonlocal replaced
            alt, target = match.groups()
            if "://" in target or (report.parent / target).is_file():
                return match.group(0)
            replaced += 1
            return f"*(plot `{target}` ({alt}) not kept in this copy: it is in the run's own folder)*"
        text = report.read_text()
        marked = IMAGE_LINK.sub(unkept, text)
        if marked != text:
            atomic_write_text(report, marked)
    return replaced


def job_records(records: Path, run: str) -> dict:
    """The records of a run's jobs (workflow/job.py writes <records>/<kind>__<run>.json), this keep's
    own (still running) excepted."""
    if not records.is_dir():
        return {}
    return {path.stem.replace("__", "/"): load_json(path) for path in sorted(records.glob(f"*__{run}.json"))
            if not path.name.startswith("keep__")}


def check_destination(kept: Path, identity: dict) -> None:
    """A folder already at the destination must be a kept copy of this same run."""
    if not kept.exists():
        return
    if not (kept / MARKER).is_file() and any(kept.iterdir()):
        raise InputError(f"--dest: {kept} exists and is not a kept run (no {MARKER}); move it away")
    if (kept / "config.json").is_file():
        theirs = run_identity(load_json(kept / "config.json"))
        for key in identity:
            if theirs.get(key) != identity[key]:
                raise InputError(f"--dest: {kept} keeps another run ({key} differs: {theirs.get(key)!r} there, "
                                 f"{identity[key]!r} here); keep into another folder or move it away")


def keep_run(run_dir: Path, dest: Path, records: Path | None, weights: bool) -> Path:
    """Copy a finished run's small outputs (and optionally its weights) to ``dest/<run name>``."""
    config = read_run_config(run_dir / "config.json")
    kept = dest / run_dir.name
    check_destination(kept, run_identity(config))
    staging = dest / f".{run_dir.name}.keeping-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    for path in sorted(run_dir.rglob("*")):
        relative = path.relative_to(run_dir)
        if (not path.is_file() or {"checkpoints", "samples"} & set(relative.parts[:-1])
                or relative.as_posix() in NOT_KEPT or relative.name.startswith(".")):
            continue
        if path.suffix in KEPT_SUFFIXES or relative.as_posix() in KEPT_IMAGES:
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            if path.suffix in KEPT_SUFFIXES:
                (staging / relative).write_text(portable_text(path.read_text(), run_dir))
            elif relative.as_posix() in CUT_GRIDS:
                seen = load_json(run_dir / "audit" / "audit.json").get("seen", []) if (
                    run_dir / "audit" / "audit.json").is_file() else []
                cut_grid(path, staging / relative, GRID_ROWS, int(config["train"]["image_size"]), head=len(seen))
            else:
                shutil.copy2(path, staging / relative)
    if weights:
        export_weights(run_dir, staging)
        # export_weights copies config.json as it is; the kept one has portable paths like the rest
        (staging / "config.json").write_text(portable_text((run_dir / "config.json").read_text(), run_dir))
    jobs = job_records(records, run_dir.name) if records else {}
    atomic_write_json(staging / "records.json", json.loads(portable_text(json.dumps(jobs), run_dir)))
    mark_unkept_images(staging)
    atomic_write_json(staging / MARKER, {"run": run_dir.name, "weights": weights,
                                         "identity": run_identity(config),
                                         "jobs": {name: [s.get("commit") for s in record.get("starts", [])]
                                                  for name, record in jobs.items()}})
    old = dest / f".{run_dir.name}.replaced-{os.getpid()}"
    if kept.exists():
        kept.rename(old)
    staging.rename(kept)
    shutil.rmtree(old, ignore_errors=True)
    return kept


def main(argv: list[str] | None = None) -> Path:
    cfg = config_from_constants(constants_of(globals()), None, argv, description=__doc__.splitlines()[0])
    require(bool(cfg["run"]) and bool(cfg["dest"]), "--run and --dest: both are required")
    run_dir, dest = Path(cfg["run"]), Path(cfg["dest"])
    require((run_dir / "config.json").is_file(), f"--run: {run_dir} is not a training run folder (no config.json)")
    require(run_dir.resolve() not in (dest.resolve(), *dest.resolve().parents),
            f"--dest: {dest} lies inside the run {run_dir}; keep it elsewhere")
    dest.mkdir(parents=True, exist_ok=True)
    kept = keep_run(run_dir, dest, Path(cfg["records"]) if cfg["records"] else None, cfg["weights"])
    print(f"kept {run_dir.name} in {kept}")
    return kept


if __name__ == "__main__":
    run_main(main)
