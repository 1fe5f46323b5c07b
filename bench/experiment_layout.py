"""Benchmark: where a training's throughput goes in the experiment's own job layout.

Measures, in one run, steps/s of the `tiny` recipe's training:

* ``pure``: the bare training step (forward, loss, backward, AdamW) at one thread, from
  bench/train_throughput.py --configs tiny --threads 1 (the baseline);
* ``script alone``: diffusion_from_scratch/ddpm_conditional.py --preset tiny at one thread, alone on
  the machine, with every flag the experiment's workflow gives it (data loading, EMA,
  checkpoints every 200 steps, validation, metrics), timed from its own metrics.csv between
  step --warmup and the last step (start-up excluded);
* ``script side by side``: the same two trainings at once, one thread each, as the workflow runs
  them (workflow/Snakefile: --workers = cores, --threads 1).

Ratios to ``pure`` say what the script itself costs (script alone / pure) and what running
beside another job costs (side by side / alone). The sample grids (every 4 epochs) and the
end-of-run work fall outside a run of a few hundred steps; their time per grid is printed by
the training itself. Needs an idle machine: the load average is recorded with each row.

    python bench/experiment_layout.py                 # about 8 min on 2 idle cores
    python bench/experiment_layout.py --steps 300 --data /tmp/bench-data
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bias_begets_bias.cli import config_from_constants, constants_of, require, run_main  # noqa: E402
from bias_begets_bias.utils import atomic_write_text, cpu_name, csv_text  # noqa: E402

STEPS = 600  # [1, inf) training steps of each measured script run (includes a checkpoint every 200)
WARMUP = 50  # [0, inf) first steps left out of a script run's rate (allocator, caches)
PURE_STEPS = 20  # [1, inf) timed steps of the pure-step baseline
DATA = ""  # dataset root with <root>/32 (empty = a procedural set made in a temporary folder)
OUT = "bench/results/experiment_layout.csv"  # metrics CSV (git-ignored folder)

COLUMNS = ("layout", "processes", "steps_per_s", "vs_pure", "loadavg_1min", "cpu")


def one_thread_env() -> dict:
    return os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def pure_rate(steps: int, scratch: Path) -> float:
    """Steps/s of the bare tiny training step at one thread (bench/train_throughput.py)."""
    out = scratch / "pure.csv"
    subprocess.run([sys.executable, str(REPO / "bench" / "train_throughput.py"), "--configs", "tiny", "--threads",
                    "1", "--steps", str(steps), "--out", str(out)], check=True, env=one_thread_env(),
                   stdout=subprocess.DEVNULL)
    (row,) = [r for r in csv.DictReader(out.open()) if r["config"] == "tiny"]
    return float(row["images_per_s"]) / 32  # the tiny preset's batch size


def training_command(dataset: Path, run_dir: Path, steps: int) -> list[str]:
    """The training as the workflow starts it (workflow/Snakefile, rule train), shortened to ``steps``."""
    return [sys.executable, str(REPO / "diffusion_from_scratch" / "ddpm_conditional.py"), "--preset", "tiny",
            "--dataset_path", str(dataset), "--run_dir", str(run_dir), "--resume", "true", "--debias", "none",
            "--jl_seed", "0", "--num_threads", "1", "--max_steps", str(steps)]


def script_rate(run_dir: Path, warmup: int) -> float:
    """Steps/s from a finished run's metrics.csv, between step ``warmup`` and its last step."""
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    first = next(r for r in rows if int(r["step"]) >= max(warmup, 1))
    last = rows[-1]
    return (int(last["step"]) - int(first["step"])) / (float(last["seconds"]) - float(first["seconds"]))


def run_scripts(dataset: Path, scratch: Path, label: str, n: int, steps: int, warmup: int) -> list[float]:
    runs = [scratch / f"{label}-{i}" for i in range(n)]
    processes = [subprocess.Popen(training_command(dataset, run, steps), env=one_thread_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for run in runs]
    for process in processes:
        _, err = process.communicate()
        require(process.returncode == 0, f"the training failed: {err[-500:]}")
    return [script_rate(run, warmup) for run in runs]


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = config_from_constants(constants_of(globals()), None, argv, description=__doc__.splitlines()[0])
    require(cfg["warmup"] < cfg["steps"], f"--warmup: must be below --steps ({cfg['steps']})")
    with tempfile.TemporaryDirectory(prefix="bench-layout-") as tmp:
        scratch = Path(tmp)
        data = Path(cfg["data"]) if cfg["data"] else scratch / "data"
        if not (data / "32").is_dir():
            subprocess.run([sys.executable, str(REPO / "diffusion_from_scratch" / "synthetic_data.py"), "--out",
                            str(data), "--sizes", "32"], check=True, env=one_thread_env(), stdout=subprocess.DEVNULL)
        rows = []

        def add(layout: str, rates: list[float], base: float | None) -> None:
            for rate in rates:
                rows.append({"layout": layout, "processes": len(rates), "steps_per_s": round(rate, 3),
                             "vs_pure": round(rate / base, 3) if base else 1.0,
                             "loadavg_1min": round(os.getloadavg()[0], 2), "cpu": cpu_name()})
                print(f"{layout:>22}: {rate:6.2f} steps/s" + (f"  ({rate / base:.2f} of pure)" if base else ""),
                      flush=True)

        started = time.time()
        pure = pure_rate(cfg["pure_steps"], scratch)
        add("pure step", [pure], None)
        add("script alone", run_scripts(data / "32", scratch, "alone", 1, cfg["steps"], cfg["warmup"]), pure)
        add("script side by side", run_scripts(data / "32", scratch, "pair", 2, cfg["steps"], cfg["warmup"]), pure)
    atomic_write_text(Path(cfg["out"]), csv_text(rows, COLUMNS))
    print(f"wrote {cfg['out']} ({(time.time() - started) / 60:.1f} min)")
    return rows


if __name__ == "__main__":
    run_main(main)
