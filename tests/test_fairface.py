"""fairface.py: ScoreDecomp accuracy on labelled images, on both model families."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_script
from bias_begets_bias.cli import InputError, run_main
from statistical_auditing.sd_audits import cli_common as cc
from statistical_auditing import fairface as ff
from statistical_auditing.core.score_models import PixelScoreModel, ScoreModel
from statistical_auditing.core.scoring import batch_noise, decide, scores_by_k
from statistical_auditing.core.stats import wilson_interval

SCRIPT = "statistical_auditing/fairface.py"


# ----------------------------------------------------------------------------- shared fixtures (also used by
# test_diff_prompts_same_score.py and test_diffusion_classifier_cli.py, through these plain functions)


def tiny_sd_folder(tmp_path_factory) -> Path:
    """A tiny random SD pipeline saved once per test session (latents 4x8x8, images 16 px)."""
    from tiny_models import save_tiny_sd_pipeline

    folder = tmp_path_factory.getbasetemp() / "audit_tiny_sd"
    if not (folder / "model_index.json").is_file():
        save_tiny_sd_pipeline(folder)
    return folder


def fairface_csv_folder(tmp_path_factory, n: int = 4) -> Path:
    """The original FairFace layout (tiny_models.save_tiny_fairface_csv), made once per test session."""
    from tiny_models import save_tiny_fairface_csv

    csv_path = tmp_path_factory.getbasetemp() / "audit_fairface" / "fairface_label_train.csv"
    return csv_path if csv_path.is_file() else save_tiny_fairface_csv(csv_path.parent, n)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    return tiny_sd_folder(tmp_path_factory)


@pytest.fixture(scope="session")
def fairface_csv(tmp_path_factory) -> Path:
    return fairface_csv_folder(tmp_path_factory)


def cli_error(main, argv, capsys) -> str:
    """Run main as the script would (run_main); return its stderr, asserting exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: main(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------- a model with a known table


class RecordingModel(ScoreModel):
    """A deterministic fake: a 50-step table 980, 960, ..., 0 (so timesteps[-k] = 20 (k - 1),
    not k - 1), epsilon = x_t * (1 + c / 10) for the condition's index c in ``words``.
    Every predict_eps call is recorded."""

    words = ["base", "a", "b"]

    def __init__(self):
        self.timesteps = torch.arange(980, -1, -20)
        self.alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
        self.device = torch.device("cpu")
        self.calls = []

    def encode(self, images):
        return images * 2 - 1

    def predict_eps(self, x_t, t, conditions):
        self.calls.append((x_t.clone(), t.clone(), list(conditions)))
        scale = torch.tensor([1 + self.words.index(c) / 10 for c in conditions])
        return x_t[:, None] * scale.view(1, -1, 1, 1, 1)


def _setup(timesteps, seed=0):
    return {"seed": seed, "candidates": ["a", "b"], "base": "base", "timesteps": timesteps, "method": "simplex",
            "lp_order": 2, "pca_components": 2, "pca_normalize": True, "elbo_budgets": [], "elbo_loss": "l2"}


def test_k_maps_to_the_table_from_the_clean_end_and_noise_is_per_image():
    model = RecordingModel()
    timesteps = cc.timesteps_for(model, [1, 3])
    assert timesteps == {1: 0, 3: 40}
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    ids = ["img/a.png", "img/b.png"]
    ff.evaluate_batch(model, x0, ids, _setup(timesteps))
    assert [c[2] for c in model.calls] == [["base", "a", "b"]] * 2  # base + candidates in one call
    for (x_t, t, _), timestep in zip(model.calls, (0, 40)):
        assert t.tolist() == [timestep, timestep]
        noise = batch_noise((3, 4, 4), 0, ids)
        assert torch.allclose(x_t, model.add_noise(x0, noise, t))  # the per-image draw, shared by all k
    # an image's noise does not depend on its batch: alone, image b gets the same x_t
    alone = RecordingModel()
    ff.evaluate_batch(alone, x0[1:], ids[1:], _setup(timesteps))
    assert torch.equal(alone.calls[0][0][0], model.calls[0][0][1])
    with pytest.raises(InputError, match="outside the timestep table"):
        cc.timesteps_for(model, [51])


def test_same_seed_same_scores_other_seed_other_noise(smoke_run):
    model = PixelScoreModel(str(smoke_run))
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    timesteps = cc.timesteps_for(model, [5, 300])
    assert timesteps == {5: 4, 300: 299}  # the pixel training table (steps_offset 0): k -> k - 1
    setup = _setup(timesteps) | {"base": "person", "candidates": ["man", "woman"]}
    first = ff.evaluate_batch(model, x0, ["x", "y"], setup)
    again = ff.evaluate_batch(model, x0, ["x", "y"], setup)
    other = ff.evaluate_batch(model, x0, ["x", "y"], setup | {"seed": 1})
    scores = [[r["scoredecomp"][str(k)]["scores"] for k in timesteps] for r in first]
    assert scores == [[r["scoredecomp"][str(k)]["scores"] for k in timesteps] for r in again]
    assert scores != [[r["scoredecomp"][str(k)]["scores"] for k in timesteps] for r in other]
    for result in first:
        for entry in result["scoredecomp"].values():
            assert entry["evals"] == 3 and abs(sum(entry["scores"]) - 1) < 1e-9  # simplex weights
            assert entry["pred"] == int(decide(torch.tensor([entry["scores"]]))[0])


def _record(label_index, scores):
    entry = {"scores": scores, "pred": int(decide(torch.tensor([scores]))[0]), "seconds": 1.0, "evals": 3}
    return {"label_index": label_index, "scoredecomp": {"5": entry}, "elbo": {}}


SUMMARY_SETUP = {"method": "simplex", "timesteps": {5: 5}, "elbo_budgets": [], "elbo_listed": [],
                 "elbo_matched": None}
# label 0 right; label 1 an exact tie (no call, wrong); label 1 right; label 0 wrong
EVALUATED = [_record(0, [0.7, 0.3]), _record(1, [0.5, 0.5]), _record(1, [0.2, 0.8]), _record(0, [0.4, 0.6])]


def test_summary_counts_a_tie_as_wrong_by_hand():
    (row,), confusions = ff.summarise(EVALUATED, SUMMARY_SETUP, ["male", "female"])
    assert (row["call"], row["accuracy"], row["n"], row["ties"], row["threshold"]) == ("argmax", 0.5, 4, 1, "")
    assert confusions == {"k5": [[1, 1, 0], [0, 1, 1]]}  # columns: male, female, tie
    assert (row["ci_low"], row["ci_high"]) == tuple(round(v, 6) for v in wilson_interval(2, 4))
    # margins s1 - s0: class 0 -0.4, 0.2; class 1 0, 0.6: pairs 0 > -0.4, 0 < 0.2, 0.6 > both: 3 of 4
    assert row["auc"] == 0.75
    assert cc.confusion_text(confusions["k5"], ["male", "female"]).splitlines() == [
        "true\\predicted,male,female,tie", "male,1,1,0", "female,0,1,1"]


def test_summary_with_a_calibrated_threshold_by_hand():
    # calibration margins: class 0 0.05, 0.1; class 1 0.5, 0.4 -> thresholds -0.95 (2/4), 0.075 (3/4),
    # 0.25 (4/4), 0.45 (3/4), 1.5 (2/4): 0.25. Evaluated margins -0.4, 0, 0.6, 0.2 -> calls 0, 0, 1, 0: 3 of 4
    calibration = [_record(0, [0.475, 0.525]), _record(0, [0.45, 0.55]), _record(1, [0.25, 0.75]),
                   _record(1, [0.3, 0.7])]
    (row,), confusions = ff.summarise(EVALUATED, SUMMARY_SETUP, ["male", "female"], "calibrated", calibration)
    assert row["call"] == "calibrated" and row["threshold"] == pytest.approx(0.25)
    assert (row["accuracy"], row["ties"], row["calibration_n"]) == (0.75, 0, 4)
    assert confusions == {"k5": [[2, 0, 0], [1, 1, 0]]}
    assert ff.summarise(EVALUATED, SUMMARY_SETUP, ["male", "female"], "calibrated", []) == ([], {})


def test_small_helpers():
    assert cc.split_list("man, woman", "c") == ["man", "woman"]
    assert cc.split_list("photo, man|photo, woman", "c") == ["photo, man", "photo, woman"]
    with pytest.raises(InputError, match="--c"):
        cc.split_list("man,,woman", "c")
    assert cc.parse_k_list("20,5,20") == [20, 5]
    for bad in ("0", "five", ""):
        with pytest.raises(InputError, match="--k_list"):
            cc.parse_k_list(bad)
    # ScoreDecomp: 1 + K evaluations; ELBO: K per timestep -> ceil((1 + K) / K) timesteps
    assert [ff.matched_elbo_samples(k) for k in (1, 2, 7)] == [2, 2, 2]
    assert cc.selected_indices(10, 3, "first") == [0, 1, 2] and cc.selected_indices(10, 3, "first", offset=8) == [8, 9]
    picked = cc.selected_indices(100, 5, "random", seed=3)
    assert picked == sorted(picked) and len(set(picked)) == 5 and picked == cc.selected_indices(100, 5, "random", 3)
    # the order is a permutation seeded by the seed: its first 5 and the next 3 (calibration) are disjoint
    order = torch.randperm(100, generator=torch.Generator().manual_seed(3)).tolist()
    assert picked == sorted(order[:5]) and cc.selected_indices(100, 3, "random", 3, offset=5) == sorted(order[5:8])
    names = {ff.result_file(Path("o"), i).name for i in ("a/b.png", "a_b.png", "train/0")}
    assert len(names) == 3 and all("/" not in n and n.endswith(".json") for n in names)
    assert cc.template_prompts("a blurry photo of a {class}.", ["cat", "dog"]) == [
        "a blurry photo of a cat.", "a blurry photo of a dog."]
    with pytest.raises(InputError, match="--template"):
        cc.template_prompts("a photo of a {}", ["cat"])


def test_default_conditions_per_family():
    pixel = PixelScoreModel.__new__(PixelScoreModel)  # the family is all that matters here
    assert cc.default_conditions(pixel, "gender") == ("person", ["man", "woman"])
    with pytest.raises(InputError, match="--candidates"):
        cc.default_conditions(pixel, "race")
    base, candidates = cc.default_conditions(RecordingModel(), "gender")
    assert base == "photo of a person's face" and candidates == [base + ", man", base + ", woman"]
    _, races = cc.default_conditions(RecordingModel(), "race")
    assert len(races) == 7 and races[5] == base + ", Latino Hispanic"


# ----------------------------------------------------------------------------- end to end


@pytest.mark.smoke
def test_pixel_model_end_to_end_then_resume(smoke_run, small_dataset, tmp_path, capsys):
    out = tmp_path / "ff"
    args = ["--model", str(smoke_run), "--data", str(small_dataset), "--kind", "sixclass", "--selection", "random",
            "--num_images", "5", "--k_list", "1,5", "--elbo_samples", "2", "--out", str(out), "--batch_size", "2"]
    run_script(SCRIPT, *args)
    rows = read_csv(out / "summary.csv")
    assert [(r["method"], r["k"], r["budget"]) for r in rows] == [
        ("scoredecomp", "1", "1"), ("scoredecomp", "5", "1"), ("elbo", "", "2"), ("elbo_matched", "", "2")]
    assert {r["n"] for r in rows} == {"5"}
    assert [float(r["evals_per_image"]) for r in rows] == [3, 3, 4, 4]
    confusion = read_csv(out / "confusion_k5.csv")
    assert [c["true\\predicted"] for c in confusion] == ["male", "female"]
    assert sum(int(c["male"]) + int(c["female"]) + int(c["tie"]) for c in confusion) == 5
    # accuracy and interval from the confusion counts, computed independently
    correct = int(confusion[0]["male"]) + int(confusion[1]["female"])
    row = rows[1]
    assert float(row["accuracy"]) == pytest.approx(correct / 5)
    assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx(wilson_interval(correct, 5), abs=1e-6)
    records = [json.loads(f.read_text()) for f in (out / "per_image").glob("*.json")]
    assert correct == sum(r["scoredecomp"]["5"]["pred"] == r["label_index"] for r in records)
    assert (out / "confusion_elbo_n2.csv").is_file() and "| scoredecomp | 5 |" in (out / "report.md").read_text()

    files = sorted((out / "per_image").glob("*.json"))
    assert len(files) == 5
    stamps = {f: f.stat().st_mtime_ns for f in files}
    summary = read_csv(out / "summary.csv")
    ff.main(args)
    assert "5 already done, 0 to do" in capsys.readouterr().out
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    files[2].unlink()
    ff.main(args)
    assert "4 already done, 1 to do" in capsys.readouterr().out
    assert all(f.stat().st_mtime_ns == stamps[f] for f in files if f != files[2])
    assert files[2].is_file()
    # the redone image has the same noise (seeded by its id): the accuracies are unchanged
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "seconds_per_image"} for r in rows]  # noqa: E731
    assert untimed(read_csv(out / "summary.csv")) == untimed(summary)


@pytest.mark.smoke
def test_stable_diffusion_on_a_fairface_csv_in_shards(tiny_sd, fairface_csv, tmp_path, capsys):
    out = tmp_path / "ff"
    args = ["--model", str(tiny_sd), "--data", str(fairface_csv), "--resize", "16", "--num_images", "4",
            "--k_list", "5", "--elbo_samples", "2", "--out", str(out), "--dtype", "fp32", "--scheduler", "ddim"]
    first = run_script(SCRIPT, *args, "--shard", "0/2")
    assert "2 in shard 0/2" in first.stdout and "2 of 4 images have no result yet" in first.stderr
    assert {r["n"] for r in read_csv(out / "summary.csv")} == {"2"}
    result = ff.main(args + ["--shard", "1/2"])  # the last shard's summary covers every image
    assert result["n_done"] == 4 and result["classes"] == ["male", "female"]
    assert {r["n"] for r in read_csv(out / "summary.csv")} == {"4"}
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["candidates"] == ["photo of a person's face, man", "photo of a person's face, woman"]
    assert config["timesteps"] == {"5": 5}  # set_timesteps(1000) with SD's steps_offset 1: k = 5 is t = 5
    assert config["resolved"]["model_identity"]["folder"] == str(tiny_sd.resolve())


def test_bad_inputs_are_one_clear_error_before_any_work(smoke_run, small_dataset, tmp_path, capsys):
    base = ["--model", str(smoke_run), "--out", str(tmp_path / "out")]
    err = cli_error(ff.main, base + ["--data", str(small_dataset), "--k_list", "5,1001"], capsys)
    assert err == "error: --k_list: k=1001 is outside the timestep table: expected 1 <= k <= 1000\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    err = cli_error(ff.main, base + ["--data", str(empty)], capsys)
    assert err.count("\n") == 1 and err.startswith("error: ") and str(empty) in err
    tree = tmp_path / "tree" / "32" / "test" / "man"  # class folders without images
    tree.mkdir(parents=True)
    err = cli_error(ff.main, base + ["--data", str(tmp_path / "tree"), "--kind", "sixclass"], capsys)
    assert err.count("\n") == 1 and "no images" in err
    header_only = tmp_path / "labels.csv"
    header_only.write_text("file,label\n")
    err = cli_error(ff.main, base + ["--data", str(header_only), "--kind", "csv", "--label_column", "label"], capsys)
    assert err.count("\n") == 1 and "no images" in err
    broken = tmp_path / "fairface.csv"
    broken.write_text("file,age,gender\ntrain/0.jpg,20-29,Male\n")
    err = cli_error(ff.main, base + ["--data", str(broken), "--kind", "fairface_csv"], capsys)
    assert err.count("\n") == 1 and "missing column(s) race, service_test" in err
    err = cli_error(ff.main, base + ["--data", str(broken), "--kind", "csv", "--candidates", "a,b,c"], capsys)
    assert err.count("\n") == 1 and "3 candidates" in err and "2 classes" in err
    assert not (tmp_path / "out").exists()


def _summary_keys(rows):
    return [{k: v for k, v in r.items() if k != "seconds_per_image"} for r in rows]


@pytest.mark.smoke
def test_a_run_trained_further_has_its_results_redone(smoke_run, small_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    out = tmp_path / "ff"
    args = ["--model", str(run), "--data", str(small_dataset), "--kind", "sixclass", "--num_images", "3",
            "--k_list", "5", "--elbo", "false", "--out", str(out)]
    first = ff.main(args)
    assert first["settings"]["model_identity"]["run_step"] == PixelScoreModel(str(run)).run.step
    ff.main(args)
    assert "3 already done, 0 to do" in capsys.readouterr().out
    # a later checkpoint (faked: the step in the latest checkpoint's state.json) redoes every image
    state_file = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() / "state.json"
    state = json.loads(state_file.read_text())
    state["step"] += 1
    state_file.write_text(json.dumps(state))
    ff.main(args)
    assert "0 already done, 3 to do (3 made with other settings are redone)" in capsys.readouterr().out
    # so does another run configuration (config.json), and another number of inference steps
    (run / "config.json").write_text((run / "config.json").read_text() + "\n")
    ff.main(args)
    assert "(3 made with other settings are redone)" in capsys.readouterr().out
    ff.main(args + ["--num_inference_steps", "100"])
    assert "(3 made with other settings are redone)" in capsys.readouterr().out
    ff.main(args + ["--num_inference_steps", "100", "--method", "pca", "--pca_normalize", "false"])
    assert "(3 made with other settings are redone)" in capsys.readouterr().out


@pytest.mark.smoke
def test_fairface_on_the_six_class_test_split_matches_the_audits_control(smoke_run, small_dataset, tmp_path):
    """The same image, seed and k give the same noise, hence the same ScoreDecomp weights, in
    fairface.py and in the audit's control 1 (scoring.gender_accuracy_by_k on audit.load_test_images)."""
    from bias_begets_bias.pipeline import TrainedRun
    from statistical_auditing.audit import accuracy_control, load_test_images

    result = ff.main(["--model", str(smoke_run), "--data", str(small_dataset), "--kind", "sixclass",
                      "--num_images", "100", "--k_list", "5,300", "--elbo", "false", "--batch_size", "12",
                      "--out", str(tmp_path / "ff")])
    fairface_scores = {r["image_id"]: r["scoredecomp"] for r in result["records"]}
    model = PixelScoreModel(str(smoke_run))
    images, labels, ids = load_test_images(small_dataset, TrainedRun(smoke_run).config["class_words"],
                                           model.image_size, 0, tmp_path / "audit")
    assert sorted(ids) == sorted(fairface_scores) and len(ids) == 12
    control = scores_by_k(model, images, ids, [5, 300], "person", ["man", "woman"], seed=0, batch_size=12,
                          progress=False)
    for k in (5, 300):
        ours = torch.tensor([fairface_scores[i][str(k)]["scores"] for i in ids], dtype=torch.float64)
        assert torch.allclose(ours, control[k], atol=1e-7, rtol=0)
    other_seed = scores_by_k(model, images, ids, [300], "person", ["man", "woman"], seed=1, batch_size=12,
                             progress=False)
    assert not torch.allclose(other_seed[300], control[300], atol=1e-4)  # the comparison can fail
    # the audit's control 1 itself keeps every image's weights in controls.json: fairface.py's, image for image
    cfg = {"test_limit": 0, "seed": 0, "control_base": "person", "batch_size": 12, "num_inference_steps": 1000,
           "k": 0}
    control = accuracy_control(model, cfg, small_dataset, [5, 300], tmp_path / "audit")
    assert control["info"]["n_images"] == 12
    saved = json.loads((tmp_path / "audit" / "controls.json").read_text())
    for k in (5, 300):
        ours = torch.tensor([fairface_scores[i][str(k)]["scores"] for i in saved["ids"]], dtype=torch.float64)
        assert torch.allclose(ours, torch.tensor(saved["scores"][str(k)], dtype=torch.float64), atol=1e-7, rtol=0)


@pytest.mark.smoke
def test_calibrated_call_uses_the_next_images_of_the_same_order(smoke_run, small_dataset, tmp_path):
    from statistical_auditing.core.stats import calibrated_threshold

    out = tmp_path / "ff"
    args = ["--model", str(smoke_run), "--data", str(small_dataset), "--kind", "sixclass", "--num_images", "6",
            "--k_list", "300", "--elbo", "false", "--call", "calibrated", "--calibration_images", "4",
            "--out", str(out)]
    result = ff.main(args)
    evaluated = [r["index"] for r in result["records"]]
    held_out = [r["index"] for r in result["calibration_records"]]
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0)).tolist()
    assert evaluated == sorted(order[:6]) and held_out == sorted(order[6:10])
    (row,) = result["rows"]
    threshold = calibrated_threshold([ff.margin(r["scoredecomp"]["300"]) for r in result["calibration_records"]],
                                     [r["label_index"] == 1 for r in result["calibration_records"]])
    assert row["call"] == "calibrated" and row["threshold"] == pytest.approx(threshold)
    correct = sum(int(ff.margin(r["scoredecomp"]["300"]) > threshold) == r["label_index"] for r in result["records"])
    assert row["accuracy"] == pytest.approx(correct / 6, abs=1e-6) and row["n"] == 6 and row["calibration_n"] == 4
    assert read_csv(out / "summary.csv")[0]["threshold"] != "" and "calibrated" in (out / "report.md").read_text()
    err_args = args[:-4] + ["--num_images", "12", "--out", str(tmp_path / "bad")]
    with pytest.raises(InputError, match="no labelled image is left for calibration"):
        ff.main(err_args)
