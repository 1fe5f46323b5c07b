"""The experiment on Snakemake (statistical_auditing/experiment.py + workflow/Snakefile): correct
reruns, one experiment per folder, no orphans, the design owning each run's identity, and jobs
that run the scripts of their own checkout and say so."""
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_script

EXPERIMENT = REPO / "statistical_auditing" / "experiment.py"
SMOKE = ("--preset", "smoke", "--workers", "2")
CHAIN = {"w2v-jl0": ("train", "audit", "dose", "lipschitz"), "debiased-jl0": ("train", "audit", "lipschitz"),
         "projected-jl0": ("train", "audit", "lipschitz")}


def experiment(*args, cwd=REPO, script=EXPERIMENT, check=True, timeout=900):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=cwd,
                            env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"experiment.py {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def starts(out: Path, job: str) -> list[dict]:
    path = out / "records" / (job.replace("/", "__") + ".json")
    return json.loads(path.read_text())["starts"] if path.is_file() else []


def start_counts(out: Path) -> dict[str, int]:
    return {f"{stage}/{run}": len(starts(out, f"{stage}/{run}")) for run, stages in CHAIN.items()
            for stage in stages} | {"combine": len(starts(out, "combine"))}


def git_head(repo: Path):
    if shutil.which("git") is None or not (repo / ".git").exists():
        return None
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished smoke experiment (three arms, JL seed 0), each run kept, w2v-jl0 with its weights."""
    root = tmp_path_factory.mktemp("workflow")
    out, data, kept = root / "exp", root / "data", root / "kept"
    result = experiment("--out", str(out), "--data", str(data), "--keep", str(kept), "--keep_weights", "w2v-jl0",
                        *SMOKE)
    return {"root": root, "out": out, "data": data, "kept": kept, "stdout": result.stdout}


def copy_experiment(finished, dest: Path) -> Path:
    shutil.copytree(finished["out"], dest, symlinks=True)
    return dest


@pytest.mark.integration
def test_the_chain_runs_through_snakemake_and_records_every_job(finished):
    out = finished["out"]
    assert f"report: {out / 'combined' / 'report.md'}" in finished["stdout"]
    assert (out / "combined" / "report.md").is_file() and (out / "combined" / "runs.csv").is_file()
    head = git_head(REPO)
    for job in start_counts(out):
        (start,) = starts(out, job)
        assert start["status"] == "done" and start["returncode"] == 0 and start["seconds"] >= 0, job
        assert isinstance(start["local_changes"], bool) or head is None, job
        if head is not None:
            assert start["commit"] == head, job
    assert all(json.loads((out / run / "train.done.json").read_text())["starts"] == 1 for run in CHAIN)
    runs = list(csv.DictReader((out / "combined" / "runs.csv").open()))
    assert sorted(r["arm"] for r in runs) == ["debiased", "projected", "w2v"]


@pytest.mark.integration
def test_kept_runs_hold_records_weights_where_asked_and_no_absolute_paths(finished):
    kept = finished["kept"]
    assert sorted(p.name for p in kept.iterdir()) == ["debiased-jl0", "projected-jl0", "w2v-jl0"]
    for run in kept.iterdir():
        files = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
        assert {"config.json", "kept.json", "records.json", "audit/audit.json", "audit/proportions.csv",
                "lipschitz/lipschitz.json", "loss.png", "audit/samples_g1.png"} <= files, run.name
        assert not any(f.endswith(".npy") or f.startswith(("checkpoints/", "samples/")) or "/samples/" in f
                       or f in ("audit/controls.json", "metrics.csv") for f in files), run.name
        weights = {"ema.safetensors", "conditioning.safetensors"} <= files
        assert weights == (run.name == "w2v-jl0"), run.name
        records = json.loads((run / "records.json").read_text())
        assert set(records) == {f"{stage}/{run.name}" for stage in CHAIN[run.name]}
        for path in run.rglob("*"):
            if path.suffix in (".json", ".md", ".csv"):
                text = path.read_text()
                assert str(finished["root"]) not in text and "/tmp/" not in text, path
    # a kept copy is a run for the combine: pooled from the kept folders, the same tables
    in_design_order = [str(kept / name) for name in CHAIN]
    from_kept = finished["root"] / "from-kept"
    run_script("statistical_auditing/combine_audits.py", "--runs", ",".join(in_design_order), "--out",
               str(from_kept), "--n_boot", "50", "--include_failed", "true")
    for name in ("seen.csv", "regressions.csv", "dose_slopes.csv", "lipschitz.csv"):
        assert (from_kept / name).read_text() == (finished["out"] / "combined" / name).read_text(), name


@pytest.mark.integration
def test_a_rerun_with_nothing_changed_redoes_nothing(finished):
    before = start_counts(finished["out"])
    result = experiment("--out", str(finished["out"]), "--data", str(finished["data"]), "--keep",
                        str(finished["kept"]), "--keep_weights", "w2v-jl0", *SMOKE, "--threads", "1")
    assert "Nothing to be done" in result.stdout + result.stderr
    assert start_counts(finished["out"]) == before


@pytest.mark.integration
def test_a_deleted_output_is_rebuilt_in_a_moved_experiment(finished, tmp_path):
    out = copy_experiment(finished, tmp_path / "moved experiment")  # a space in the path, and moved
    shutil.rmtree(out / "combined")
    before = start_counts(out)
    experiment("--out", str(out), "--data", str(finished["data"]), *SMOKE)
    after = start_counts(out)
    assert (out / "combined" / "report.md").is_file()
    assert {job for job in after if after[job] != before[job]} == {"combine"}


@pytest.mark.integration
@pytest.mark.parametrize("flag, value, redone", [
    ("--train_args", "--preset smoke --max_steps 9", {"train", "audit", "dose", "lipschitz", "combine"}),
    ("--audit_args", "--preset smoke --seed 1", {"audit", "dose", "lipschitz", "combine"}),
])
def test_a_changed_flag_redoes_its_jobs_and_everything_after_them(finished, tmp_path, flag, value, redone):
    out = copy_experiment(finished, tmp_path / "exp")
    before = start_counts(out)
    experiment("--out", str(out), "--data", str(finished["data"]), *SMOKE, flag, value)
    after = start_counts(out)
    assert {job.split("/")[0] for job in after if after[job] == before[job] + 1} == redone
    assert all(after[job] in (before[job], before[job] + 1) for job in after)
    if flag == "--train_args":
        assert json.loads((out / "w2v-jl0" / "audit" / "audit.json").read_text())["run_step"] == 9


def make_clone(tmp_path: Path) -> Path:
    """A git checkout of the project's code that the virtual environment does not know."""
    clone = tmp_path / "clone"
    for part in ("bias_begets_bias", "diffusion_from_scratch", "statistical_auditing", "workflow", "data"):
        shutil.copytree(REPO / part, clone / part, ignore=shutil.ignore_patterns("__pycache__", "generated"))
    git = ["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(clone)], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "clone"], check=True)
    return clone


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_changed_script_is_redone_with_its_own_checkouts_code_and_the_record_says_so(finished, tmp_path):
    clone = make_clone(tmp_path)
    script = clone / "statistical_auditing" / "lipschitz.py"
    text = script.read_text()
    assert "\nSEED = 0  #" in text
    marker = ("import statistical_auditing.from_scratch.experiment_stats as _stats; "
              "print('checkout-marker', _stats.__file__, flush=True)\n")
    script.write_text(text.replace("\nSEED = 0  #", "\n" + marker + "SEED = 1  #"))
    out = copy_experiment(finished, tmp_path / "exp")
    before = start_counts(out)
    result = experiment("--out", str(out), "--data", str(finished["data"]), *SMOKE,
                        script=clone / "statistical_auditing" / "experiment.py", cwd=tmp_path)
    after = start_counts(out)
    assert {job.split("/")[0] for job in after if after[job] != before[job]} == {"lipschitz", "combine"}
    # the clone's lipschitz.py ran, and it imported the clone's library modules, not the installed ones
    printed = [line.split(" ", 1)[1] for line in (result.stdout + result.stderr).splitlines()
               if line.startswith("checkout-marker ")]
    assert printed and all(Path(p).resolve() == (clone / "statistical_auditing" / "from_scratch" / "experiment_stats.py").resolve()
                           for p in printed), printed
    latest = starts(out, "lipschitz/w2v-jl0")[-1]
    assert latest["commit"] == git_head(clone) and latest["local_changes"] is True
    assert "statistical_auditing/lipschitz.py" in latest["changed_files"]


@pytest.mark.integration
def test_a_second_experiment_on_the_same_folder_is_refused(finished, tmp_path):
    from statistical_auditing.experiment import FolderLock

    out = copy_experiment(finished, tmp_path / "exp")
    lock = FolderLock(out)  # as if another experiment.py were running there
    try:
        result = experiment("--out", str(out), "--data", str(finished["data"]), *SMOKE, check=False)
    finally:
        lock.handle.close()
    assert result.returncode == 2 and "in use by another experiment.py" in result.stderr
    assert "Traceback" not in result.stderr


def processes_in(folder: Path) -> list[int]:
    """Processes whose working directory is ``folder`` (every job runs in the experiment folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if Path(os.readlink(proc / "cwd")) == folder:
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs /proc")
def test_kill_9_of_the_experiment_leaves_no_orphan_and_the_next_start_resumes(tmp_path):
    out, data = tmp_path / "exp", tmp_path / "data"
    command = [sys.executable, str(EXPERIMENT), "--out", str(out), "--data", str(data), "--preset", "smoke",
               "--workers", "1", "--arms", "w2v",
               "--train_args", "--preset smoke --max_steps 0 --epochs 1000"]  # a training that outlasts the test
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=os.environ | {"OMP_NUM_THREADS": "1"})
    checkpoint = out / "w2v-jl0" / "checkpoints" / "latest"
    deadline = time.time() + 600
    while time.time() < deadline and not checkpoint.exists() and driver.poll() is None:
        time.sleep(0.5)
    assert checkpoint.exists(), "the training never saved a checkpoint"
    assert processes_in(out.resolve()), "no job is running in the experiment folder"
    driver.kill()  # SIGKILL: the experiment gets no chance to clean up
    driver.wait()
    deadline = time.time() + 120
    while time.time() < deadline and processes_in(out.resolve()):
        time.sleep(0.5)
    assert not processes_in(out.resolve()), "a job outlived its experiment"
    (start,) = starts(out, "train/w2v-jl0")
    assert start["status"] != "running"
    # the next start is not blocked by the dead one's lock and would resume the training
    again = experiment(*command[2:], "--dry_run", "true")
    assert "rule train" in again.stdout and "Traceback" not in again.stderr


@pytest.mark.parametrize("args, flag", [
    (["--train_args", "--preset smoke --debias hard"], "--train_args"),
    (["--train_args", "--jl_seed=3"], "--train_args"),
    (["--train_args", "--run_dir elsewhere"], "--train_args"),
    (["--train_args", "--seed 1"], "--train_args"),
    (["--train_args", "--max_steps -1"], "--train_args"),
    (["--audit_args", "--out x"], "--audit_args"),
    (["--combine_args", "--runs a,b"], "--combine_args"),
    (["--lipschitz_args", "--guidance_for_outputs x"], "--lipschitz_args"),
    (["--arms", "w2v,w2v"], "--arms"),
    (["--arms", "w2v,sideways"], "--arms"),
    (["--jl_seeds", "0,0"], "--jl_seeds"),
    (["--train_seeds", "1,1"], "--train_seeds"),
    (["--keep_weights", "w2v-jl9"], "--keep_weights"),
    (["--keep", "{out}"], "--keep"),
    (["--keep", "{out}/kept"], "--keep"),
    (["--data", "{out}/data"], "--data"),
])
def test_flags_that_contradict_the_design_are_refused_before_anything_is_made(tmp_path, args, flag):
    from bias_begets_bias.cli import InputError
    from statistical_auditing import experiment as module

    out = tmp_path / "exp"
    argv = ["--out", str(out), "--data", str(tmp_path / "d"), "--preset", "smoke"]
    argv += [a.replace("{out}", str(out)) for a in args]
    with pytest.raises(InputError, match=flag):
        module.main(argv)
    assert not out.exists()


def test_runs_are_named_by_their_identity_and_the_design_is_crossed():
    from statistical_auditing import experiment as module

    defaults = {k.lower(): v for k, v in vars(module).items() if k.isupper() and isinstance(v, (str, int))}
    runs = module.design(defaults | {"train_seeds": "789,1"})
    assert len(runs) == 18
    assert {r["name"] for r in runs} >= {"w2v-jl0", "debiased-jl2", "projected-jl1-s1", "w2v-jl2-s1"}
    run = next(r for r in runs if r["name"] == "debiased-jl1-s1")
    assert (run["arm"], run["debias"], run["jl_seed"], run["train_seed"]) == ("debiased", "hard", 1, 1)


@pytest.mark.integration
def test_a_relative_out_is_where_the_user_stands(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = experiment("--out", "rel-exp", "--data", "rel-data", *SMOKE, "--dry_run", "true",
                        cwd=elsewhere)
    assert f"runs in {elsewhere / 'rel-exp'}" in result.stdout
    config = json.loads((elsewhere / "rel-exp" / ".workflow" / "config.json").read_text())
    assert config["data"] == str(elsewhere / "rel-data")
    assert not (REPO / "rel-exp").exists()
