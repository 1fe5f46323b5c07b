"""Combine the audits of several runs: embedding arms (original / hard-debiased) x JL seeds.

    python statistical_auditing/combine_audits.py --runs runs/w2v-s0,runs/w2v-s1,runs/w2v-s2,runs/deb-s0,... \\
        --out runs/experiment

Each run must have been audited (statistical_auditing/audit.py writes <run>/audit/); an
entry of --runs may also be an audit folder itself. Runs are grouped by embedding arm (the
word-vector source and whether it was hard-debiased); within an arm the runs differ by JL
seed (the random projection is a source of variance the experiment must average over). For
every word, guidance scale and method the report gives each run's female share (with its
95% Wilson interval) and, per arm, the mean across runs with its spread (standard deviation
and range over the JL seeds); then each run's regression slope and R^2 and their mean per
arm. Outputs in --out: report.md, shares.csv (one row per run, word, scale, method),
arms.csv (one row per arm, word, scale, method), regressions.csv, shares_<scale>_<method>.png.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from diffusion_from_scratch.cli import InputError, config_from_constants, constants_of, require, run_main
from diffusion_from_scratch.utils import atomic_write_bytes, atomic_write_text, compact_csv_text

# ----------------------------------------------------------------------------- config
RUNS = ""  # comma-separated run folders (each audited) or audit folders
OUT = "runs/combined_audit"  # output folder

METHOD_NAMES = {"scoredecomp": "ScoreDecomp", "attribute": "attribute rule", "elbo": "ELBO classifier"}
SETTINGS_COMPARED = ("n_per_word", "sampler", "sample_steps", "seed")


def arm_name(embedding: str, debias: bool) -> str:
    return f"{embedding}, {'hard-debiased' if debias else 'original'}"


def spread(values: Sequence[float]) -> dict:
    """mean, sample standard deviation (ddof 1; NaN for one value), min and max of ``values``."""
    array = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if array.size == 0:
        return {"n_runs": 0, "mean": math.nan, "sd": math.nan, "min": math.nan, "max": math.nan}
    return {"n_runs": int(array.size), "mean": float(array.mean()),
            "sd": float(array.std(ddof=1)) if array.size > 1 else math.nan,
            "min": float(array.min()), "max": float(array.max())}


def _float(text: str) -> float:
    return float(text) if text not in ("", None) else math.nan


def load_audit(entry: str) -> dict:
    """One audited run: its audit.json summary, proportions.csv and regression.csv rows."""
    path = Path(entry).expanduser()
    folder = path if (path / "audit.json").is_file() else path / "audit"
    needed = [folder / name for name in ("audit.json", "proportions.csv", "regression.csv")]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise InputError(f"--runs: {entry} has no complete audit (missing {', '.join(missing)} in {folder}); "
                         f"run python statistical_auditing/audit.py --run {entry} first")
    try:
        summary = json.loads(needed[0].read_text())
        with open(needed[1], newline="") as handle:
            shares = list(csv.DictReader(handle))
        with open(needed[2], newline="") as handle:
            fits = list(csv.DictReader(handle))
    except (OSError, ValueError) as error:
        raise InputError(f"--runs: cannot read the audit in {folder}: {error}") from None
    for key in ("embedding", "debias", "jl_seed", "run_step", "k", "config"):
        require(key in summary, f"--runs: {needed[0]} lacks {key!r}; rerun the audit of {entry}")
    for row in shares:
        row["guidance"] = float(row["guidance"])
        row["seen"] = row["seen"] == "True"
        for key in ("share", "ci_low", "ci_high", "cosine_gap", "cosine_gap_jl"):
            row[key] = _float(row.get(key, ""))
        row["n"] = int(row["n"])
    for fit in fits:
        fit["guidance"] = float(fit["guidance"])
        for key in ("slope", "r2", "slope_ci_low", "slope_ci_high", "r2_ci_low", "r2_ci_high", "n_words"):
            fit[key] = _float(fit.get(key, ""))
    name = str(path)
    return {"name": name, "folder": folder, "summary": summary, "shares": shares, "fits": fits,
            "arm": arm_name(summary["embedding"], bool(summary["debias"])), "jl_seed": summary["jl_seed"]}


def combine(audits: list[dict]) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """(per-run share rows, per-arm share rows, per-run fit rows, per-arm fit rows)."""
    run_rows, fit_rows = [], []
    for audit in audits:
        for row in audit["shares"]:
            run_rows.append({"run": audit["name"], "arm": audit["arm"], "jl_seed": audit["jl_seed"],
                             **{k: row[k] for k in ("word", "seen", "guidance", "method", "n", "successes", "share",
                                                    "ci_low", "ci_high", "cosine_gap", "cosine_gap_jl")}})
        for fit in audit["fits"]:
            if fit.get("skipped"):
                continue
            fit_rows.append({"run": audit["name"], "arm": audit["arm"], "jl_seed": audit["jl_seed"],
                             **{k: fit[k] for k in ("guidance", "method", "x", "n_words", "slope", "slope_ci_low",
                                                    "slope_ci_high", "r2", "r2_ci_low", "r2_ci_high")}})
    arm_rows = []
    groups: dict[tuple, list[dict]] = {}
    for row in run_rows:
        groups.setdefault((row["arm"], row["guidance"], row["method"], row["word"]), []).append(row)
    for (arm, guidance, method, word), rows in groups.items():
        arm_rows.append({"arm": arm, "guidance": guidance, "method": method, "word": word, "seen": rows[0]["seen"],
                         "cosine_gap": rows[0]["cosine_gap"],  # before JL: the same for every seed of an arm
                         "jl_seeds": ";".join(str(r["jl_seed"]) for r in rows),
                         "per_run": [(r["jl_seed"], r["share"]) for r in rows],
                         **spread([r["share"] for r in rows])})
    arm_fits = []
    fit_groups: dict[tuple, list[dict]] = {}
    for fit in fit_rows:
        fit_groups.setdefault((fit["arm"], fit["guidance"], fit["method"], fit["x"]), []).append(fit)
    for (arm, guidance, method, x), fits in fit_groups.items():
        slope, r2 = spread([f["slope"] for f in fits]), spread([f["r2"] for f in fits])
        arm_fits.append({"arm": arm, "guidance": guidance, "method": method, "x": x, "n_runs": slope["n_runs"],
                         "slope_mean": slope["mean"], "slope_sd": slope["sd"], "slope_min": slope["min"],
                         "slope_max": slope["max"], "r2_mean": r2["mean"], "r2_sd": r2["sd"]})
    return run_rows, arm_rows, fit_rows, arm_fits


def _num(value: float, spec: str = ".2f") -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


def plot_arms(arm_rows: list[dict], arms: list[str], words: list[str], path: Path, title: str) -> None:
    """Grouped bars: mean female share per word for each arm, error bars = range over the JL seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lookup = {(r["arm"], r["word"]): r for r in arm_rows}
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(words) * max(1, len(arms)) + 2), 4.5))
    try:
        width = 0.8 / max(1, len(arms))
        for i, arm in enumerate(arms):
            rows = [lookup.get((arm, w)) for w in words]
            mean = np.array([r["mean"] if r else np.nan for r in rows])
            low = np.array([r["mean"] - r["min"] if r else np.nan for r in rows])
            high = np.array([r["max"] - r["mean"] if r else np.nan for r in rows])
            positions = np.arange(len(words)) + (i - (len(arms) - 1) / 2) * width
            ax.bar(positions, mean, width, label=arm, alpha=0.85)
            ax.errorbar(positions, mean, yerr=np.vstack([low, high]), fmt="none", ecolor="black", capsize=3)
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.set_xticks(np.arange(len(words)))
        ax.set_xticklabels(words, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("female share (mean over JL seeds; bars: range)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
        atomic_write_bytes(path, buffer.getvalue())
    finally:
        plt.close(fig)


def write_report(out: Path, audits: list[dict], run_rows: list[dict], arm_rows: list[dict], fit_rows: list[dict],
                 arm_fits: list[dict], plots: dict) -> None:
    arms = list(dict.fromkeys(a["arm"] for a in audits))
    lines = ["# Combined audit", "",
             f"{len(audits)} audited runs in {len(arms)} embedding arm(s). Within an arm, runs differ by the seed "
             "of the JL projection; the mean over those runs, with its standard deviation (sd) and range, "
             "separates the embedding's effect from the luck of one projection. Shares are the female share "
             "of each word's samples (95% Wilson interval per run in shares.csv).", "",
             "## Runs", "", "| run | arm | JL seed | step | k | N per word | sampler | controls |",
             "|---|---|---|---|---|---|---|---|"]
    for a in audits:
        s, c = a["summary"], a["summary"]["config"]
        controls = "passed" if not s.get("controls_failed") else "FAILED: " + "; ".join(s["controls_failed"])
        lines.append(f"| `{a['name']}` | {a['arm']} | {a['jl_seed']} | {s['run_step']} | {s['k']} | "
                     f"{c.get('n_per_word')} | {c.get('sampler')} {c.get('sample_steps')} | {controls} |")
    differing = [key for key in SETTINGS_COMPARED if len({str(a["summary"]["config"].get(key)) for a in audits}) > 1]
    if differing:
        lines += ["", f"**Note: the audits differ in {', '.join(differing)}; compare them with care.**"]
    seeds: dict[str, list] = {}
    for a in audits:
        seeds.setdefault(a["arm"], []).append(a["jl_seed"])
    repeated = [arm for arm, values in seeds.items() if len(set(values)) < len(values)]
    if repeated:
        lines += ["", f"**Note: arm(s) {', '.join(repeated)} hold runs with the same JL seed.**"]
    combos = list(dict.fromkeys((r["guidance"], r["method"]) for r in arm_rows))
    lines += ["", "## Female share per word", ""]
    for guidance, method in combos:
        rows = [r for r in arm_rows if r["guidance"] == guidance and r["method"] == method]
        words = list(dict.fromkeys(r["word"] for r in sorted(rows, key=lambda r: (not r["seen"], r["cosine_gap"]))))
        lookup = {(r["arm"], r["word"]): r for r in rows}
        lines += [f"### {METHOD_NAMES.get(method, method)}, guidance {guidance:g}", "",
                  "| word | seen | " + " | ".join(f"{arm}: mean ± sd [min, max] (runs; per run)" for arm in arms) + " |",
                  "|---|---|" + "---|" * len(arms)]
        for word in words:
            cells = []
            for arm in arms:
                r = lookup.get((arm, word))
                if r is None or not r["n_runs"]:
                    cells.append("-")
                    continue
                per_run = ", ".join(f"{seed}: {_num(share)}" for seed, share in r["per_run"])
                cells.append(f"{_num(r['mean'])} ± {_num(r['sd'])} [{_num(r['min'])}, {_num(r['max'])}] "
                             f"({r['n_runs']}; JL seed: share {per_run})")
            seen = next(r["seen"] for r in rows if r["word"] == word)
            lines.append(f"| {word} | {'yes' if seen else 'no'} | " + " | ".join(cells) + " |")
        if (guidance, method) in plots:
            lines += ["", f"![{method} guidance {guidance:g}]({plots[(guidance, method)]})"]
        lines.append("")
    lines += ["## Regression of the female share on the embedding bias (unseen words)", "",
              "Per run (slope and R^2 with the run's bootstrap interval):", "",
              "| run | arm | JL seed | guidance | method | x | slope [95% CI] | R^2 [95% CI] |",
              "|---|---|---|---|---|---|---|---|"]
    for f in fit_rows:
        lines.append(f"| `{f['run']}` | {f['arm']} | {f['jl_seed']} | {f['guidance']:g} | "
                     f"{METHOD_NAMES.get(f['method'], f['method'])} | {f['x']} | {_num(f['slope'], '.3g')} "
                     f"[{_num(f['slope_ci_low'], '.3g')}, {_num(f['slope_ci_high'], '.3g')}] | {_num(f['r2'], '.3f')} "
                     f"[{_num(f['r2_ci_low'], '.3f')}, {_num(f['r2_ci_high'], '.3f')}] |")
    if not fit_rows:
        lines.append("| no run has a regression (each needs >= 3 unseen words with decided images) | | | | | | | |")
    lines += ["", "Per arm (over its runs):", "",
              "| arm | guidance | method | x | runs | slope mean ± sd [min, max] | R^2 mean ± sd |",
              "|---|---|---|---|---|---|---|"]
    for f in arm_fits:
        lines.append(f"| {f['arm']} | {f['guidance']:g} | {METHOD_NAMES.get(f['method'], f['method'])} | {f['x']} | "
                     f"{f['n_runs']} | {_num(f['slope_mean'], '.3g')} ± {_num(f['slope_sd'], '.3g')} "
                     f"[{_num(f['slope_min'], '.3g')}, {_num(f['slope_max'], '.3g')}] | {_num(f['r2_mean'], '.3f')} ± "
                     f"{_num(f['r2_sd'], '.3f')} |")
    lines += ["", "Files: shares.csv, arms.csv, regressions.csv, arm_regressions.csv, and the PNGs above.", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    cfg = config_from_constants(constants_of(globals()), argv=argv, description=__doc__.splitlines()[0])
    entries = [e.strip() for e in cfg["runs"].split(",") if e.strip()]
    require(bool(entries), "--runs: give the audited run folders, comma-separated")
    require(len(set(entries)) == len(entries), f"--runs: a run is listed twice in {cfg['runs']!r}")
    audits = [load_audit(e) for e in entries]
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    run_rows, arm_rows, fit_rows, arm_fits = combine(audits)
    arms = list(dict.fromkeys(a["arm"] for a in audits))
    plots = {}
    for guidance, method in dict.fromkeys((r["guidance"], r["method"]) for r in arm_rows):
        rows = [r for r in arm_rows if r["guidance"] == guidance and r["method"] == method and r["n_runs"]]
        if not rows:
            continue
        words = list(dict.fromkeys(r["word"] for r in sorted(rows, key=lambda r: (not r["seen"], r["cosine_gap"]))))
        name = f"shares_g{guidance:g}_{method}.png"
        plot_arms(rows, arms, words, out / name, f"{METHOD_NAMES.get(method, method)}, guidance {guidance:g}")
        plots[(guidance, method)] = name
    atomic_write_text(out / "shares.csv", compact_csv_text(run_rows, list(run_rows[0]) if run_rows else ["run"]))
    arm_columns = [key for key in (arm_rows[0] if arm_rows else {"arm": None}) if key != "per_run"]
    atomic_write_text(out / "arms.csv", compact_csv_text(arm_rows, arm_columns))
    fit_columns = ("run", "arm", "jl_seed", "guidance", "method", "x", "n_words", "slope", "slope_ci_low",
                   "slope_ci_high", "r2", "r2_ci_low", "r2_ci_high")
    atomic_write_text(out / "regressions.csv", compact_csv_text(fit_rows, fit_columns))
    atomic_write_text(out / "arm_regressions.csv", compact_csv_text(
        arm_fits, ("arm", "guidance", "method", "x", "n_runs", "slope_mean", "slope_sd", "slope_min", "slope_max",
                   "r2_mean", "r2_sd")))
    write_report(out, audits, run_rows, arm_rows, fit_rows, arm_fits, plots)
    print(f"combined {len(audits)} audits in {len(arms)} arm(s); wrote {out / 'report.md'}")
    return {"arms": arms, "arm_rows": arm_rows, "arm_fits": arm_fits, "out": str(out)}


if __name__ == "__main__":
    run_main(main)
