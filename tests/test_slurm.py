"""The smoke experiment through SLURM: Snakemake's SLURM executor submits every job to a running cluster.

Heavy (minutes of SLURM polling), and skipped unless SLURM answers on this machine: start the one-node
cluster with `workflow/slurm/setup_single_node.sh` (as root), then
    .venv/bin/python -m pytest tests/test_slurm.py -m heavy -q
It writes under pytest's temporary folder, so on a multi-node cluster run it where that folder is
on the filesystem the compute nodes share.
"""
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO, run_script

PROFILE = REPO / "workflow" / "profiles" / "slurm_single_node"
# Snakemake's SLURM executor logs each submission as
# "Job 3 has been submitted with SLURM jobid 17 (log: ...)".
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+)")


def _slurm_running() -> bool:
    """slurmctld answers and at least one node can take jobs."""
    if shutil.which("scontrol") is None or shutil.which("sinfo") is None:
        return False
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "is UP" in ping.stdout and any(s.rstrip("*~#") in ("idle", "mixed") for s in states.stdout.split())


pytestmark = [pytest.mark.heavy,
              pytest.mark.skipif(not _slurm_running(), reason="no SLURM cluster answers here "
                                 "(start one with workflow/slurm/setup_single_node.sh)")]


def test_smoke_experiment_runs_as_slurm_jobs(tmp_path):
    out, data = tmp_path / "exp", tmp_path / "exp-data"
    result = run_script("statistical_auditing/experiment.py", "--preset", "smoke", "--out", str(out),
                        "--data", str(data), "--executor", "slurm",
                        "--snakemake_args", f"--profile {PROFILE}",
                        timeout=3600, check=False, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"experiment.py failed ({result.returncode}):\n{result.stderr[-4000:]}"
    report = out / "combined" / "report.md"
    assert report.is_file() and report.stat().st_size > 0

    # The SLURM job ids, from what Snakemake printed and from its log files in <out>/.snakemake/log.
    logs = result.stdout + result.stderr + "".join(
        path.read_text(errors="replace") for path in sorted((out / ".snakemake" / "log").glob("*.log")))
    job_ids = sorted(set(SUBMITTED.findall(logs)), key=int)
    assert job_ids, "Snakemake submitted no SLURM job"

    # slurmctld itself must know each of them as a finished job of this experiment (the setup keeps
    # finished jobs visible for MinJobAge = 3600 s); the plugin puts the rule's name in the comment.
    listing = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%k|%Z"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    jobs = {job_id: (state, comment, workdir) for job_id, state, comment, workdir
            in (line.split("|") for line in listing.splitlines())}
    assert sorted(jobs, key=int) == job_ids, f"squeue does not list every submitted job:\n{listing}"
    for job_id, (state, comment, workdir) in jobs.items():
        assert state == "COMPLETED", f"SLURM job {job_id} ({comment}) ended {state}"
        assert os.path.realpath(workdir) == os.path.realpath(out), f"SLURM job {job_id} ran in {workdir}"

    # Every run of the design was trained, audited and measured in a SLURM job of its own, and the
    # combined report came from one too.
    runs = json.loads((out / ".workflow" / "config.json").read_text())["runs"]
    rules = [comment.split("_wildcards_")[0] for _, comment, _ in jobs.values()]
    for rule in ("train", "audit", "lipschitz"):
        assert rules.count(f"rule_{rule}") == len(runs), f"{rule}: {rules.count(f'rule_{rule}')} SLURM jobs, " \
                                                        f"{len(runs)} runs"
    assert rules.count("rule_combine") == 1 and rules.count("rule_data") == 1

    # From the inside: each script's record (workflow/job.py) names the SLURM job it ran in.
    records = sorted((out / "records").glob("*.json"))
    assert len(records) == len(job_ids)
    for path in records:
        last = json.loads(path.read_text())["starts"][-1]
        assert last["slurm_job_id"] in jobs and last["status"] == "done", f"{path.name}: {last}"
