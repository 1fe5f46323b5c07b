"""diff_prompts_same_score.py: cosine heat-maps of noise predictions."""
from __future__ import annotations

import csv
import math

import pytest
import torch

from conftest import run_script
from statistical_auditing import diff_prompts_same_score as dp
from test_fairface import RecordingModel, cli_error, fairface_csv_folder, tiny_sd_folder

SCRIPT = "statistical_auditing/diff_prompts_same_score.py"


def test_cosine_matrix_by_hand():
    vectors = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [-2.0, 0.0]])
    c = dp.cosine_matrix(vectors)
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[1, r, 0, -1], [r, 1, 0, -r], [0, 0, 0, 0], [-1, -r, 0, 1]], dtype=torch.float64)
    assert torch.allclose(c, expected)
    assert dp.cosine_matrix(torch.rand(2, 3, 4, 5)).shape == (2, 3, 4, 4)  # batched over leading dims


def test_timestep_similarity_uses_each_prompts_own_predictions():
    # (B=1, T=2, P=2, D=2): prompt 0 points the same way at both timesteps, prompt 1 turns by 90 degrees
    predictions = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[2.0, 0.0], [0.0, 3.0]]]])
    by_prompt, by_timestep = dp.similarities(predictions)
    assert torch.allclose(by_timestep[0, 0], torch.ones(2, 2, dtype=torch.float64))
    assert torch.allclose(by_timestep[0, 1], torch.eye(2, dtype=torch.float64))
    assert torch.allclose(by_prompt[0, 0], torch.ones(2, 2, dtype=torch.float64))  # at t0 both prompts agree
    assert torch.allclose(by_prompt[0, 1], torch.eye(2, dtype=torch.float64))


def test_running_moments_match_torch():
    data = torch.randn(7, 3, 3, generator=torch.Generator().manual_seed(0))
    moments = dp.RunningMoments()
    moments.add(data[:4])
    moments.add(data[4:])
    assert moments.n == 7
    assert torch.allclose(moments.mean(), data.double().mean(0))
    assert torch.allclose(moments.std(), data.double().std(0))


def test_predictions_share_one_noise_across_timesteps_and_prompts():
    model = RecordingModel()
    x0 = torch.rand(2, 3, 4, 4)
    noise = torch.randn(2, 3, 4, 4)
    out = dp.batch_predictions(model, x0, noise, [0, 40], ["base", "a", "b"])
    assert out.shape == (2, 2, 3, 48)
    for x_t, t, conditions in model.calls:
        assert conditions == ["base", "a", "b"]
        assert torch.allclose(x_t, model.add_noise(x0, noise, t))
    assert [c[1].tolist() for c in model.calls] == [[0, 0], [40, 40]]


def test_short_labels():
    assert dp.short_labels(["person", "man"]) == ["person", "man"]
    labels = dp.short_labels(["photo of a person's face", "photo of a person's face, woman"], width=12)
    assert labels == ["…rson's face", "…face, woman"]  # the ends, where candidate prompts differ
    assert dp.short_labels(["x" * 30 + "abcd", "y" * 30 + "abcd"], width=5) == ["p0", "p1"]  # same ends


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.smoke
def test_stable_diffusion_heatmaps(tmp_path_factory, tmp_path):
    model, data = tiny_sd_folder(tmp_path_factory), fairface_csv_folder(tmp_path_factory)
    ks = tmp_path / "ks.txt"
    ks.write_text("# k from the clean end\n5\n50\n")
    out = tmp_path / "heat"
    run_script(SCRIPT, "--model", str(model), "--data", str(data), "--resize", "16", "--num_images", "3",
               "--timesteps_file", str(ks), "--out", str(out))
    rows = _rows(out / "prompt_similarity.csv")
    assert len(rows) == 2 * 3 * 3 and {r["n"] for r in rows} == {"3"}
    assert rows[1]["prompt_b"] == "photo of a person's face, man" and rows[0]["mean_cosine"] == "1.0"
    assert {r["timestep"] for r in rows} == {"5", "50"}  # SD's steps_offset 1 at 1000 steps: k -> t = k
    time_rows = _rows(out / "timestep_similarity.csv")
    assert len(time_rows) == 3 * 2 * 2
    assert all(abs(float(r["mean_cosine"])) <= 1 + 1e-9 for r in rows + time_rows)
    for name in ("prompt_similarity.png", "timestep_similarity_p0.png", "timestep_similarity_p2.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.smoke
def test_pixel_model_heatmaps_and_bad_k(smoke_run, small_dataset, tmp_path, capsys):
    out = tmp_path / "heat"
    result = dp.main(["--model", str(smoke_run), "--data", str(small_dataset), "--num_images", "2",
                      "--prompts", "person,man,woman,nurse", "--k_list", "5,500", "--out", str(out)])
    assert result["n"] == 2 and result["timesteps"] == {5: 4, 500: 499}
    mean = result["prompt_mean"]
    assert mean.shape == (2, 4, 4) and torch.allclose(mean, mean.transpose(1, 2))
    assert torch.allclose(mean.diagonal(dim1=1, dim2=2), torch.ones(2, 4, dtype=torch.float64))
    assert len(list(out.glob("timestep_similarity_p*.png"))) == 4
    err = cli_error(dp.main, ["--model", str(smoke_run), "--data", str(small_dataset), "--k_list", "0",
                              "--out", str(tmp_path / "bad")], capsys)
    assert err.startswith("error: --k_list") and err.count("\n") == 1
