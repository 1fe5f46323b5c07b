"""The experiment's scripts end to end on a smoke run, and what is kept of a run (the workflow itself:
test_workflow.py)."""
import csv
import json
import shutil
import subprocess

import pytest

from conftest import REPO, run_script


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _dangling_image_links(folder):
    """(report, target) for each markdown image link under ``folder`` whose local file is missing."""
    from statistical_auditing.keep_run import IMAGE_LINK

    return [(report.as_posix(), target) for report in sorted(folder.rglob("*.md"))
            for _, target in IMAGE_LINK.findall(report.read_text())
            if "://" not in target and not (report.parent / target).is_file()]


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory, audited_smoke_run):
    """A copy of the session's audited smoke run (conftest: audited once per session), which these
    tests may write into."""
    run = tmp_path_factory.mktemp("audited") / "run"
    shutil.copytree(audited_smoke_run, run)
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


def test_kept_runs_are_not_hidden_by_gitignore():
    """A kept run is a result meant to be committed; the training runs' ignore rule once swallowed it silently."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0
    assert not ignored("results/experiment/runs/w2v-jl0/audit/report.md")
    assert not ignored("results/whose_bias/runs/w2v-jl0/ema.safetensors")
    assert ignored("runs/tiny/checkpoints/latest")  # training runs (weights) stay out of git


def test_kept_reports_name_the_plots_they_left_behind(tmp_path):
    from statistical_auditing.keep_run import mark_unkept_images

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
    kept = [runs for runs in sorted((REPO / "results").glob("*/runs")) if runs.is_dir()]
    if not kept:
        pytest.skip("no kept runs in this checkout")
    assert not [link for runs in kept for link in _dangling_image_links(runs)]


@pytest.mark.smoke
def test_full_guidance_words_draws_the_other_scales_for_those_words_only(tmp_path, smoke_run, small_dataset):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    run_script("statistical_auditing/audit.py", "--run", str(run), "--preset", "smoke", "--num_threads", "1",
               "--guidance", "1,3", "--full_guidance_words", "1", "--dataset_path", str(small_dataset))
    summary = json.loads((run / "audit" / "audit.json").read_text())
    assert len(summary["unseen"]) == 3 and len(summary["unseen_at_every_scale"]) == 1
    drawn = {(r["guidance"], r["word"]) for r in _rows(run / "audit" / "proportions.csv")}
    for word in summary["unseen"]:
        assert ("1", word) in drawn
        assert (("3", word) in drawn) == (word in summary["unseen_at_every_scale"]), word
    assert all(("3", word) in drawn for word in summary["seen"])


def _fake_run(folder, jl_seed=0, with_dose=True):
    """A finished run's small outputs, enough for keep_run without weights."""
    config = {"train": {"debias": "none", "jl_seed": jl_seed, "seed": 789, "lr": 0.001}, "unet": {}, "words": [],
              "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction": "v_prediction",
              "debias": "none", "jl_seed": jl_seed}
    (folder / "audit").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "audit" / "audit.json").write_text(json.dumps({"run": str(folder), "k": 3}))
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "state.safetensors").write_bytes(b"weights")
    if with_dose:
        (folder / "dose_response").mkdir()
        (folder / "dose_response" / "slopes.csv").write_text("word,slope\nmaid,1\n")
    return folder


def test_a_kept_run_is_replaced_whole_and_another_runs_copy_is_refused(tmp_path):
    from bias_begets_bias.cli import InputError
    from statistical_auditing.keep_run import keep_run

    dest = tmp_path / "kept"
    run = _fake_run(tmp_path / "exp" / "w2v-jl0")
    kept = keep_run(run, dest, None, weights=False)
    assert (kept / "dose_response" / "slopes.csv").is_file() and not (kept / "checkpoints").exists()
    assert str(tmp_path) not in (kept / "audit" / "audit.json").read_text()  # paths made portable
    # the same run kept again from an experiment without dose-response: nothing of the old copy survives
    again = _fake_run(tmp_path / "exp2" / "w2v-jl0", with_dose=False)
    keep_run(again, dest, None, weights=False)
    assert not (kept / "dose_response").exists() and (kept / "kept.json").is_file()
    # another run (another JL seed) under the same name is refused and the kept copy is left as it was
    other = _fake_run(tmp_path / "exp3" / "w2v-jl0", jl_seed=1)
    before = sorted(p.relative_to(kept) for p in kept.rglob("*"))
    with pytest.raises(InputError, match="jl_seed differs"):
        keep_run(other, dest, None, weights=False)
    assert sorted(p.relative_to(kept) for p in kept.rglob("*")) == before
    # a folder there that is not a kept copy is never overwritten
    (dest / "debiased-jl0").mkdir()
    (dest / "debiased-jl0" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a kept run"):
        keep_run(_fake_run(tmp_path / "exp4" / "debiased-jl0"), dest, None, weights=False)
    assert (dest / "debiased-jl0" / "notes.txt").read_text() == "mine"


def test_a_long_sample_grid_is_kept_cut_and_per_pair_records_are_left_behind(tmp_path):
    import torch
    from PIL import Image

    from bias_begets_bias.utils import save_image_grid
    from statistical_auditing.keep_run import GRID_ROWS, keep_run

    def with_grid(folder, words):
        run = _fake_run(folder)
        config = json.loads((run / "config.json").read_text())
        config["train"]["image_size"] = 8
        (run / "config.json").write_text(json.dumps(config))
        images = torch.arange(words * 2 * 3 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8)
        save_image_grid(images.reshape(words * 2, 3, 8, 8), run / "audit" / "samples_g1.png", nrow=2,
                        labels=[f"word{i}" for i in range(words)])
        (run / "audit" / "report.md").write_text("![samples](samples_g1.png)\n")
        (run / "lipschitz").mkdir()
        (run / "lipschitz" / "pairs.csv").write_text("y1,y2,ratio\nman,woman,0.1\n")
        (run / "lipschitz" / "lipschitz.json").write_text("{}")
        return run

    long_run = with_grid(tmp_path / "exp" / "w2v-jl0", GRID_ROWS + 5)
    (long_run / "audit" / "audit.json").write_text(json.dumps({"seen": ["man", "woman"]}))
    kept = keep_run(long_run, tmp_path / "kept", None, weights=False)
    full = Image.open(long_run / "audit" / "samples_g1.png").convert("RGB")
    row = lambda picture, r: picture.crop((0, r * 10, picture.width, (r + 1) * 10)).tobytes()  # noqa: E731 8 px + 2
    with Image.open(kept / "audit" / "samples_g1_selected.png") as picture:
        picture = picture.convert("RGB")
        assert picture.size == (full.width, GRID_ROWS * 10)
        # the two training words, then 23 of the 28 other rows spread over all of them, the last one included
        assert [row(picture, 0), row(picture, 1)] == [row(full, 0), row(full, 1)]
        assert row(picture, 2) == row(full, 2) and row(picture, GRID_ROWS - 1) == row(full, GRID_ROWS + 4)
    assert not (kept / "audit" / "samples_g1.png").exists() and "not kept" in (kept / "audit" / "report.md").read_text()
    assert not (kept / "lipschitz" / "pairs.csv").exists() and (kept / "lipschitz" / "lipschitz.json").is_file()
    short_run = with_grid(tmp_path / "exp" / "debiased-jl0", GRID_ROWS)
    kept = keep_run(short_run, tmp_path / "kept", None, weights=False)
    assert (kept / "audit" / "samples_g1.png").read_bytes() == (short_run / "audit" / "samples_g1.png").read_bytes()
