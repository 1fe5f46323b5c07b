"""The benchmarks run end to end (they are not timed here: their numbers mean nothing in CI)."""
import csv

import pytest

from conftest import run_script


@pytest.mark.smoke
def test_train_throughput_runs_on_the_tiny_preset(tmp_path):
    out = tmp_path / "throughput.csv"
    result = run_script("bench/train_throughput.py", "--configs", "tiny", "--steps", "1", "--warmup", "0",
                        "--matmul_size", "64", "--matmul_reps", "1", "--out", str(out))
    rows = list(csv.DictReader(out.open()))
    assert [r["config"] for r in rows] == ["tiny"] and float(rows[0]["images_per_s"]) > 0
    assert "tiny" in result.stdout


@pytest.mark.heavy
def test_sd_time_per_image_on_the_sd21_architecture(tmp_path):
    """Builds the full-size SD 2.1 architecture (about 5 GB of fp32 weights)."""
    out = tmp_path / "sd.csv"
    run_script("bench/sd_time_per_image.py", "--resolution", "64", "--images", "1", "--warmup", "0",
               "--elbo_samples", "4", "--elbo_timed", "1", "--out", str(out), timeout=1800)
    rows = {r["method"]: r for r in csv.DictReader(out.open())}
    assert int(rows["scoredecomp"]["unet_evals_per_image"]) == 3 and int(rows["elbo"]["unet_evals_per_image"]) == 8
    assert int(rows["scoredecomp"]["unet_parameters"]) == 865_910_724
