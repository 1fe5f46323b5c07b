"""diffusion_classifier.py as a script: the ELBO classifier on labelled images."""
from __future__ import annotations

import csv

import pytest

from bias_begets_bias.cli import InputError
from statistical_auditing import diffusion_classifier as dc
from statistical_auditing.core.stats import wilson_interval
from test_fairface import cli_error, fairface_csv_folder, tiny_sd_folder


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_parse_prune():
    assert dc.parse_prune("") == []
    assert dc.parse_prune("20:5, 50:1") == [(20, 5), (50, 1)]
    for bad in ("20", "20:5:1", "a:b"):
        with pytest.raises(InputError, match="--prune"):
            dc.parse_prune(bad)


@pytest.mark.smoke
def test_pixel_model_with_pruning(smoke_run, small_dataset, tmp_path, capsys):
    # in-process: the script's own subprocess start (torch + diffusers imports) would cost ~10 s of
    # the shared test budget; fairface.py and diff_prompts_same_score.py run as subprocesses
    out = tmp_path / "elbo"
    dc.main(["--model", str(smoke_run), "--data", str(small_dataset), "--kind", "sixclass", "--selection", "random",
             "--num_images", "4", "--n_samples", "4", "--prune", "2:1", "--out", str(out)])
    assert "accuracy" in capsys.readouterr().out
    (row,) = _rows(out / "summary.csv")
    # 2 candidates on the first 2 timesteps, then the 1 survivor on the other 2
    assert row["method"] == "elbo" and row["budget"] == "4" and float(row["evals_per_image"]) == 6
    predictions = _rows(out / "predictions.csv")
    assert len(predictions) == 4 and {p["label"] for p in predictions} <= {"male", "female"}
    # accuracy and its interval from the per-image predictions, computed independently
    correct = sum(p["predicted"] == p["label"] for p in predictions)
    assert float(row["accuracy"]) == pytest.approx(correct / 4)
    assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx(wilson_interval(correct, 4), abs=1e-6)
    assert all(sorted((p["p_male"], p["p_female"])) == ["0.0", "1.0"] for p in predictions)  # pruned -> 0


@pytest.mark.smoke
def test_stable_diffusion_on_fairface_csv(tmp_path_factory, tmp_path, capsys):
    model, data = tiny_sd_folder(tmp_path_factory), fairface_csv_folder(tmp_path_factory)
    out = tmp_path / "elbo"
    result = dc.main(["--model", str(model), "--data", str(data), "--resize", "16", "--num_images", "4",
                      "--n_samples", "2", "--loss", "huber", "--out", str(out)])
    assert result["classes"] == ["male", "female"] and result["row"]["n"] == 4
    assert result["row"]["evals_per_image"] == 4
    assert sum(map(sum, result["confusion"])) == 4
    assert "UNet evaluations" in capsys.readouterr().out
    # AUC of p(female) - p(male) by the pair count (Mann-Whitney), independently of stats.binary_auc
    predictions = _rows(out / "predictions.csv")
    margin = {i: float(p["p_female"]) - float(p["p_male"]) for i, p in enumerate(predictions)}
    female = [i for i, p in enumerate(predictions) if p["label"] == "female"]
    male = [i for i, p in enumerate(predictions) if p["label"] == "male"]
    if female and male:
        wins = sum((margin[f] > margin[m]) + 0.5 * (margin[f] == margin[m]) for f in female for m in male)
        assert result["row"]["auc"] == pytest.approx(wins / (len(female) * len(male)), abs=1e-6)
    err = cli_error(dc.main, ["--model", str(model), "--data", str(data), "--n_samples", "4", "--prune", "5:1",
                              "--out", str(tmp_path / "bad")], capsys)
    # (stderr may also hold transformers' "Loading weights" bar: one error line, and it is the last)
    assert err.splitlines()[-1].startswith("error: --prune '5:1': prune_schedule") and err.count("error:") == 1
