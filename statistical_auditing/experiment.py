"""The full experiment: embedding arms x JL seeds x training seeds, each run trained, audited,
dose-response'd and measured for Lipschitz ratios, then one combined report, on Snakemake.
`make experiment` runs this.

    python statistical_auditing/experiment.py --out runs/experiment
    python statistical_auditing/experiment.py --out /tmp/exp --data /tmp/exp-data --preset smoke   # a minute
    python statistical_auditing/experiment.py --out runs/experiment --executor slurm   # on a SLURM cluster

Arms (the conditioning the model is trained with; see word_vectors.DEBIAS_MODES):
- w2v: the word2vec vectors as they are, JL-projected (the paper's model);
- debiased: hard-debiased (Bolukbasi et al. 2016) BEFORE the projection (the paper's control);
- projected: the same neutralise/equalise AFTER the projection, in the 128-d space the model
  actually sees, with the gender direction of the projected definitional pairs.

A run is (arm, JL seed, training seed), in the folder <out>/<arm>-jl<JL seed> for the default
training seed (789, the original's) and <out>/<arm>-jl<JL seed>-s<training seed> for others.
Its identity belongs to the design: flags in --train_args and the like that would change it
(--debias, --jl_seed, --seed, --run_dir, ...) are refused; the other flags are the recipe.

This script checks the design and every job's flags, writes <out>/.workflow/config.json and
runs workflow/Snakefile with Snakemake in <out>. Snakemake redoes whatever depends on a changed
input, flag or script (the scripts and the project modules they import enter by content, so
a fresh clone of the same commit resumes instead of redoing), checks each job's outputs,
redoes incomplete ones, and runs independent jobs side by side: --workers at a time with
--threads torch threads each (default: the CPU cores, one thread each; two 1-thread
trainings on two cores give the throughput of one 2-thread training on an idle machine, and
a 2-thread process collapses as soon as anything else runs beside it). --executor slurm runs
the same jobs on a SLURM cluster (workflow/slurm/README.md).

Every job is resumable (training from its checkpoints, the scripts from their caches) and
runs the scripts of THIS checkout with --python (workflow/job.py), recording each start in
<out>/records/<job>.json: the checkout's commit and whether it had local changes, host,
threads, times. One experiment.py at a time per --out (a second one is refused); if this
process is killed, its jobs stop instead of running on as orphans, and the next start
clears the stale lock and resumes. <out>/experiment.json records each sitting.
--keep DIR copies each finished run to DIR/<run> (statistical_auditing/keep_run.py: small
outputs, records, and the EMA weights of the --keep_weights runs), ready to commit;
combine_audits.py --runs DIR/<run>,... builds the combined report from them, and
audit.py --run DIR/<run> re-audits a kept run that has its weights.
"""
from __future__ import annotations

import sys
from pathlib import Path

# The modules of THIS checkout, even where the virtual environment has another one installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ctypes  # noqa: E402
import fcntl  # noqa: E402
import importlib  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402

from bias_begets_bias.cli import (InputError, config_from_constants, constants_of,  # noqa: E402
                                        parse_number_list, require, run_main)
from bias_begets_bias.utils import (REPO_ROOT, atomic_write_json, load_json, require_writable,  # noqa: E402
                                          writable_folder)
from bias_begets_bias.word_vectors import ARM_DEBIAS  # noqa: E402

# ----------------------------------------------------------------------------- config
OUT = "runs/experiment"  # experiment folder: one folder per run, records/, combined/, .snakemake/ (Snakemake's state)
DATA = "data/generated/portraits"  # dataset root (made by synthetic_data.py when incomplete)
ARMS = "w2v,debiased,projected"  # comma-separated arms: w2v | debiased | projected
JL_SEEDS = "0,1,2"  # list of ints in [0, 2**32): comma-separated JL projection seeds
TRAIN_SEEDS = "789"  # list of ints in [0, 2**63): comma-separated training seeds (initialisation, data order, noise)
DOSE_ARMS = "w2v"  # arms whose runs also get the dose-response (empty = none)
WORKERS = 0  # [0, inf) jobs run side by side (0 = the CPU cores divided by --threads; with --executor: 0 = 100)
THREADS = 1  # [1, inf) torch threads of each job (more than 1 only pays when fewer jobs than cores are left)
DATA_ARGS = ""  # extra flags for synthetic_data.py
TRAIN_ARGS = ""  # extra flags for every training (after --preset tiny): the recipe
AUDIT_ARGS = ""  # extra flags for every audit
DOSE_ARGS = ""  # extra flags for every dose-response
LIPSCHITZ_ARGS = ""  # extra flags for every Lipschitz measurement
COMBINE_ARGS = ""  # extra flags for combine_audits.py
IMAGE_SIZE = 32  # [1, inf) the dataset size folder the runs train on
AUDIT_NOISE = "common"  # common (every run's audit draws from the audit's --seed) | per_run (a seed derived from the run's name: runs draw independent noise)
KEEP = ""  # folder that receives a copy of each finished run, to commit or archive (empty = none)
KEEP_WEIGHTS = "all"  # runs whose EMA weights --keep copies: all | none | comma-separated run names
EXECUTOR = "local"  # Snakemake executor: local | slurm (or any installed executor plugin)
DRY_RUN = False  # only show which jobs would run and why (Snakemake's --dry-run); runs nothing
SNAKEMAKE_ARGS = ""  # extra flags for Snakemake, e.g. --snakemake_args="--profile workflow/profiles/slurm"
PYTHON = sys.executable  # the interpreter that runs every job

CHOICES = {"audit_noise": ("common", "per_run")}
PRESETS = {
    # a minute: the whole chain on a tiny dataset with the smoke presets of every script
    "smoke": dict(data_args="--per_class 10 --sizes 32 --test_fraction 0.2", jl_seeds="0",
                  train_args="--preset smoke", audit_args="--preset smoke", dose_args="--preset smoke",
                  lipschitz_args="--preset smoke", combine_args="--n_boot 50 --include_failed true"),
}
SNAKEFILE = REPO_ROOT / "workflow" / "Snakefile"
# What each stage's flags may not set: the run's identity and files belong to the design
STAGES = {  # flag holding the pass-through args -> (script, fixed flags, flags the design owns)
    "data_args": ("diffusion_from_scratch/synthetic_data.py", ["--source", "procedural"], ("out", "source")),
    "train_args": ("diffusion_from_scratch/ddpm_conditional.py", ["--preset", "tiny"],
                   ("debias", "jl_seed", "seed", "run_dir", "dataset_path", "resume", "num_threads", "image_size")),
    "audit_args": ("statistical_auditing/audit.py", [], ("run", "out", "num_threads", "dataset_path")),
    "dose_args": ("statistical_auditing/dose_response.py", [], ("run", "out", "num_threads")),
    "lipschitz_args": ("statistical_auditing/lipschitz.py", [], ("run", "out", "num_threads")),
    "combine_args": ("statistical_auditing/combine_audits.py", [], ("runs", "out")),
}


def split_args(text: str, flag: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as error:
        raise InputError(f"--{flag}: cannot split {text!r} into flags ({error})") from None


def names(text: str, flag: str, allowed: tuple[str, ...] | dict | None = None) -> list[str]:
    """A comma-separated list of distinct names (each in ``allowed`` if given)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if allowed is not None and item not in allowed]
    require(not unknown, f"--{flag}: expected a comma-separated subset of {', '.join(allowed or ())}, got {text!r}")
    duplicates = sorted({item for item in items if items.count(item) > 1})
    require(not duplicates, f"--{flag}: {', '.join(duplicates)} listed twice in {text!r}")
    return items


def run_name(arm: str, jl_seed: int, train_seed: int, default_train_seed: int = 789) -> str:
    """<arm>-jl<JL seed>, and -s<training seed> unless it is ddpm_conditional's default (the
    original's 789), so that the committed runs keep their names."""
    return f"{arm}-jl{jl_seed}" + ("" if train_seed == default_train_seed else f"-s{train_seed}")


def audit_seed(name: str) -> int:
    """The audit's sampling seed of a run under --audit_noise per_run: a CRC-32 of the run's name,
    the same on every machine and in every sitting, and different between runs."""
    return zlib.crc32(name.encode())


def design(cfg: dict) -> list[dict]:
    """The runs: every arm x JL seed x training seed, seed-major (a partial experiment has every
    arm of its first seeds)."""
    arms = names(cfg["arms"], "arms", ARM_DEBIAS)
    require(bool(arms), "--arms: expected at least one arm")
    names(cfg["dose_arms"], "dose_arms", ARM_DEBIAS)
    jl_seeds = parse_number_list(cfg["jl_seeds"], "jl_seeds", int)
    train_seeds = parse_number_list(cfg["train_seeds"], "train_seeds", int)
    for flag, seeds in (("jl_seeds", jl_seeds), ("train_seeds", train_seeds)):
        require(len(set(seeds)) == len(seeds), f"--{flag}: expected distinct integers, got {cfg[flag]!r}")
    runs = [{"name": run_name(arm, jl, seed), "arm": arm, "debias": ARM_DEBIAS[arm], "jl_seed": jl,
             "train_seed": seed} for seed in train_seeds for jl in jl_seeds for arm in arms]
    for run in runs:  # [] = the audit's own --seed (or the one in --audit_args)
        run["audit_seed"] = [audit_seed(run["name"])] if cfg["audit_noise"] == "per_run" else []
    return runs


def stage_args(cfg: dict) -> dict[str, list[str]]:
    """Each stage's pass-through flags, refused where they would set what the design owns, and
    parsed with the script's own flags and declared ranges so a bad value stops here, before
    any job starts."""
    parsed = {}
    for key, (script, fixed, owned) in STAGES.items():
        args = split_args(cfg[key], key)
        if key == "audit_args" and cfg["audit_noise"] == "per_run":
            owned = owned + ("seed",)
        for arg in args:
            flag = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
            require(flag not in owned, f"--{key}: --{flag} is set by the experiment's design, not by a stage's flags "
                                       f"(use the experiment's own flags: --arms, --jl_seeds, --train_seeds, --out, "
                                       f"--data, --image_size, --threads)")
        module = importlib.import_module(script[:-3].replace("/", "."))
        try:
            config_from_constants(constants_of(vars(module)), getattr(module, "PRESETS", None), fixed + args,
                                  choices=getattr(module, "CHOICES", None))
        except InputError as error:
            raise InputError(f"--{key}: {Path(script).name} {error}") from None
        parsed[key] = args
    return parsed


def check_places(out: Path, data: Path, keep: Path | None) -> None:
    """--out, --data and --keep must not lie in one another (a kept copy inside the experiment
    would be taken for a run; an experiment inside the kept folder would be committed)."""
    places = {"out": out, "data": data} | ({"keep": keep} if keep else {})
    for flag, path in places.items():
        for other, other_path in places.items():
            if flag != other and (path == other_path or other_path in path.parents):
                raise InputError(f"--{flag}: {path} is {'the same folder as' if path == other_path else 'inside'} "
                                 f"--{other} {other_path}; give each its own folder")


def check_records(out: Path) -> None:
    """The records this script and its jobs keep in --out must be readable before anything runs
    (a damaged one stops here, named, and is left as it is for its owner to move away)."""
    expected = [(out / "experiment.json", "sittings")] + [(path, "starts") for path in
                                                         sorted((out / "records").glob("*.json"))]
    for path, key in expected:
        if path.is_file():
            record = load_json(path)
            if not isinstance(record, dict) or not isinstance(record.get(key, []), list):
                raise InputError(f"{path}: expected the JSON object the experiment writes (with a list {key!r}); "
                                 f"move it away to start its record afresh")


def keep_weights(cfg: dict, runs: list[dict]) -> list[str]:
    every = [run["name"] for run in runs]
    if cfg["keep_weights"] in ("all", "none"):
        return every if cfg["keep_weights"] == "all" else []
    return names(cfg["keep_weights"], "keep_weights", tuple(every))


class FolderLock:
    """An exclusive lock on <out> held for the life of this process (the kernel drops it when
    the process dies, even by SIGKILL), so that a second experiment.py on the same folder is
    refused and a lock left by a killed one is known to be stale."""

    def __init__(self, out: Path):
        self.path = out / ".workflow" / "lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            raise InputError(f"--out: {out} is in use by another experiment.py ({holder}); wait for it or stop it "
                             f"first") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.handle.flush()


def _die_with_parent() -> None:  # in Snakemake's process before exec: SIGTERM when this one dies
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def snakemake_command(cfg: dict, out: Path, config_path: Path, workers: int) -> list[str]:
    command = [cfg["python"], "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(out),
               "--configfile", str(config_path), "--rerun-incomplete", "--keep-going", "--printshellcmds"]
    if cfg["executor"] == "local":
        command += ["--cores", str(workers * cfg["threads"])]
    else:
        command += ["--executor", cfg["executor"], "--jobs", str(workers)]
    return command + (["--dry-run"] if cfg["dry_run"] else []) + split_args(cfg["snakemake_args"], "snakemake_args")


def run_snakemake(command: list[str], env: dict) -> int:
    """Run Snakemake to its end; SIGINT/SIGTERM to this process are passed on, so Snakemake stops
    its jobs, marks their outputs incomplete and releases its lock."""
    process = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)
    previous = {s: signal.signal(s, lambda signum, _f: process.send_signal(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def checkout_state() -> dict:
    sys.path.insert(0, str(REPO_ROOT / "workflow"))
    from job import checkout_state as state  # workflow/job.py: the same record the jobs write

    return state(REPO_ROOT)


def jobs_seconds(out: Path) -> float:
    """The sum of every job start's recorded seconds (what the jobs cost one after another)."""
    total = 0.0
    for path in sorted((out / "records").glob("*.json")):
        try:
            total += sum(float(start.get("seconds", 0.0)) for start in load_json(path).get("starts", []))
        except (InputError, AttributeError, TypeError, ValueError):
            continue
    return total


def main(argv: list[str] | None = None) -> dict:
    cfg = config_from_constants(constants_of(globals()), PRESETS, argv, description=__doc__.splitlines()[0],
                                choices=CHOICES)
    require(cfg["image_size"] > 0, f"--image_size: must be positive, got {cfg['image_size']}")
    require(Path(cfg["python"]).is_file() and os.access(cfg["python"], os.X_OK),
            f"--python: {cfg['python']} is not an executable file (the interpreter that runs every job)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = cfg["workers"] or (max(1, cores // cfg["threads"]) if cfg["executor"] == "local" else 100)
    runs = design(cfg)
    args = stage_args(cfg)
    out, data = Path(cfg["out"]).resolve(), Path(cfg["data"]).resolve()  # relative to where the user stands
    keep = Path(cfg["keep"]).resolve() if cfg["keep"] else None
    check_places(out, data, keep)
    for flag, path in (("data", data), ("keep", keep)):
        if path is not None:
            require_writable(path, flag)
    workflow_config = {"python": cfg["python"], "data": str(data), "image_size": cfg["image_size"], "runs": runs,
                       "dose_arms": names(cfg["dose_arms"], "dose_arms", ARM_DEBIAS), "threads": cfg["threads"],
                       "keep": str(keep) if keep else "", "keep_weights": keep_weights(cfg, runs)} | args
    check_records(out)
    writable_folder(out, "out")  # the first thing made: every check above has passed
    lock = FolderLock(out)  # noqa: F841 (held until this process ends)
    config_path = out / ".workflow" / "config.json"
    atomic_write_json(config_path, workflow_config)
    command = snakemake_command(cfg, out, config_path, workers)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    if cfg["executor"] == "local":  # jobs on this machine stop if this process is gone
        env |= {"BBB_ORCHESTRATOR_PID": str(os.getpid()),
                "BBB_ORCHESTRATOR_STARTED": Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
                if Path(f"/proc/{os.getpid()}/stat").exists() else ""}
    if any((out / ".snakemake" / "locks").glob("*")):  # we hold the folder: a Snakemake lock there is stale
        subprocess.run(command + ["--unlock"], env=env, capture_output=True, check=False)
    print(f"[experiment] {len(runs)} runs in {out}; {workers} jobs at a time ({cfg['threads']} torch "
          f"thread{'s' if cfg['threads'] > 1 else ''} each, executor {cfg['executor']})", flush=True)
    print(f"[experiment] {shlex.join(command)}", flush=True)
    started, began = time.strftime("%Y-%m-%d %H:%M:%S"), time.time()
    code = run_snakemake(command, env)
    record_path = out / "experiment.json"
    record = load_json(record_path) if record_path.is_file() else {}
    sittings = (record.get("sittings", []) if isinstance(record, dict) else []) + [
        {"started": started, "ended": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_seconds": round(time.time() - began, 1),
         "exit": code, "workers": workers, "threads": cfg["threads"], "executor": cfg["executor"],
         **{k: v for k, v in checkout_state().items() if k in ("commit", "local_changes")}}]
    summary = {"runs": [run["name"] for run in runs], "sittings": sittings,
               "wall_seconds_all_sittings": round(sum(s["wall_seconds"] for s in sittings), 1),
               "job_seconds_all_starts": round(jobs_seconds(out), 1)}
    atomic_write_json(record_path, summary)
    print(f"[experiment] this sitting: {sittings[-1]['wall_seconds'] / 60:.1f} min wall; the jobs' recorded starts "
          f"took {summary['job_seconds_all_starts'] / 60:.1f} min one after another", flush=True)
    if code != 0:
        raise InputError(f"the workflow stopped (exit {code}): the failed jobs are named above, their records in "
                         f"{out / 'records'}; rerun the same command to resume")
    if "--dry-run" not in command and "-n" not in command:
        print(f"[experiment] report: {out / 'combined' / 'report.md'}")
    return summary


if __name__ == "__main__":
    run_main(main, "interrupted: rerun the same command to resume (finished jobs are not redone)")
