"""Does a trained run obey its conditioning? The control check on the seen words.

    python diffusion_from_scratch/fidelity.py --run runs/tiny

Each seen word is trained on the images of every class that lists it in
data/class_words.json, so the data fixes the distribution of attributes the word should
produce (``expected_shares``). This script samples N images per seen word with the run's
EMA model, measures hair and scene with the portrait attribute rules, and compares the
shares (with 95% Wilson intervals) with the expected ones and with the acceptance bar.
A run that fails this control must not be trusted on unseen words.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from bias_begets_bias.cli import config_from_constants, constants_of, parse_number_list, run_main
from bias_begets_bias.pipeline import (AUDIT_SAMPLE_STEPS, AUDIT_SAMPLER, SAMPLERS, TrainedRun, sample,
                                             sampling_scheduler)
from bias_begets_bias.fidelity_bar import AcceptanceBar, expected_shares, fidelity_row, format_table
from bias_begets_bias.portraits import measure_attributes
from bias_begets_bias.utils import (atomic_write_text, check_output_folder, claim_output_folder, csv_text,
                                          derived_seed, load_prompts, record_path, require_memory, resolve_device,
                                          run_identity, save_image_grid, writable_folder)

# ----------------------------------------------------------------------------- config
RUN = "runs/tiny"  # training run folder
CHECKPOINT = ""  # a checkpoints/step-N folder of the run, by name (empty = the latest); another run's is refused
N_PER_WORD = 512  # [1, inf) samples per word and guidance scale
GUIDANCE = "1,3"  # list of numbers in (-inf, inf): comma-separated guidance scales (1 = the model's own conditional)
SAMPLER = AUDIT_SAMPLER  # ddpm | ddim | dpm (default: the audit's, "dpm" = DPM-Solver++)
SAMPLE_STEPS = AUDIT_SAMPLE_STEPS  # [1, inf) sampler steps (default: the audit's, pipeline.AUDIT_SAMPLE_STEPS)
BATCH_SIZE = 128  # [1, inf) images per sampling batch
SEED = 0  # [0, 2**63) sampling seed
DEVICE = ""  # empty = the accelerator if there is one, else cpu
OUT = ""  # output folder (empty = <run>/fidelity)

# The acceptance bar at guidance 1 (bias_begets_bias.fidelity_bar.AcceptanceBar has the rest of it).
BAR_MAX_LONG_MAN = AcceptanceBar.max_long_man  # [0, 1] long hair among "man"'s called images at most this
BAR_MIN_LONG_WOMAN = AcceptanceBar.min_long_woman  # [0, 1] long hair among "woman"'s called images at least this
BAR_MIN_HAIR_CALLED = AcceptanceBar.min_hair_called  # [0, 1] long or short; "none" and "unclear" count against it
BAR_SCENE_TOLERANCE = AcceptanceBar.scene_tolerance  # [0, 1] for man, woman, person: every scene share within this


def evaluate(run: TrainedRun, words: list[str], n_per_word: int, guidances: list[float], sampler: str,
             steps: int, seed: int, batch_size: int, out: Path | None = None,
             bar: AcceptanceBar = AcceptanceBar()) -> list[dict]:
    """Sample, measure and compare; one row per (word, guidance). Saves a grid per guidance."""
    expected = expected_shares(run.config["class_words"], load_prompts())
    vectors = run.word_vectors(words)
    rows = []
    for guidance in guidances:
        generator = torch.Generator().manual_seed(derived_seed(seed, "fidelity", str(guidance)))
        started = time.perf_counter()
        images = sample(run.model, vectors.repeat_interleave(n_per_word, dim=0),
                        sampling_scheduler(run.scheduler, sampler, steps), guidance, generator, batch_size)
        seconds = time.perf_counter() - started
        if out is not None:
            grid = torch.cat([images[i * n_per_word:i * n_per_word + 8] for i in range(len(words))])
            save_image_grid(grid, out / f"samples_guidance{guidance:g}.png", nrow=min(8, n_per_word), labels=words)
        for i, word in enumerate(words):
            attributes = measure_attributes(images[i * n_per_word:(i + 1) * n_per_word])
            rows.append(fidelity_row(word, guidance, attributes, expected, bar) | {"sampling_seconds": seconds})
    return rows


def bar_from_config(cfg: dict) -> AcceptanceBar:
    return AcceptanceBar(max_long_man=cfg["bar_max_long_man"], min_long_woman=cfg["bar_min_long_woman"],
                         min_hair_called=cfg["bar_min_hair_called"], scene_tolerance=cfg["bar_scene_tolerance"])


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = config_from_constants(constants_of(globals()), argv=argv, choices={"sampler": SAMPLERS},
                                description=__doc__.splitlines()[0])
    guidances = parse_number_list(cfg["guidance"], "guidance")
    run = TrainedRun(cfg["run"], resolve_device(cfg["device"]), checkpoint=cfg["checkpoint"])
    sampling_scheduler(run.scheduler, cfg["sampler"], cfg["sample_steps"])  # steps outside the run's table stop here
    default = run.run_dir / ("fidelity" + (f"-{run.checkpoint.name}" if cfg["checkpoint"] else ""))
    owner = dict(tool="fidelity", run_dir=run.run_dir, run_id=run_identity(run.run_dir, run.config), default=default)
    out = Path(cfg["out"] or default)
    check_output_folder(out, **owner)  # another tool's or another run's folder is refused before any work
    writable_folder(out, "out")
    pixels = 3 * run.model.config.image_size ** 2
    require_memory(len(run.words) * cfg["n_per_word"] * pixels + min(cfg["batch_size"], cfg["n_per_word"]) * pixels
                   * 4 * 4, f"--n_per_word {cfg['n_per_word']} / --batch_size {cfg['batch_size']}")
    claim_output_folder(out, **owner)
    rows = evaluate(run, list(run.words), cfg["n_per_word"], guidances, cfg["sampler"], cfg["sample_steps"], cfg["seed"],
                    cfg["batch_size"], out, bar_from_config(cfg))
    table = format_table(rows)
    atomic_write_text(out / "fidelity.md", f"Run {record_path(run.run_dir, run.run_dir.parent)} at step {run.step}, "
                                           f"{cfg['sampler']} {cfg['sample_steps']} steps, seed {cfg['seed']}\n\n{table}\n")
    atomic_write_text(out / "fidelity.csv", csv_text(rows, list(rows[0])))
    print(table)
    print(f"wrote {out / 'fidelity.md'}")
    return rows


if __name__ == "__main__":
    run_main(main)
