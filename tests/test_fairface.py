"""fairface.py: ScoreDecomp accuracy on labelled images, on both model families."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import run_script
from diffusion_from_scratch.cli import InputError, run_main
from statistical_auditing import fairface as ff
from statistical_auditing.score_models import PixelScoreModel, ScoreModel

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
    """The original FairFace layout: fairface_label_train.csv (file,age,gender,race,service_test)
    beside train/<i>.jpg; genders alternate Male, Female; images 20x24 (not square)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.getbasetemp() / "audit_fairface"
    csv_path = folder / "fairface_label_train.csv"
    if not csv_path.is_file():
        (folder / "train").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        lines = ["file,age,gender,race,service_test"]
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "train" / f"{i}.jpg")
            lines.append(f"train/{i}.jpg,20-29,{'Male' if i % 2 == 0 else 'Female'},White,True")
        csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


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
            "lp_order": 2, "elbo_budgets": [], "elbo_loss": "l2"}


def test_k_maps_to_the_table_from_the_clean_end_and_noise_is_per_image():
    model = RecordingModel()
    timesteps = ff.timesteps_for(model, [1, 3])
    assert timesteps == {1: 0, 3: 40}
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    ids = ["img/a.png", "img/b.png"]
    ff.evaluate_batch(model, x0, ids, _setup(timesteps))
    assert [c[2] for c in model.calls] == [["base", "a", "b"]] * 2  # base + candidates in one call
    for (x_t, t, _), timestep in zip(model.calls, (0, 40)):
        assert t.tolist() == [timestep, timestep]
        noise = torch.stack([ff.image_noise((3, 4, 4), 0, i) for i in ids])
        assert torch.allclose(x_t, model.add_noise(x0, noise, t))  # the per-image draw, shared by all k
    # an image's noise does not depend on its batch: alone, image b gets the same x_t
    alone = RecordingModel()
    ff.evaluate_batch(alone, x0[1:], ids[1:], _setup(timesteps))
    assert torch.equal(alone.calls[0][0][0], model.calls[0][0][1])
    with pytest.raises(InputError, match="outside the timestep table"):
        ff.timesteps_for(model, [51])


def test_same_seed_same_scores_other_seed_other_noise(smoke_run):
    model = PixelScoreModel(str(smoke_run))
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    timesteps = ff.timesteps_for(model, [5, 300])
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


def test_small_helpers():
    assert ff.split_list("man, woman", "c") == ["man", "woman"]
    assert ff.split_list("photo, man|photo, woman", "c") == ["photo, man", "photo, woman"]
    with pytest.raises(InputError, match="--c"):
        ff.split_list("man,,woman", "c")
    assert ff.parse_k_list("20,5,20") == [20, 5]
    for bad in ("0", "five", ""):
        with pytest.raises(InputError, match="--k_list"):
            ff.parse_k_list(bad)
    # ScoreDecomp: 1 + K evaluations; ELBO: K per timestep -> ceil((1 + K) / K) timesteps
    assert [ff.matched_elbo_samples(k) for k in (1, 2, 7)] == [2, 2, 2]
    assert ff.selected_indices(10, 3) == [0, 1, 2]
    picked = ff.selected_indices(100, 5, "random", seed=3)
    assert picked == sorted(picked) and len(set(picked)) == 5 and picked == ff.selected_indices(100, 5, "random", 3)
    names = {ff.result_file(Path("o"), i).name for i in ("a/b.png", "a_b.png", "train/0")}
    assert len(names) == 3 and all("/" not in n and n.endswith(".json") for n in names)


def test_binary_auc_by_hand():
    # positives 0.9, 0.4; negatives 0.5, 0.4: pairs (0.9>0.5) 1, (0.9>0.4) 1, (0.4<0.5) 0, tie 1/2 -> 2.5 / 4
    assert ff.binary_auc([0.9, 0.4, 0.5, 0.4], [True, True, False, False]) == 0.625
    assert ff.binary_auc([1.0, 2.0], [True, True]) is None


def test_default_conditions_per_family():
    pixel = PixelScoreModel.__new__(PixelScoreModel)  # the family is all that matters here
    assert ff.default_conditions(pixel, "gender") == ("person", ["man", "woman"])
    with pytest.raises(InputError, match="--candidates"):
        ff.default_conditions(pixel, "race")
    base, candidates = ff.default_conditions(RecordingModel(), "gender")
    assert base == "photo of a person's face" and candidates == [base + ", man", base + ", woman"]
    _, races = ff.default_conditions(RecordingModel(), "race")
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
    for r in rows:
        assert float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"])
    confusion = read_csv(out / "confusion_k5.csv")
    assert [c["true\\predicted"] for c in confusion] == ["male", "female"]
    assert sum(int(c["male"]) + int(c["female"]) for c in confusion) == 5
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
    assert config["timesteps"] == {"5": 4}


def test_bad_inputs_are_one_clear_error_before_any_work(smoke_run, small_dataset, tmp_path, capsys):
    base = ["--model", str(smoke_run), "--out", str(tmp_path / "out")]
    err = cli_error(ff.main, base + ["--data", str(small_dataset), "--k_list", "5,1001"], capsys)
    assert err == "error: k=1001 is outside the timestep table: expected 1 <= k <= 1000\n"
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
