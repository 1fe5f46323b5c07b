"""Zero-shot on CIFAR-10-style Hugging Face datasets: --image_column, --label_column, --template.

A small dataset is built here (an image column "img" and a ClassLabel column "label", as
CIFAR-10 on the Hub), saved with save_to_disk, and each script runs on it end to end with
the tiny random Stable Diffusion pipeline; the prompts the UNet actually sees are recorded.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from statistical_auditing import diff_prompts_same_score as dp
from statistical_auditing import diffusion_classifier as dc
from statistical_auditing import fairface as ff
from statistical_auditing.sd_audits.sd_models import StableDiffusionScoreModel
from test_fairface import cli_error, tiny_sd_folder

TEMPLATE = "a blurry photo of a {class}."
PROMPTS = ["a blurry photo of a cat.", "a blurry photo of a dog.", "a blurry photo of a ship."]


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(6)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "ship"])})
    data = datasets.Dataset.from_dict({"img": pictures, "label": [0, 1, 2, 2, 1, 0]}, features=features)
    folder = tmp_path_factory.mktemp("cifar_like") / "saved"
    data.save_to_disk(str(folder))
    return folder


@pytest.fixture()
def seen_conditions(monkeypatch):
    """Every condition list StableDiffusionScoreModel.predict_eps is called with."""
    calls: list[list[str]] = []
    original = StableDiffusionScoreModel.predict_eps

    def recording(self, x_t, t, conditions):
        calls.append(list(conditions))
        return original(self, x_t, t, conditions)

    monkeypatch.setattr(StableDiffusionScoreModel, "predict_eps", recording)
    return calls


def _data_args(tmp_path_factory, cifar_like):
    return ["--model", str(tiny_sd_folder(tmp_path_factory)), "--data", str(cifar_like), "--image_column", "img",
            "--label_column", "label", "--data_config", "", "--resize", "16", "--template", TEMPLATE]


@pytest.mark.smoke
def test_fairface_builds_the_prompts_from_the_class_names(tmp_path_factory, cifar_like, seen_conditions, tmp_path):
    result = ff.main(_data_args(tmp_path_factory, cifar_like) + [
        "--num_images", "4", "--k_list", "5", "--elbo_samples", "1", "--out", str(tmp_path / "ff")])
    assert result["classes"] == ["cat", "dog", "ship"] and result["n_done"] == 4
    assert result["setup"]["candidates"] == PROMPTS and result["setup"]["base"] == ""  # "" = unconditional
    # ScoreDecomp: the base and the three prompts in one call; the ELBO: the three prompts
    assert [""] + PROMPTS in seen_conditions and PROMPTS in seen_conditions
    assert all(c in ([""] + PROMPTS, PROMPTS) for c in seen_conditions)
    assert {r["label"] for r in result["records"]} <= {"cat", "dog", "ship"}
    assert all(r["image_id"].startswith("train/") for r in result["records"])


@pytest.mark.smoke
def test_elbo_classifier_builds_the_prompts_from_the_class_names(tmp_path_factory, cifar_like, seen_conditions,
                                                                  tmp_path):
    result = dc.main(_data_args(tmp_path_factory, cifar_like) + [
        "--num_images", "3", "--n_samples", "2", "--out", str(tmp_path / "elbo")])
    assert result["candidates"] == PROMPTS and result["classes"] == ["cat", "dog", "ship"]
    assert seen_conditions == [PROMPTS] * 2 * 1  # 2 timesteps, one batch of 3 images
    assert result["row"]["n"] == 3 and sum(map(sum, result["confusion"])) == 3


@pytest.mark.smoke
def test_heatmaps_compare_the_template_prompts(tmp_path_factory, cifar_like, seen_conditions, tmp_path):
    result = dp.main(_data_args(tmp_path_factory, cifar_like) + [
        "--num_images", "2", "--k_list", "5,50", "--num_inference_steps", "100", "--out", str(tmp_path / "heat")])
    assert result["prompts"] == PROMPTS and seen_conditions == [PROMPTS, PROMPTS]
    assert result["timesteps"] == {5: 41, 50: 491}  # 100 steps with SD's steps_offset 1: t = 10k - 9
    assert torch.allclose(result["prompt_mean"].diagonal(dim1=1, dim2=2), torch.ones(2, 3, dtype=torch.float64))


def test_template_errors_name_the_flag(tmp_path_factory, cifar_like, tmp_path, capsys):
    args = _data_args(tmp_path_factory, cifar_like) + ["--out", str(tmp_path / "bad")]
    err = cli_error(ff.main, args[:-4] + ["--template", "a photo of a thing", "--out", str(tmp_path / "bad")], capsys)
    assert err.splitlines()[-1].startswith("error: --template: expected a text containing {class}")
    err = cli_error(ff.main, args + ["--candidates", "a,b,c"], capsys)
    assert "--template and --candidates both given" in err.splitlines()[-1]
    err = cli_error(ff.main, args[:-6] + ["--out", str(tmp_path / "bad")], capsys)  # no template: gender prompts
    assert "2 candidates" in err and "3 classes" in err and "--template" in err
    err = cli_error(ff.main, args[:4] + ["--image_column", "image", "--label_column", "label", "--data_config", "",
                                         "--out", str(tmp_path / "bad")], capsys)
    assert "no column(s) image" in err and "--image_column" in err
    assert not (tmp_path / "bad").exists()
