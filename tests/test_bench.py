"""The benchmarks run end to end (they are not timed here: their numbers mean nothing in CI)."""
import csv
import sys

import pytest

from conftest import REPO, run_script


@pytest.mark.smoke
def test_train_throughput_runs_on_the_tiny_preset(tmp_path):
    out = tmp_path / "throughput.csv"
    result = run_script("bench/train_throughput.py", "--configs", "tiny", "--steps", "1", "--warmup", "0",
                        "--matmul_size", "64", "--matmul_reps", "1", "--out", str(out))
    rows = list(csv.DictReader(out.open()))
    assert [r["config"] for r in rows] == ["tiny"]
    row = {k: float(v) for k, v in rows[0].items() if k in NUMBERS}
    # the rates are the recorded work over the recorded median step time of the same row
    assert (row["batch"], row["steps"]) == (32, 1) and row["min_s"] <= row["median_s"] <= row["max_s"]
    assert row["images_per_s"] == pytest.approx(row["batch"] / row["median_s"], rel=1e-9)
    assert row["gflop_per_s"] == pytest.approx(row["gflop_per_step"] / row["median_s"], rel=1e-9)
    assert row["fraction_of_peak"] == pytest.approx(row["gflop_per_s"] / row["peak_gflop_per_s"], rel=1e-9)
    assert "tiny" in result.stdout


NUMBERS = ("batch", "steps", "min_s", "median_s", "max_s", "images_per_s", "gflop_per_step", "gflop_per_s",
           "fraction_of_peak", "peak_gflop_per_s")


def test_step_flops_of_one_convolution_by_hand(monkeypatch):
    """A 3x3 convolution, 3 -> 3 channels, no bias, on a batch of 2 at 8x8: the forward is
    2 * (2 * 8 * 8) * 3 * (3 * 3 * 3) = 20,736 FLOPs (a multiply and an add per weight and output
    pixel); the backward computes only the weight gradient (the input needs none), as many again."""
    from torch import nn

    from bias_begets_bias.modules import UNetConfig

    sys.path.insert(0, str(REPO / "bench"))
    import train_throughput

    class OneConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)

        def forward(self, x, t, words):
            return self.conv(x)

    config = UNetConfig(image_size=8)
    monkeypatch.setattr(train_throughput, "build", lambda variant: (config, OneConv()))
    assert train_throughput.step_flops("tiny", 2) == 2 * 20_736


@pytest.mark.heavy
def test_sd_time_per_image_on_the_sd21_architecture(tmp_path):
    """Builds the full-size SD 2.1 architecture (about 5 GB of fp32 weights)."""
    out = tmp_path / "sd.csv"
    run_script("bench/sd_time_per_image.py", "--resolution", "64", "--images", "1", "--warmup", "0",
               "--elbo_samples", "4", "--elbo_timed", "1", "--out", str(out), timeout=1800)
    rows = {r["method"]: r for r in csv.DictReader(out.open())}
    assert int(rows["scoredecomp"]["unet_evals_per_image"]) == 3 and int(rows["elbo"]["unet_evals_per_image"]) == 8
    assert int(rows["scoredecomp"]["unet_parameters"]) == 865_910_724
