"""Embedding bias vs output bias: the maths by hand, row selection, and a smoke run on tiny models."""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import save_tiny_clip_model, save_tiny_sd_pipeline, save_tiny_stable_bias  # noqa: E402

from bias_begets_bias.cli import InputError  # noqa: E402
from statistical_auditing import real_prompts_proportion as rpp  # noqa: E402

SCRIPT = Path(rpp.__file__)


def test_embedding_bias_by_hand():
    # base (1, 0); man (1, 0): cos 1; woman (1, 1): cos 1/sqrt(2); ratio sqrt(2)
    result = rpp.embedding_bias(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert result["cos_man"] == pytest.approx(1.0)
    assert result["cos_woman"] == pytest.approx(1 / math.sqrt(2))
    assert result["ratio"] == pytest.approx(math.sqrt(2))
    # flattening: (2, 2) states compare as 4-vectors
    assert rpp.cosine(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == \
        pytest.approx(1 / math.sqrt(2))
    with pytest.raises(ValueError):
        rpp.cosine(torch.zeros(3), torch.ones(3))


def test_man_count_is_strict():
    probs = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.2, 0.8], [0.51, 0.49]])
    assert rpp.man_count(probs) == 2  # the tie is not a man


def test_select_rows_first_n_per_profession_and_generator():
    professions = ["Nurse", "nurse", "aerospace_engineer", "nurse", "nurse", "ceo"]
    generators = ["a", "b", "a", "a", "a", "b"]
    chosen = rpp.select_rows(professions, generators, ["nurse", "aerospace engineer", "ceo", "pilot"], 2, "a")
    assert chosen == {"nurse": [0, 3], "aerospace engineer": [2], "ceo": [], "pilot": []}
    assert rpp.select_rows(professions, None, ["ceo", "nurse"], 5, None) == {"ceo": [5], "nurse": [0, 1, 3, 4]}


def test_resolve_generator():
    present = ["stabilityai-stable-diffusion-2", "SD_14", "dalle"]
    assert rpp.resolve_generator("auto", "stabilityai/stable-diffusion-2", present) == "stabilityai-stable-diffusion-2"
    assert rpp.resolve_generator("all", "x", present) is None
    assert rpp.resolve_generator("SD_14", "x", present) == "SD_14"
    with pytest.raises(InputError, match="SD_14"):  # the message lists what is there
        rpp.resolve_generator("auto", "stabilityai/stable-diffusion-2-1", present)
    with pytest.raises(InputError, match="dalle"):
        rpp.resolve_generator("sd-3", "x", present)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """Tiny SD + tiny CLIP + a professions dataset saved with save_to_disk
    (tiny_models.STABLE_BIAS_MADE says what each generator made)."""
    pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("stable_bias")
    save_tiny_sd_pipeline(root / "sd")
    save_tiny_clip_model(root / "clip")
    save_tiny_stable_bias(root)
    return root


def test_auto_generator_without_match_fails_before_loading_models(tiny_world, tmp_path):
    with pytest.raises(InputError, match="gen-a"):
        rpp.main(["--model", str(tiny_world / "sd"), "--clip_model", str(tiny_world / "clip"),
                  "--dataset", str(tiny_world / "professions"), "--professions", str(tiny_world / "professions.txt"),
                  "--out_dir", str(tmp_path / "out"), "--device", "cpu"])
    with pytest.raises(InputError, match="generator_column"):
        rpp.main(["--dataset", str(tiny_world / "professions"), "--generator_column", "made_by",
                  "--professions", str(tiny_world / "professions.txt"), "--out_dir", str(tmp_path / "out")])


@pytest.mark.smoke
def test_smoke_run_on_tiny_models(tiny_world, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--preset", "smoke", "--model", str(tiny_world / "sd"),
               "--clip_model", str(tiny_world / "clip"), "--dataset", str(tiny_world / "professions"),
               "--generator", "gen-a", "--professions", str(tiny_world / "professions.txt"),
               "--out_dir", str(out), "--device", "cpu", "--dtype", "fp32"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "per_profession.csv", newline="") as handle:
        rows = {row["profession"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["nurse", "doctor", "teacher", "engineer", "philosopher"]
    assert [rows[p]["n_images"] for p in rows] == ["3", "3", "2", "3", "0"]  # gen-b rows were filtered out
    assert rows["philosopher"]["status"].startswith("skipped") and rows["philosopher"]["y_man_share"] == ""
    assert rows["teacher"]["status"] == "ok: only 2 images"
    for p in ("nurse", "doctor", "teacher", "engineer"):
        share = float(rows[p]["y_man_share"])
        assert 0 <= float(rows[p]["y_low"]) <= share <= float(rows[p]["y_high"]) <= 1
        assert share == pytest.approx(int(rows[p]["n_man"]) / int(rows[p]["n_images"]))
    for p in rows:  # embedding bias exists even where there are no images
        ratio = float(rows[p]["flat_ratio"])
        assert ratio == pytest.approx(float(rows[p]["flat_cos_man"]) / float(rows[p]["flat_cos_woman"]))
    with open(out / "regression.csv", newline="") as handle:
        fits = list(csv.DictReader(handle))
    assert [f["variant"] for f in fits] == ["flat", "eos", "mean"] and all(f["n"] == "4" for f in fits)
    for variant in ("flat", "eos", "mean"):
        assert (out / f"regression_{variant}.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "philosopher" in report and "gen-a" in report
