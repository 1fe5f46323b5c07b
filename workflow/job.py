"""Run one script of the experiment as a workflow job, and record where it came from.

    python workflow/job.py --job audit/w2v-jl0 --records records [--stamp F] [--threads N] -- \
        statistical_auditing/audit.py --run w2v-jl0

The script is the one of THIS checkout (the folder above workflow/), run by this interpreter
with this checkout first on PYTHONPATH, so an editable install of another checkout in the
virtual environment cannot substitute its modules. Every start of the job is appended to
<records>/<job>.json: the checkout's commit and whether it had local changes, host, CPU,
threads, start, end, seconds and exit status (a start with no end was killed outright). A
successful job writes --stamp (the workflow's proof that a job without a natural final file,
the training, finished).

A job stops its script when the job itself is stopped (SIGTERM/SIGINT are passed on; if
this wrapper is killed outright the kernel sends the script SIGTERM) and when the process
that started the experiment (BBB_ORCHESTRATOR_PID) is gone, so that no training runs on as
an orphan after a `kill -9` of the experiment. Standard library only.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POLL_SECONDS = 2.0  # how often a running job checks that the experiment's process is alive
GRACE_SECONDS = 60.0  # how long a stopped script may take to write its checkpoint before SIGKILL


def atomic_write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def checkout_state(repo: Path = REPO) -> dict:
    """The commit of ``repo`` and its local changes (tracked files modified, untracked files
    not ignored): what a record needs to say which code ran."""
    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    if commit is None or status is None:
        return {"commit": None, "local_changes": None, "changed_files": [], "note": "not a git checkout"}
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit.strip(), "local_changes": bool(changed), "changed_files": changed[:50]}


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (so a recycled pid is not taken for the original)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def orchestrator_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started is None or process_start_time(pid) == started


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def cpu_name() -> str:
    """The CPU model, as bias_begets_bias.utils.cpu_name gives it: written again here because
    this wrapper starts before every job and must not import the project (torch) to record it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--job", required=True, help="job name, e.g. train/w2v-jl0")
    parser.add_argument("--records", required=True, type=Path, help="folder of the job records")
    parser.add_argument("--stamp", type=Path, help="file written when the job succeeds")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of the script")
    parser.add_argument("script", help="the script, relative to the checkout")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    opts = parser.parse_args(argv)
    script = REPO / opts.script
    if not script.is_file():
        print(f"job {opts.job}: {script} does not exist in the checkout {REPO}", file=sys.stderr)
        return 2
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args

    record_path = opts.records / (opts.job.replace("/", "__") + ".json")
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    starts = record.get("starts", [])
    for start in starts:  # a start that never recorded its end was killed outright (SIGKILL, power loss)
        if start.get("status") == "running":
            start["status"] = "killed (no end recorded)"
    start = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "status": "running", **checkout_state(),
             "host": socket.gethostname(), "cpu": f"{cpu_name()}, {os.cpu_count()} cores", "threads": opts.threads,
             "python": platform.python_version(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    starts.append(start)
    record = {"job": opts.job, "script": opts.script, "args": args, "starts": starts}
    atomic_write_json(record_path, record)

    threads = str(opts.threads)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                        "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    orchestrator = int(os.environ.get("BBB_ORCHESTRATOR_PID", "0") or 0)
    orchestrator_started = os.environ.get("BBB_ORCHESTRATOR_STARTED") or None
    began = time.time()
    child = subprocess.Popen([sys.executable, str(script), *args], env=env, preexec_fn=_die_with_parent)
    stopped_by: list[str] = []

    def stop(reason: str) -> None:
        if not stopped_by:
            stopped_by.append(reason)
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda s, _f: stop(f"signal {signal.Signals(s).name}"))
    deadline = None
    while True:
        try:
            code = child.wait(timeout=POLL_SECONDS)
            break
        except subprocess.TimeoutExpired:
            pass
        if orchestrator and not stopped_by and not orchestrator_alive(orchestrator, orchestrator_started):
            print(f"job {opts.job}: the experiment's process {orchestrator} is gone; stopping the script",
                  file=sys.stderr, flush=True)
            stop("orphaned (the experiment's process was gone)")
        if stopped_by and deadline is None:
            deadline = time.time() + GRACE_SECONDS
        if deadline is not None and time.time() > deadline and child.poll() is None:
            child.kill()
    seconds = round(time.time() - began, 1)
    status = "done" if code == 0 and not stopped_by else (stopped_by[0] if stopped_by else "failed")
    start.update(ended=time.strftime("%Y-%m-%d %H:%M:%S"), seconds=seconds, returncode=code, status=status)
    atomic_write_json(record_path, record)
    if status == "done" and opts.stamp is not None:
        atomic_write_json(opts.stamp, {"job": opts.job, "commit": start["commit"],
                                       "local_changes": start["local_changes"], "seconds": seconds,
                                       "seconds_all_starts": round(sum(s.get("seconds", 0.0) for s in starts), 1),
                                       "starts": len(starts)})
    return 0 if status == "done" else (code if code not in (0, None) else 1)


if __name__ == "__main__":
    sys.exit(main())
