"""The full experiment: embedding arms x JL seeds, each trained, audited, dose-response'd and
measured for Lipschitz ratios, then one combined report. `make experiment` runs this.

    python statistical_auditing/experiment.py --out runs/experiment
    python statistical_auditing/experiment.py --out /tmp/exp --data /tmp/exp-data --preset smoke   # seconds

Arms (the conditioning the model is trained with; see word_vectors.DEBIAS_MODES):
- w2v: the word2vec vectors as they are, JL-projected (the paper's model);
- debiased: hard-debiased (Bolukbasi et al. 2016) BEFORE the projection (the paper's control);
- projected: the same neutralise/equalise AFTER the projection, in the 128-d space the model
  actually sees, with the gender direction of the projected definitional pairs.

Every (arm, JL seed) is one run folder <out>/<arm>-jl<seed>. Its jobs form a chain: train
(ddpm_conditional.py --preset tiny), audit (audit.py), dose-response (dose_response.py; arms
in --dose_arms only) and Lipschitz (lipschitz.py); then combine_audits.py writes
<out>/combined/. Independent jobs run side by side, one torch thread each, as many at a
time as --workers (default: the CPU cores): two 1-thread trainings on two cores give the
same total throughput as one 2-thread training on an idle machine, and a 2-thread process
collapses as soon as anything else runs beside it. --threads N gives each job N threads (and
the default --workers becomes cores / N): for a sitting that can finish only one run, one run
at a time with all the cores finishes it in about half the wall time.

Every job is resumable (training from its checkpoints, the scripts from their caches), and
this script records each job's command, status and wall time in <out>/jobs.json: a rerun
skips the jobs that finished with the same script and arguments (whatever the interpreter, the
checkout's location or --threads) and resumes the rest, so the experiment may span sittings. Each job's
output goes to <out>/logs/<job>.log. A failed job stops only the jobs that need it; the
summary names it and the exit status is non-zero.
<out>/experiment.json records the wall time of each sitting beside the sum of the jobs'
own times (what the same jobs cost one after another).
--keep DIR copies each run, as soon as its last job finishes, to DIR/<run> without its weights,
sample arrays and most plots (keep_run; its reports name the plots left behind): a few hundred kB
to commit, for machines that lose their disk between sittings; combine_audits.py --runs
DIR/<run>,... builds the combined report from them.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from diffusion_from_scratch.cli import (InputError, config_from_constants, constants_of, parse_number_list, require,
                                    run_main)
from diffusion_from_scratch.utils import (REPO_ROOT, atomic_write_json, atomic_write_text, cpu_name, load_json,
                                          require_writable, writable_folder)

# ----------------------------------------------------------------------------- config
OUT = "runs/experiment"  # experiment folder: one run folder per (arm, JL seed), logs/, combined/
DATA = "data/generated/portraits"  # dataset root (made by synthetic_data.py when incomplete)
ARMS = "w2v,debiased,projected"  # comma-separated arms: w2v | debiased | projected
JL_SEEDS = "0,1,2"  # list of ints in [0, 2**32): comma-separated JL projection seeds, one run per arm and seed
DOSE_ARMS = "w2v"  # arms whose runs also get the dose-response (empty = none)
WORKERS = 0  # [0, inf) jobs run side by side (0 = the CPU cores divided by --threads)
THREADS = 1  # [1, inf) torch threads of each job (more than 1 only pays when fewer jobs than cores are left)
DATA_ARGS = ""  # extra flags for synthetic_data.py
TRAIN_ARGS = ""  # extra flags for every training (after --preset tiny)
AUDIT_ARGS = ""  # extra flags for every audit
DOSE_ARGS = ""  # extra flags for every dose-response
LIPSCHITZ_ARGS = ""  # extra flags for every Lipschitz measurement
COMBINE_ARGS = ""  # extra flags for combine_audits.py
IMAGE_SIZE = 32  # [1, inf) the dataset size folder the runs train on
KEEP = ""  # folder that receives a copy of each finished run's small outputs, to commit or archive (empty = none)

PRESETS = {
    # seconds: the whole chain on a tiny dataset with the smoke presets of every script
    "smoke": dict(data_args="--per_class 10 --sizes 32 --test_fraction 0.2", jl_seeds="0",
                  train_args="--preset smoke", audit_args="--preset smoke", dose_args="--preset smoke",
                  lipschitz_args="--preset smoke", combine_args="--n_boot 50 --include_failed true"),
}
ARM_DEBIAS = {"w2v": "none", "debiased": "hard", "projected": "projected"}
KEPT_SUFFIXES = (".csv", ".json", ".md")  # what --keep copies of a run, besides KEPT_IMAGES
KEPT_IMAGES = ("loss.png", "audit/samples_g1.png")  # the loss curve and the model's own (guidance 1) samples
NOT_KEPT = ("audit/controls.json", "metrics.csv")  # per-image / per-step records (controls.csv, loss.png sum them up)
PYTHON = sys.executable


@dataclass
class Job:
    name: str
    command: list[str]
    needs: list[str] = field(default_factory=list)
    priority: int = 0  # lower runs first among ready jobs (trainings: the critical path)


def split_args(text: str, flag: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as error:
        raise InputError(f"--{flag}: cannot split {text!r} into flags ({error})") from None


def script(path: str, *args: str) -> list[str]:
    return [PYTHON, str(REPO_ROOT / path), *args]


def plan(cfg: dict) -> tuple[list[Job], list[str]]:
    """The jobs of the experiment, and the run folders they make."""
    arms = [a.strip() for a in cfg["arms"].split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARM_DEBIAS]
    require(bool(arms) and not unknown, f"--arms: expected a comma-separated subset of {', '.join(ARM_DEBIAS)}, "
                                        f"got {cfg['arms']!r}")
    seeds = parse_number_list(cfg["jl_seeds"], "jl_seeds", int)
    require(len(set(seeds)) == len(seeds), f"--jl_seeds: expected distinct integers, got {cfg['jl_seeds']!r}")
    dose_arms = {a.strip() for a in cfg["dose_arms"].split(",") if a.strip()}
    require(dose_arms <= set(ARM_DEBIAS), f"--dose_arms: expected a subset of {', '.join(ARM_DEBIAS)}")
    out, data = Path(cfg["out"]), Path(cfg["data"])
    dataset = data / str(cfg["image_size"])
    threads = ["--num_threads", str(cfg["threads"])]
    jobs = [Job("data", script("diffusion_from_scratch/synthetic_data.py", "--source", "procedural", "--out",
                               str(data), *split_args(cfg["data_args"], "data_args")), priority=-1)]
    runs = []
    for seed in seeds:  # seed-major, so that a partial experiment has every arm of its first seeds
        for arm in arms:
            name = f"{arm}-jl{seed}"
            run = str(out / name)
            runs.append(run)
            jobs.append(Job(f"train/{name}", script(
                "diffusion_from_scratch/ddpm_conditional.py", "--preset", "tiny", "--dataset_path", str(dataset),
                "--run_dir", run, "--resume", "true", "--debias", ARM_DEBIAS[arm], "--jl_seed", str(seed),
                *threads, *split_args(cfg["train_args"], "train_args")), ["data"], priority=0))
            jobs.append(Job(f"audit/{name}", script("statistical_auditing/audit.py", "--run", run, *threads,
                                                    *split_args(cfg["audit_args"], "audit_args")),
                            [f"train/{name}"], priority=1))
            last = f"audit/{name}"
            if arm in dose_arms:
                jobs.append(Job(f"dose/{name}", script("statistical_auditing/dose_response.py", "--run", run,
                                                       *threads, *split_args(cfg["dose_args"], "dose_args")),
                                [last], priority=2))
                last = f"dose/{name}"
            jobs.append(Job(f"lipschitz/{name}", script("statistical_auditing/lipschitz.py", "--run", run,
                                                        *threads,
                                                        *split_args(cfg["lipschitz_args"], "lipschitz_args")),
                            [last], priority=3))
    jobs.append(Job("combine", script("statistical_auditing/combine_audits.py", "--runs", ",".join(runs),
                                      "--out", str(out / "combined"),
                                      *split_args(cfg["combine_args"], "combine_args")),
                    [j.name for j in jobs if not j.name.startswith(("data", "combine"))], priority=9))
    return jobs, runs


JOB_FLAGS = {"data": "data_args", "train": "train_args", "audit": "audit_args", "dose": "dose_args",
             "lipschitz": "lipschitz_args", "combine": "combine_args"}  # job kind -> the flag adding to its command


def check_job_flags(jobs: list[Job]) -> None:
    """Parse every job's command line with its script's flags and declared ranges (``cli``), so that
    a bad value in --train_args and the like stops here, before any job starts."""
    import importlib

    checked: set[tuple[str, ...]] = set()
    for job in jobs:
        script_path, args = Path(job.command[1]), job.command[2:]
        if (str(script_path), *args) in checked:
            continue
        checked.add((str(script_path), *args))
        module = importlib.import_module(f"{script_path.parent.name}.{script_path.stem}")
        try:
            config_from_constants(constants_of(vars(module)), getattr(module, "PRESETS", None), list(args),
                                  choices=getattr(module, "CHOICES", None))
        except InputError as error:
            raise InputError(f"--{JOB_FLAGS[job.name.split('/')[0]]}: {script_path.name} {error}") from None


def read_record(path: Path, key: str) -> dict:
    """A JSON object this script wrote in --out ({} when there is none yet); a damaged one raises
    InputError naming it (it is not overwritten)."""
    if not path.exists():
        return {}
    record = load_json(path)
    kind = list if key == "sittings" else dict
    if not isinstance(record, dict) or not isinstance(record.get(key, kind()), kind):
        raise InputError(f"{path}: expected the JSON object this script writes (with {key!r}); move it away to "
                         f"start the record afresh")
    return record


def invocation(command: list[str]) -> list[str]:
    """What a job computes: its script as ``folder/name.py`` and its arguments. The interpreter,
    where the checkout lies and the thread count (--threads) are left out, so that a new virtual
    environment, a re-cloned repository or another --threads still skips the finished jobs."""
    script, args = Path(command[1]), list(command[2:])
    if "--num_threads" in args[:-1]:
        at = args.index("--num_threads")
        del args[at:at + 2]
    return [f"{script.parent.name}/{script.name}", *args]


class Ledger:
    """<out>/jobs.json: command, status (done / failed / running), start, seconds, log of every job."""

    def __init__(self, path: Path):
        self.path = path
        self.entries = read_record(path, "jobs").get("jobs", {})

    def done(self, job: Job) -> bool:
        entry = self.entries.get(job.name)
        if not isinstance(entry, dict) or entry.get("status") != "done":
            return False
        command = entry.get("command")
        return (isinstance(command, list) and len(command) >= 2 and all(isinstance(part, str) for part in command)
                and invocation(command) == invocation(job.command))

    def record(self, job: Job, **fields) -> None:
        previous = self.entries.get(job.name)
        self.entries[job.name] = (previous if isinstance(previous, dict) else {}) | {"command": job.command} | fields
        atomic_write_json(self.path, {"jobs": self.entries})


def keep_run(run_dir: Path, ledger_entries: dict, dest: Path) -> Path:
    """Copy a finished run's small outputs to ``dest/<run name>``: its CSV, JSON and markdown files
    (none under checkpoints/ or samples/, nor the per-image and per-step records NOT_KEPT), the
    KEPT_IMAGES, and ``jobs.json`` with its jobs' ledger entries (commands, wall times) and the
    machine. No weights and no sample arrays, so the copy is small enough to commit, and
    combine_audits.py --runs reads it as it reads the run itself. The copy's reports name the plots
    left behind instead of linking to them (mark_unkept_images)."""
    kept = dest / run_dir.name
    for path in sorted(run_dir.rglob("*")):
        relative = path.relative_to(run_dir)
        if (not path.is_file() or {"checkpoints", "samples"} & set(relative.parts[:-1])
                or relative.as_posix() in NOT_KEPT):
            continue
        if path.suffix in KEPT_SUFFIXES or relative.as_posix() in KEPT_IMAGES:
            (kept / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, kept / relative)
    atomic_write_json(kept / "jobs.json", {"jobs": ledger_entries, "machine": f"{cpu_name()}, {os.cpu_count()} cores"})
    mark_unkept_images(kept)
    return kept


IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^()\s]+)\)")  # ![alt](target) in a report


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


def run_jobs(jobs: list[Job], out: Path, workers: int, threads: int = 1, keep: Path | None = None) -> dict:
    """Run the jobs respecting ``needs``, ``workers`` at a time with ``threads`` threads each; return the
    sitting's summary."""
    ledger = Ledger(out / "jobs.json")
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    by_name = {j.name: j for j in jobs}
    finished = {j.name for j in jobs if ledger.done(j)}
    failed: set[str] = set()
    blocked: set[str] = set()
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    started = time.time()
    run_of = {j.name: j.name.split("/", 1)[1] for j in jobs if "/" in j.name}  # job -> its run's folder name

    def keep_if_finished(run: str) -> None:
        names = [name for name, owner in run_of.items() if owner == run]
        if keep is not None and (out / run).is_dir() and all(name in finished for name in names):
            kept = keep_run(out / run, {name: ledger.entries[name] for name in names}, keep)
            print(f"[experiment] kept {run}'s outputs in {kept}", flush=True)

    for run in dict.fromkeys(run_of.values()):  # runs finished in an earlier sitting, e.g. before --keep
        keep_if_finished(run)
    if finished:
        print(f"[experiment] {len(finished)} of {len(jobs)} jobs already done (same command): "
              f"skipped; {out / 'jobs.json'} has their times", flush=True)

    def launch(job: Job) -> None:
        log_path = logs / (job.name.replace("/", "__") + ".log")
        handle = open(log_path, "a")
        handle.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(job.command)}\n")
        handle.flush()
        process = subprocess.Popen(job.command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
                                   start_new_session=True)
        running[job.name] = (process, time.time(), handle)
        ledger.record(job, status="running", started=time.strftime("%Y-%m-%d %H:%M:%S"), log=str(log_path))
        print(f"[experiment] start {job.name} (log: {log_path})", flush=True)

    try:
        while True:
            for name, (process, began, handle) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                handle.close()
                seconds = time.time() - began
                del running[name]
                job = by_name[name]
                if code == 0:
                    finished.add(name)
                    ledger.record(job, status="done", seconds=round(seconds, 1), returncode=0)
                    print(f"[experiment] done  {name} in {seconds / 60:.1f} min", flush=True)
                    if name in run_of:
                        keep_if_finished(run_of[name])
                else:
                    failed.add(name)
                    ledger.record(job, status="failed", seconds=round(seconds, 1), returncode=code)
                    print(f"[experiment] FAILED {name} (exit {code}); see its log", flush=True)
            for job in jobs:  # a job whose need failed or is blocked can never run
                if job.name not in finished | failed | blocked and any(n in failed | blocked for n in job.needs):
                    blocked.add(job.name)
            ready = sorted((j for j in jobs if j.name not in finished | failed | blocked | set(running)
                            and all(n in finished for n in j.needs)), key=lambda j: j.priority)
            while ready and len(running) < workers:
                launch(ready.pop(0))
            if not running and not ready:
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        for process, _, _ in running.values():  # SIGTERM: a background job's children ignore SIGINT
            os.killpg(process.pid, signal.SIGTERM)
        for process, _, handle in running.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
            handle.close()
        for name in running:
            ledger.record(by_name[name], status="interrupted")
        raise
    job_seconds = sum(float(ledger.entries.get(j.name, {}).get("seconds", 0.0)) for j in jobs
                      if j.name in finished)
    return {"wall_seconds": time.time() - started, "job_seconds_all_sittings": job_seconds,
            "finished": sorted(finished), "failed": sorted(failed), "blocked": sorted(blocked)}


def main(argv: list[str] | None = None) -> dict:
    cfg = config_from_constants(constants_of(globals()), PRESETS, argv, description=__doc__.splitlines()[0])
    require(cfg["workers"] >= 0, f"--workers: must be >= 0 (0 = the CPU cores), got {cfg['workers']}")
    require(cfg["image_size"] > 0, f"--image_size: must be positive, got {cfg['image_size']}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = cfg["workers"] or max(1, cores // cfg["threads"])
    jobs, runs = plan(cfg)
    require_writable(Path(cfg["data"]), "data")
    if cfg["keep"]:
        require_writable(Path(cfg["keep"]), "keep")
    require(Path(cfg["python"]).is_file() and os.access(cfg["python"], os.X_OK),
            f"--python: {cfg['python']} is not an executable file (the interpreter that runs every job)")
    check_job_flags(jobs)
    out = writable_folder(Path(cfg["out"]), "out")
    keep = writable_folder(Path(cfg["keep"]), "keep") if cfg["keep"] else None
    record_path = out / "experiment.json"
    record = read_record(record_path, "sittings")
    Ledger(out / "jobs.json")  # a damaged ledger stops here, before any job
    print(f"[experiment] {len(runs)} runs, {len(jobs)} jobs, {workers} at a time ({cfg['threads']} torch "
          f"thread{'s' if cfg['threads'] > 1 else ''} each)", flush=True)
    summary = run_jobs(jobs, out, workers, cfg["threads"], keep)
    sittings = record.get("sittings", []) + [{
        "ended": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_seconds": round(summary["wall_seconds"], 1),
        "workers": workers, "threads": cfg["threads"], "finished": len(summary["finished"]),
        "failed": summary["failed"], "blocked": summary["blocked"]}]
    atomic_write_json(record_path, {"config": cfg, "runs": runs, "sittings": sittings,
                                    "wall_seconds_all_sittings": round(sum(s["wall_seconds"] for s in sittings), 1),
                                    "job_seconds_all_sittings": round(summary["job_seconds_all_sittings"], 1)})
    print(f"[experiment] this sitting: {summary['wall_seconds'] / 60:.1f} min wall; the finished jobs took "
          f"{summary['job_seconds_all_sittings'] / 60:.1f} min one after another (all sittings)", flush=True)
    if summary["failed"] or summary["blocked"]:
        raise InputError(f"jobs failed: {', '.join(summary['failed'])}"
                         + (f"; not run because of them: {', '.join(summary['blocked'])}" if summary["blocked"] else "")
                         + f" (logs in {out / 'logs'}; rerun the same command to resume)")
    print(f"[experiment] report: {out / 'combined' / 'report.md'}")
    return summary


if __name__ == "__main__":
    run_main(main, "interrupted: rerun the same command to resume (finished jobs are skipped)")
