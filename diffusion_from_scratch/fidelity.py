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
from collections import Counter
from pathlib import Path

import torch

from diffusion_from_scratch.cli import config_from_constants, constants_of, parse_number_list, run_main
from diffusion_from_scratch.pipeline import (AUDIT_SAMPLE_STEPS, AUDIT_SAMPLER, SAMPLERS, TrainedRun, sample,
                                             sampling_scheduler)
from diffusion_from_scratch.portraits import SCENES, attributes_from_prompt, measure_attributes
from diffusion_from_scratch.utils import (atomic_write_text, check_output_folder, claim_output_folder, csv_text,
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

# The acceptance bar (issue: "The tiny preset must obey its conditioning"), checked at guidance 1.
BAR_MAX_LONG_MAN = 0.05  # [0, 1]
BAR_MIN_LONG_WOMAN = 0.95  # [0, 1]
BAR_MIN_HAIR_CALLED = 0.95  # [0, 1] long or short; "none" and "unclear" count against it
BAR_MIN_SCENE = {"nurse": ("hospital", 0.90), "philosopher": ("library", 0.90)}
BAR_SCENE_TOLERANCE = 0.12  # [0, 1] for man, woman, person: every scene share within 12 points
BAR_SCENE_WORDS = ("man", "woman", "person")


def expected_shares(class_words: dict[str, list[str]], prompts: dict[str, str]) -> dict[str, dict[str, float]]:
    """Share of long hair and of each scene that the training data teaches each word.

    A word's training images are the images of every class listing it, counted once per
    listing (``man`` appears twice for the class ``man``), with equal images per class.
    """
    counts: dict[str, Counter] = {}
    for class_name, words in class_words.items():
        attributes = attributes_from_prompt(prompts[class_name])
        for word in words:
            counter = counts.setdefault(word, Counter())
            counter["n"] += 1
            counter["long"] += attributes["hair"] == "long"
            counter[attributes["scene"]] += 1
    return {word: {key: c[key] / c["n"] for key in ("long",) + SCENES} for word, c in counts.items()}


def measure(attributes: list[dict[str, str]]) -> dict[str, float]:
    """Shares of the per-image ``portraits.measure_attributes`` calls: hair called (long or
    short; "none" and "unclear" are not), long hair among the called, and each scene plus
    "unclear" over all images (an unclear scene counts against every scene's share)."""
    n = len(attributes)
    with_hair = [a for a in attributes if a["hair"] in ("long", "short")]
    shares = {"n": n, "hair_called": len(with_hair) / n,
              "long": sum(a["hair"] == "long" for a in with_hair) / max(1, len(with_hair)),
              "n_with_hair": len(with_hair), "n_long": sum(a["hair"] == "long" for a in with_hair),
              "hair_unclear": sum(a["hair"] == "unclear" for a in attributes) / n}
    for scene in SCENES + ("unclear",):
        shares[scene] = sum(a["scene"] == scene for a in attributes) / n
    return shares


def bar_failures(word: str, shares: dict[str, float], expected: dict[str, float]) -> list[str]:
    """Which criteria of the acceptance bar a word's measured shares miss (at guidance 1)."""
    failures = []
    if shares["hair_called"] < BAR_MIN_HAIR_CALLED:
        failures.append(f"hair called {shares['hair_called']:.1%} < {BAR_MIN_HAIR_CALLED:.0%}")
    if word == "man" and shares["long"] > BAR_MAX_LONG_MAN:
        failures.append(f"long hair {shares['long']:.1%} > {BAR_MAX_LONG_MAN:.0%}")
    if word == "woman" and shares["long"] < BAR_MIN_LONG_WOMAN:
        failures.append(f"long hair {shares['long']:.1%} < {BAR_MIN_LONG_WOMAN:.0%}")
    if word in BAR_MIN_SCENE:
        scene, minimum = BAR_MIN_SCENE[word]
        if shares[scene] < minimum:
            failures.append(f"{scene} {shares[scene]:.1%} < {minimum:.0%}")
    if word in BAR_SCENE_WORDS:
        for scene in SCENES:
            if abs(shares[scene] - expected[scene]) > BAR_SCENE_TOLERANCE:
                failures.append(f"{scene} {shares[scene]:.1%} vs {expected[scene]:.0%} expected")
    return failures


def evaluate(run: TrainedRun, words: list[str], n_per_word: int, guidances: list[float], sampler: str,
             steps: int, seed: int, batch_size: int, out: Path | None = None) -> list[dict]:
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
            rows.append(fidelity_row(word, guidance, attributes, expected) | {"sampling_seconds": seconds})
    return rows


def fidelity_row(word: str, guidance: float, attributes: list[dict[str, str]],
                 expected: dict[str, dict[str, float]]) -> dict:
    """Measured shares of one word's samples (their ``measure_attributes``), what its data teaches
    (if it is a training word) and the bar's verdict at guidance 1 ("pass", "FAIL: ..." or "" at
    other scales)."""
    shares = measure(attributes)
    target = expected.get(word)
    failures = bar_failures(word, shares, target) if (target and guidance == 1.0) else []
    return {"word": word, "guidance": guidance, **shares, **{f"expected_{k}": v for k, v in (target or {}).items()},
            "bar": ("pass" if not failures else "FAIL: " + "; ".join(failures)) if guidance == 1.0 else ""}


def format_table(rows: list[dict]) -> str:
    lines = ["| word | guidance | n | hair called | long hair | neutral / hospital / library / unclear | expected long, scenes | bar (guidance 1) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        expected = (f"{r['expected_long']:.0%}, {r['expected_neutral']:.0%} / {r['expected_hospital']:.0%} / "
                    f"{r['expected_library']:.0%}") if "expected_long" in r else "-"
        lines.append(f"| {r['word']} | {r['guidance']:g} | {r['n']} | {r['hair_called']:.0%} | {r['long']:.0%} | "
                     f"{r['neutral']:.0%} / {r['hospital']:.0%} / {r['library']:.0%} / {r['unclear']:.0%} | {expected} | "
                     f"{r['bar']} |")
    return "\n".join(lines)


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
                    cfg["batch_size"], out)
    table = format_table(rows)
    atomic_write_text(out / "fidelity.md", f"Run {record_path(run.run_dir, run.run_dir.parent)} at step {run.step}, "
                                           f"{cfg['sampler']} {cfg['sample_steps']} steps, seed {cfg['seed']}\n\n{table}\n")
    atomic_write_text(out / "fidelity.csv", csv_text(rows, list(rows[0])))
    print(table)
    print(f"wrote {out / 'fidelity.md'}")
    return rows


if __name__ == "__main__":
    run_main(main)
