"""The experiment's scripts end to end on a smoke run, and the whole `make experiment` chain in seconds."""
import csv
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, run_script


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _dangling_image_links(folder):
    """(report, target) for each markdown image link under ``folder`` whose local file is missing."""
    from statistical_auditing.experiment import IMAGE_LINK

    return [(report.as_posix(), target) for report in sorted(folder.rglob("*.md"))
            for _, target in IMAGE_LINK.findall(report.read_text())
            if "://" not in target and not (report.parent / target).is_file()]


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory, smoke_run):
    """A copy of the session's smoke run, audited with the smoke preset."""
    run = tmp_path_factory.mktemp("audited") / "run"
    shutil.copytree(smoke_run, run)
    run_script("statistical_auditing/audit.py", "--run", str(run), "--preset", "smoke", "--num_threads", "1")
    return run


@pytest.mark.smoke
def test_audit_writes_seed_level_shares_and_scene_columns(audited_run):
    audit = audited_run / "audit"
    summary = json.loads((audit / "audit.json").read_text())
    seeds = _rows(audit / "seeds.csv")
    # smoke preset: 2 seeds x 2 images per training word, scale and method
    words = {r["word"] for r in seeds}
    assert words == set(summary["seen"]) and {r["seed_index"] for r in seeds} == {"0", "1"}
    proportions = _rows(audit / "proportions.csv")
    seen_attribute = [r for r in proportions if r["seen"] == "True" and r["method"] == "attribute"]
    for row in seen_attribute:  # pooled counts are the sums of the seeds' counts
        parts = [s for s in seeds if (s["word"], s["guidance"], s["method"]) == (row["word"], row["guidance"],
                                                                                  "attribute")]
        assert int(row["n"]) == sum(int(s["n"]) for s in parts)
        assert int(row["successes"]) == sum(int(s["successes"]) for s in parts)
        scenes = [float(row[f"scene_{s}"]) for s in ("neutral", "hospital", "library", "unclear")]
        assert sum(scenes) == pytest.approx(1.0)
    controls = _rows(audit / "controls.csv")
    assert sum(r["chosen"] == "True" for r in controls) == 1
    # the selection and report halves are disjoint and together hold every test image (12 in the smoke preset)
    assert all(int(r["selection_n"]) + int(r["report_n"]) == 12 for r in controls)


@pytest.mark.smoke
def test_rerun_with_other_settings_leaves_no_stale_files(audited_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(audited_run, run)
    stale = run / "audit" / "regression_g3_scoredecomp_cosine_gap_jl.png"
    stale.write_bytes(b"old")
    run_script("statistical_auditing/audit.py", "--run", str(run), "--preset", "smoke", "--guidance", "1",
               "--num_threads", "1")
    assert not stale.exists()
    assert {r["guidance"] for r in _rows(run / "audit" / "proportions.csv")} == {"1"}


@pytest.mark.smoke
def test_dose_response_and_lipschitz_on_an_audited_run(audited_run):
    run_script("statistical_auditing/dose_response.py", "--run", str(audited_run), "--preset", "smoke",
               "--num_threads", "1")
    points = _rows(audited_run / "dose_response" / "dose_response.csv")
    words = {p["word"] for p in points}
    assert "person" in words and len(words) == 2  # person + 1 profession in the smoke preset
    assert {float(p["alpha"]) for p in points} == {-0.4, 0.0, 0.4}
    assert {p["space"] for p in points} == {"embedding", "projected"}
    person = [p for p in points if p["word"] == "person" and p["space"] == "embedding" and p["method"] == "attribute"]
    gaps = [float(p["gap_before"]) for p in sorted(person, key=lambda p: float(p["alpha"]))]
    assert gaps[0] < gaps[1] < gaps[2]  # moving along the gender direction raises the gap
    assert (audited_run / "dose_response" / "dose_response.png").read_bytes()[:4] == b"\x89PNG"

    run_script("statistical_auditing/lipschitz.py", "--run", str(audited_run), "--preset", "smoke",
               "--num_threads", "1")
    summary = json.loads((audited_run / "lipschitz" / "lipschitz.json").read_text())
    assert [r["t"] for r in summary["per_timestep"]] == [100, 500, 900]
    assert all(0 <= r["median"] <= r["max"] for r in summary["per_timestep"])
    pairs = _rows(audited_run / "lipschitz" / "pairs.csv")
    n_vectors = summary["n_vectors"]
    assert len(pairs) == n_vectors * (n_vectors - 1) // 2
    labels = {p["y1"] for p in pairs} | {p["y2"] for p in pairs}
    # the alpha = 0 point is person itself (up to rounding): one vector, never a pair at distance ~0
    assert "person" in labels and "person-0.4" in labels and "person+0" not in labels
    assert min(float(p["distance"]) for p in pairs) > 1e-3


@pytest.mark.smoke
def test_experiment_smoke_runs_the_whole_chain_and_resumes(tmp_path):
    out, data = tmp_path / "exp", tmp_path / "data"
    args = ("--out", str(out), "--data", str(data), "--preset", "smoke", "--workers", "2",
            "--keep", str(tmp_path / "kept"))
    first = run_script("statistical_auditing/experiment.py", *args, timeout=900)
    assert "report:" in first.stdout
    # --keep: every run's small outputs, no weights or sample arrays, and enough for the combined report
    kept = sorted((tmp_path / "kept").iterdir())
    assert [k.name for k in kept] == ["debiased-jl0", "projected-jl0", "w2v-jl0"]
    for run in kept:
        files = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
        assert {"config.json", "audit/audit.json", "audit/proportions.csv", "lipschitz/lipschitz.json",
                "jobs.json", "loss.png", "audit/samples_g1.png"} <= files, run.name
        assert not any(f.endswith((".safetensors", ".npy")) or "/samples/" in f or f.startswith("checkpoints/")
                       or f in ("audit/controls.json", "metrics.csv") for f in files), run.name
        record = json.loads((run / "jobs.json").read_text())
        stages = ("train", "audit", "lipschitz") + (("dose",) if run.name.startswith("w2v") else ())
        assert set(record["jobs"]) == {f"{stage}/{run.name}" for stage in stages}
        assert all(entry["status"] == "done" for entry in record["jobs"].values()) and record["machine"]
    assert (tmp_path / "kept" / "w2v-jl0" / "dose_response" / "slopes.csv").is_file()
    assert not _dangling_image_links(tmp_path / "kept")  # the plots left behind are named, not broken links
    assert "not kept in this copy" in (tmp_path / "kept" / "w2v-jl0" / "audit" / "report.md").read_text()
    in_plan_order = [str(tmp_path / "kept" / name) for name in ("w2v-jl0", "debiased-jl0", "projected-jl0")]
    run_script("statistical_auditing/combine_audits.py", "--runs", ",".join(in_plan_order), "--out",
               str(tmp_path / "from-kept"), "--n_boot", "50", "--include_failed", "true")
    for name in ("seen.csv", "regressions.csv", "dose_slopes.csv", "lipschitz.csv"):
        assert (tmp_path / "from-kept" / name).read_text() == (out / "combined" / name).read_text(), name
    jobs = json.loads((out / "jobs.json").read_text())["jobs"]
    assert all(entry["status"] == "done" for entry in jobs.values())
    assert {name.split("/")[0] for name in jobs} == {"data", "train", "audit", "dose", "lipschitz", "combine"}
    runs = _rows(out / "combined" / "runs.csv")
    assert sorted(r["arm"] for r in runs) == ["debiased", "projected", "w2v"]
    regressions = _rows(out / "combined" / "regressions.csv")
    # hard-debiasing zeroes every gap before the projection: that regression must be undefined, never a slope
    before = [r for r in regressions if r["arm"] == "debiased" and r["x"] == "cosine_gap" and r["level"] == "arm"]
    assert before and all(r["defined"] == "False" and r["slope"] == "" for r in before)
    projected_after = [r for r in regressions if r["arm"] == "projected" and r["x"] == "cosine_gap_jl"]
    assert projected_after and all(r["defined"] == "False" for r in projected_after)
    shifts = _rows(out / "combined" / "jl_shift_summary.csv")
    assert {int(r["jl_dim"]) for r in shifts} == {64, 128, 256}
    record = json.loads((out / "experiment.json").read_text())
    assert record["job_seconds_all_sittings"] > 0 and len(record["sittings"]) == 1
    second = run_script("statistical_auditing/experiment.py", *args, timeout=900)
    assert "already done" in second.stdout and "start " not in second.stdout


@pytest.mark.smoke
def test_a_background_experiment_stops_on_sigterm_and_takes_its_running_job_with_it(tmp_path):
    out, data = tmp_path / "exp", tmp_path / "data"
    command = [sys.executable, str(REPO / "statistical_auditing/experiment.py"), "--out", str(out), "--data",
               str(data), "--preset", "smoke", "--workers", "1", "--arms", "w2v",
               "--train_args", "--preset smoke --max_steps 0 --epochs 1000"]  # a training that outlasts the test
    # `cmd &` in a script starts the job with SIGINT ignored: only SIGTERM can stop it
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    train_log = out / "logs" / "train__w2v-jl0.log"
    deadline = time.time() + 300
    while time.time() < deadline and not (train_log.exists() and "step" in train_log.read_text()):
        time.sleep(0.5)
    assert train_log.exists() and "step" in train_log.read_text(), "the training never started"
    driver.send_signal(signal.SIGTERM)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 130 and "rerun" in stderr
    jobs = json.loads((out / "jobs.json").read_text())["jobs"]
    assert jobs["train/w2v-jl0"]["status"] == "interrupted"
    left = subprocess.run(["pgrep", "-f", str(out / "w2v-jl0")], capture_output=True, text=True).stdout.split()
    assert not left, f"the training outlived its driver: {left}"


def test_experiment_plan_is_the_full_design():
    from statistical_auditing import experiment

    defaults = {k.lower(): v for k, v in vars(experiment).items() if k.isupper() and isinstance(v, (str, int))}
    jobs, runs = experiment.plan({**defaults, "out": "/x", "data": "/d"})
    assert len(runs) == 9 and sorted({r.split("/")[-1].split("-")[0] for r in runs}) == ["debiased", "projected",
                                                                                          "w2v"]
    names = [j.name for j in jobs]
    assert names.count("combine") == 1 and sum(n.startswith("train/") for n in names) == 9
    assert sum(n.startswith("dose/") for n in names) == 3  # the w2v arm only, by default
    train = next(j for j in jobs if j.name == "train/debiased-jl1")
    assert train.command[train.command.index("--debias") + 1] == "hard"
    assert train.command[train.command.index("--jl_seed") + 1] == "1"
    assert "--num_threads" in train.command and train.command[train.command.index("--num_threads") + 1] == "1"
    jobs, _ = experiment.plan({**defaults, "out": "/x", "data": "/d", "threads": 2})
    torch_jobs = [j for j in jobs if j.name not in ("data", "combine")]
    assert len(torch_jobs) == 9 + 9 + 3 + 9
    for job in torch_jobs:
        assert job.command[job.command.index("--num_threads") + 1] == "2", job.name


def test_a_finished_job_is_skipped_from_another_interpreter_or_checkout_but_not_with_other_arguments(tmp_path):
    from statistical_auditing.experiment import Job, Ledger

    job = Job("audit/w2v-jl0", ["/new/venv/bin/python", "/new/clone/statistical_auditing/audit.py", "--run", "/r"])
    moved = ["/old/venv/bin/python", "/old/clone/statistical_auditing/audit.py", "--run", "/r"]
    for command, status, skipped in [(moved, "done", True), (moved, "failed", False),
                                     (moved[:2] + ["--run", "/other"], "done", False),
                                     (["/old/venv/bin/python", "/old/clone/statistical_auditing/lipschitz.py",
                                       "--run", "/r"], "done", False),
                                     (moved + ["--num_threads", "2"], "done", True),  # threads: same result
                                     (moved + ["--num_threads"], "done", False),
                                     ("not a list", "done", False), ([moved[0]], "done", False)]:
        (tmp_path / "jobs.json").write_text(json.dumps({"jobs": {job.name: {"command": command, "status": status}}}))
        assert Ledger(tmp_path / "jobs.json").done(job) is skipped, (command, status)
    (tmp_path / "jobs.json").write_text(json.dumps({"jobs": {job.name: 5}}))  # a damaged entry is redone
    ledger = Ledger(tmp_path / "jobs.json")
    assert not ledger.done(job)
    ledger.record(job, status="done")
    assert Ledger(tmp_path / "jobs.json").done(job)


def test_experiment_rejects_bad_arms():
    result = run_script("statistical_auditing/experiment.py", "--arms", "w2v,sideways", check=False)
    assert result.returncode == 2 and "--arms" in result.stderr and "Traceback" not in result.stderr


def test_kept_runs_are_not_hidden_by_gitignore():
    """A kept run is a result meant to be committed; the training runs' ignore rule once swallowed it silently."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0
    assert not ignored("results/experiment/runs/w2v-jl0/audit/report.md")
    assert ignored("runs/tiny/checkpoints/latest")  # training runs (weights) stay out of git


def test_kept_reports_name_the_plots_they_left_behind(tmp_path):
    from statistical_auditing.experiment import mark_unkept_images

    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "kept.png").write_bytes(b"\x89PNG")
    report = tmp_path / "audit" / "report.md"
    report.write_text("![kept](kept.png)\n![shares, g1](shares.png) and ![web](https://x.org/a.png)\n"
                      "![up](../loss.png)\n")
    assert mark_unkept_images(tmp_path) == 2  # shares.png and ../loss.png are missing
    assert report.read_text() == ("![kept](kept.png)\n*(plot `shares.png` (shares, g1) not kept in this copy: it is "
                                  "in the run's own folder)* and ![web](https://x.org/a.png)\n*(plot `../loss.png` "
                                  "(up) not kept in this copy: it is in the run's own folder)*\n")
    assert mark_unkept_images(tmp_path) == 0  # idempotent
    (tmp_path / "loss.png").write_bytes(b"\x89PNG")
    (tmp_path / "other.md").write_text("![loss](loss.png)\n")
    assert mark_unkept_images(tmp_path) == 0 and (tmp_path / "other.md").read_text() == "![loss](loss.png)\n"


def test_committed_kept_runs_have_no_broken_image_links():
    runs = REPO / "results" / "experiment" / "runs"
    if not runs.is_dir():
        pytest.skip("no kept runs in this checkout")
    assert not _dangling_image_links(runs)
