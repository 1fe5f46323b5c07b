"""Benchmark: ScoreDecomp against the ELBO classifier, accuracy per UNet evaluation.

On a trained from-scratch run (--run) and the test split of its own dataset (gender labels
from the class words), in one run and on the same images:

- ScoreDecomp (statistical_auditing/fairface.py) at every k of --k_list: 1 + K = 3 UNet
  evaluations per image (base "person", candidates "man", "woman");
- the ELBO classifier (Li et al. 2023) at each budget of --elbo_samples timesteps
  (K = 2 evaluations per timestep), plus the budget matched to ScoreDecomp's.

ScoreDecomp is reported at its best k. That k is chosen on --select_images images of the
--select_split split (train by default, so the test accuracy is not tuned on itself);
--select_split test picks it on the test results (optimistic, and said so in the output).
For each ELBO budget: accuracy (95% Wilson interval), evaluations per image, the ratio of
evaluations ELBO / ScoreDecomp, and an exact McNemar test on the paired per-image outcomes.
Target: ScoreDecomp at >= --target_ratio times fewer evaluations than an ELBO budget with
accuracy at least equal to that budget's (the largest budget that is >= target_ratio times
dearer is the one judged). Results: <out>/bench.csv, <out>/test/ and <out>/select/
(fairface.py outputs, resumable).

    python bench/scoredecomp_vs_elbo.py [--run runs/demo] [--elbo_samples 4,16,64] [--strict true]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from scipy.stats import binomtest

from bias_begets_bias.cli import InputError, config_from_constants, constants_of, require, run_main
from bias_begets_bias.utils import atomic_write_text, csv_text
from statistical_auditing import fairface as ff

RUN = "runs/demo"  # trained from-scratch run folder (diffusion_from_scratch/ddpm_conditional.py)
DATA = ""  # six-class dataset root ("" = the run's own dataset_path from its config.json)
NUM_IMAGES = 0  # [0, inf) test images, a seeded random subset (0 = the whole test split)
K_LIST = "5,20,50,100,200,300,500,700,900"  # list of ints in [1, inf): ScoreDecomp k values tried (timestep = timesteps[-k])
SELECT_SPLIT = "train"  # split on which the best k is chosen: train (held out from the test) | test (optimistic)
SELECT_IMAGES = 60  # [1, inf) random images of that split used to choose k
ELBO_SAMPLES = "4,16,64"  # list of ints in [1, inf): ELBO budgets (timesteps per image, 2 evaluations each)
SEED = 0  # [0, 2**63) noise and selection seed
BATCH_SIZE = 32  # [1, inf) images per UNet call
DEVICE = ""  # torch device ("" = the accelerator if available, else cpu)
TARGET_RATIO = 30.0  # (0, inf) ScoreDecomp must use this many times fewer evaluations ...
STRICT = False  # exit with status 1 when the target is missed
OUT = "bench/results/scoredecomp_vs_elbo"  # output folder (git-ignored)


def mcnemar_exact(a_right: list[bool], b_right: list[bool]) -> dict[str, Any]:
    """Exact McNemar test on paired outcomes (McNemar 1947): with b = #(A right, B wrong) and
    c = #(A wrong, B right), p = two-sided binomial test of b out of b + c at 1/2 (p = 1
    when there is no discordant pair)."""
    if len(a_right) != len(b_right):
        raise ValueError("paired outcomes need the same images")
    b = sum(1 for x, y in zip(a_right, b_right) if x and not y)
    c = sum(1 for x, y in zip(a_right, b_right) if y and not x)
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return {"a_only": b, "b_only": c, "p_value": p}


def best_row(rows: list[dict]) -> dict:
    """The ScoreDecomp row of highest accuracy (the first of equals, i.e. the smallest k listed first)."""
    candidates = [r for r in rows if r["method"] == "scoredecomp"]
    if not candidates:
        raise InputError("no ScoreDecomp result to choose k from")
    return max(candidates, key=lambda r: r["accuracy"])  # max keeps the first maximal element


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = config_from_constants(constants_of(globals()), None, argv, description=__doc__.splitlines()[0],
                                choices={"select_split": ("train", "test")})
    run = Path(cfg["run"])
    require((run / "config.json").is_file(), f"--run: {run} is not a training run folder (no config.json); train "
                                             f"one with diffusion_from_scratch/ddpm_conditional.py")
    data = cfg["data"] or json.loads((run / "config.json").read_text()).get("dataset_path", "")
    require(bool(data) and Path(data).is_dir(), f"the run's dataset {data!r} is not here; pass --data")
    out = Path(cfg["out"])
    common = ["--model", str(run), "--data", str(data), "--kind", "sixclass", "--attribute", "gender",
              "--seed", str(cfg["seed"]), "--batch_size", str(cfg["batch_size"]), "--device", cfg["device"]]

    best_k_note = ""
    if cfg["select_split"] == "train":
        chosen = ff.main(common + ["--split", "train", "--selection", "random", "--num_images",
                                   str(cfg["select_images"]), "--k_list", cfg["k_list"], "--elbo", "false",
                                   "--out", str(out / "select")])
        best_k = best_row(chosen["rows"])["k"]
        best_k_note = f"k chosen on {chosen['n_done']} train images"
    subset = ["--selection", "random", "--num_images", str(cfg["num_images"])] if cfg["num_images"] else \
        ["--num_images", str(10 ** 9)]  # 0: every test image
    test = ff.main(common + ["--split", "test", *subset, "--k_list", cfg["k_list"],
                             "--elbo_samples", cfg["elbo_samples"], "--out", str(out / "test")])
    if cfg["select_split"] == "test":
        best_k = best_row(test["rows"])["k"]
        best_k_note = "k chosen on the test images themselves (optimistic)"
    sd = next(r for r in test["rows"] if r["method"] == "scoredecomp" and r["k"] == best_k)
    records = {r["image_id"]: r for r in test["records"]}
    sd_right = {i: r["scoredecomp"][str(best_k)]["pred"] == r["label_index"] for i, r in records.items()}

    table = [{"method": "scoredecomp", "k": best_k, "budget": 1, "accuracy": sd["accuracy"], "ci_low": sd["ci_low"],
              "ci_high": sd["ci_high"], "n": sd["n"], "evals_per_image": sd["evals_per_image"],
              "seconds_per_image": sd["seconds_per_image"], "auc": sd["auc"], "eval_ratio": 1.0, "sd_only": "",
              "elbo_only": "", "mcnemar_p": ""}]
    for row in test["rows"]:
        if row["method"] not in ("elbo", "elbo_matched"):
            continue
        elbo_right = {i: r["elbo"][str(row["budget"])]["pred"] == r["label_index"] for i, r in records.items()}
        ids = sorted(sd_right)
        test_result = mcnemar_exact([sd_right[i] for i in ids], [elbo_right[i] for i in ids])
        table.append({**{key: row[key] for key in ("method", "budget", "accuracy", "ci_low", "ci_high", "n",
                                                   "evals_per_image", "seconds_per_image", "auc")},
                      "k": "", "eval_ratio": round(row["evals_per_image"] / sd["evals_per_image"], 2),
                      "sd_only": test_result["a_only"], "elbo_only": test_result["b_only"],
                      "mcnemar_p": round(test_result["p_value"], 4)})
    columns = list(table[0])
    atomic_write_text(out / "bench.csv", csv_text(table, columns))

    print(f"\nScoreDecomp vs ELBO on {sd['n']} test images of {data} (run {run}); {best_k_note}: k = {best_k}")
    print(f"{'method':>13} {'k/budget':>8} {'accuracy [95% CI]':>24} {'evals/img':>9} {'ratio':>7} "
          f"{'s/img':>8} {'AUC':>6} {'SD-only':>7} {'ELBO-only':>9} {'McNemar p':>9}")
    for row in table:
        where = row["k"] if row["method"] == "scoredecomp" else row["budget"]
        print(f"{row['method']:>13} {where!s:>8} {row['accuracy']:>8.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] "
              f"{row['evals_per_image']:>9g} {row['eval_ratio']:>6g}x {row['seconds_per_image']:>8.4f} "
              f"{'' if row['auc'] is None else format(row['auc'], '.3f'):>6} "
              f"{row['sd_only']!s:>7} {row['elbo_only']!s:>9} {row['mcnemar_p']!s:>9}")
    judged = [r for r in table[1:] if r["eval_ratio"] >= cfg["target_ratio"]]
    if not judged:
        verdict, met = (f"no ELBO budget costs >= {cfg['target_ratio']:g}x ScoreDecomp's evaluations; add a larger "
                        f"--elbo_samples"), False
    else:
        ref = max(judged, key=lambda r: r["budget"])
        met = sd["accuracy"] >= ref["accuracy"]
        verdict = (f"target {'MET' if met else 'MISSED'}: ScoreDecomp (k={best_k}) {sd['accuracy']:.3f} with "
                   f"{sd['evals_per_image']:g} evaluations vs ELBO ({ref['budget']} timesteps) {ref['accuracy']:.3f} "
                   f"with {ref['evals_per_image']:g} = {ref['eval_ratio']:g}x as many")
    print(verdict)
    print(f"table in {out / 'bench.csv'}")
    if cfg["strict"] and not met:
        sys.exit(1)
    return {"table": table, "best_k": best_k, "met": met, "verdict": verdict}


if __name__ == "__main__":
    run_main(main)
