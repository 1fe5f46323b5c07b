import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, kill_when_paused, run_script
from diffusion_from_scratch import ddpm_conditional
from bias_begets_bias.cli import InputError, config_from_constants
from diffusion_from_scratch.ddpm_conditional import (PRESETS, constants_of, epoch_plan, lr_scheduler, lr_scheduler_at,
                                                     prepare_run, shard_of, step_scheduler, training_target,
                                                     validation_loss, validation_words)
from bias_begets_bias.pipeline import min_snr_weight, train_scheduler, training_timesteps
from bias_begets_bias.utils import DATA_DIR, load_class_words, load_split, resolve_recorded_path, training_vocabulary

SCRIPT = "diffusion_from_scratch/ddpm_conditional.py"


def test_class_words_are_the_readme_table():
    assert load_class_words() == {
        "man": ["man", "person", "man"], "woman": ["woman", "person", "woman"],
        "male_nurse": ["man", "nurse", "person"], "female_nurse": ["woman", "nurse", "person"],
        "male_phil": ["man", "philosopher", "person"], "female_phil": ["woman", "philosopher", "person"]}
    assert set(json.loads((DATA_DIR / "prompts.json").read_text())) == set(load_class_words())


@pytest.mark.parametrize("order", ["consecutive", "shuffled"])
def test_every_image_is_trained_once_per_word_of_its_class(order):
    class_words = load_class_words()
    vocabulary = training_vocabulary(class_words)
    word_ids = [[vocabulary.index(w) for w in ws] for ws in class_words.values()]
    labels = torch.arange(6).repeat_interleave(5)  # 5 images per class
    steps = epoch_plan(labels, word_ids, 4, order, seed=1, epoch=0)
    pairs = sorted((int(i), int(w)) for images, words in steps for i, w in zip(images, words))
    expected = sorted((i, w) for i, c in enumerate(labels.tolist()) for w in word_ids[c])
    assert pairs == expected
    if order == "consecutive":  # three consecutive steps on the same images, word j of each class at step j
        for j in range(3):
            images, words = steps[j]
            assert torch.equal(images, steps[0][0])
            assert words.tolist() == [word_ids[int(labels[i])][j] for i in images]
    assert epoch_plan(labels, word_ids, 4, order, 1, 0)[0][0].tolist() == steps[0][0].tolist()  # deterministic


# ----------------------------------------------------------------------------- learning-rate schedules
def schedule_trace(cfg: dict, total: int) -> list[tuple[float, float]]:
    """(lr, AdamW beta1) at each optimizer step 0..total-1 of the training loop's schedule."""
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    scheduler = lr_scheduler(optimizer, cfg, total)
    trace = []
    for _ in range(total):
        group = optimizer.param_groups[0]
        trace.append((group["lr"], group["betas"][0]))
        assert scheduler.get_last_lr()[0] == group["lr"]
        optimizer.step()
        step_scheduler(scheduler)
    return trace


def test_onecycle_lr_and_beta1_by_hand():
    """OneCycleLR(max_lr 1e-4), torch's defaults: initial 1e-4/25 = 4e-6, final 4e-6/1e4 = 4e-10;
    the first phase ends at step a = 0.3 total - 1; beta1 goes 0.95 -> 0.85 -> 0.95 on the same
    phases. Halfway through a phase the cosine gives the mean of its two ends."""
    cfg = {"lr": 1e-4, "lr_schedule": "onecycle", "warmup_steps": 0}
    trace = schedule_trace(cfg, 30)  # a = 8; the second phase runs 8 -> 29
    assert trace[0] == pytest.approx((4e-6, 0.95), rel=1e-9)
    assert trace[4] == pytest.approx(((4e-6 + 1e-4) / 2, 0.90), rel=1e-9)  # 5.2e-5
    assert trace[8] == pytest.approx((1e-4, 0.85), rel=1e-9)
    assert trace[29] == pytest.approx((4e-10, 0.95), rel=1e-9)
    # a quarter into the first phase: cos(pi/4) = 0.70711 -> lr = 1e-4 + (4e-6 - 1e-4)(1 + 0.70711)/2
    assert trace[2] == pytest.approx((1.8059e-5, 0.93536), rel=1e-4)
    trace = schedule_trace(cfg, 20)  # a = 5; the second phase runs 5 -> 19, halfway at 12
    assert trace[12] == pytest.approx(((1e-4 + 4e-10) / 2, 0.90), rel=1e-9)  # 5.0002e-5


def test_cosine_and_constant_schedules_by_hand():
    cfg = {"lr": 1e-3, "lr_schedule": "cosine", "warmup_steps": 4}
    lrs = [lr for lr, _ in schedule_trace(cfg, 12)]  # warm-up (s + 1) / 4, then cosine over 12 - 4 = 8 steps
    expected = {0: 2.5e-4, 1: 5e-4, 3: 1e-3, 4: 1e-3, 6: 8.535534e-4, 8: 5e-4, 11: 3.806023e-5}
    assert {s: lrs[s] for s in expected} == pytest.approx(expected, rel=1e-6)
    assert all(beta1 == 0.9 for _, beta1 in schedule_trace(cfg, 12))  # only onecycle moves beta1
    no_warmup = [lr for lr, _ in schedule_trace(cfg | {"warmup_steps": 0}, 4)]
    assert no_warmup == pytest.approx([1e-3, 8.535534e-4, 5e-4, 1.464466e-4], rel=1e-6)
    assert [lr for lr, _ in schedule_trace(cfg | {"lr_schedule": "constant"}, 5)] == [1e-3] * 5


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_schedule_state_round_trips_through_json_and_replay(schedule):
    """A scheduler restored from its JSON state_dict, or replayed to the step, continues as one never stopped."""
    cfg = {"lr": 1e-3, "lr_schedule": schedule, "warmup_steps": 3}
    full = schedule_trace(cfg, 20)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    scheduler = lr_scheduler(optimizer, cfg, 20)
    for _ in range(7):
        optimizer.step()
        step_scheduler(scheduler)
    saved_state, saved_groups = json.loads(json.dumps(scheduler.state_dict())), json.loads(json.dumps(
        optimizer.state_dict()["param_groups"]))
    for restore in ("state_dict", "replay"):
        fresh_model = torch.nn.Linear(1, 1)
        fresh = torch.optim.AdamW(fresh_model.parameters(), lr=cfg["lr"])
        resumed = lr_scheduler(fresh, cfg, 20)
        fresh.load_state_dict({"state": {}, "param_groups": saved_groups})
        if restore == "state_dict":
            resumed.load_state_dict(saved_state)
        else:
            resumed = lr_scheduler_at(fresh, cfg, 20, 7)
        for step in range(7, 20):
            group = fresh.param_groups[0]
            assert (group["lr"], group["betas"][0]) == pytest.approx(full[step], rel=1e-12), (restore, step)
            fresh.step()
            step_scheduler(resumed)


# ----------------------------------------------------------------------------- loss pieces
def test_v_prediction_target_by_hand():
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0; linear betas: abar_0 = 1 - 1e-4,
    abar_1 = (1 - 1e-4)(1 - beta_1) with beta_1 = 1e-4 + (0.02 - 1e-4) / 999."""
    scheduler = train_scheduler(1000, "linear", "v_prediction")
    abar0 = 1 - 1e-4
    abar1 = abar0 * (1 - (1e-4 + (0.02 - 1e-4) / 999))
    x0, eps = torch.tensor([[0.5], [-1.0]]), torch.tensor([[2.0], [0.25]])
    v = training_target(scheduler, x0, eps, torch.tensor([0, 1]), "v_prediction")
    expected = [math.sqrt(abar0) * 2.0 - math.sqrt(1 - abar0) * 0.5, math.sqrt(abar1) * 0.25 + math.sqrt(1 - abar1)]
    assert v.flatten().tolist() == pytest.approx(expected, abs=3e-6)  # float32: 1 - abar_1 = 2.2e-4 keeps 4 digits
    assert torch.equal(training_target(scheduler, x0, eps, torch.tensor([0, 1]), "epsilon"), eps)
    assert torch.equal(training_target(scheduler, x0, eps, torch.tensor([0, 1]), "sample"), x0)


def test_min_snr_weights_by_hand():
    """abar = 0.5, 0.8, 0.99 -> SNR = abar / (1 - abar) = 1, 4, 99; gamma 5 clips them to 1, 4, 5."""
    abar, t = torch.tensor([0.5, 0.8, 0.99], dtype=torch.float64), torch.arange(3)
    assert min_snr_weight(abar, t, 5.0, "epsilon").tolist() == pytest.approx([1, 1, 5 / 99])
    assert min_snr_weight(abar, t, 5.0, "v_prediction").tolist() == pytest.approx([1 / 2, 4 / 5, 5 / 100])
    assert min_snr_weight(abar, t, 5.0, "sample").tolist() == pytest.approx([1, 4, 5])
    assert min_snr_weight(abar, t, 0.0, "epsilon").tolist() == [1, 1, 1]


def test_timestep_shift_quantiles_by_hand():
    """u' = s u / (1 + (s - 1) u) is increasing, so P(u' < x) = P(u < x / (s - (s - 1) x)):
    s = 3 gives P(t < 500) = 0.5 / 2 = 1/4 and P(t >= 750) = 1 - 0.75 / 1.5 = 1/2 (uniform: 1/2
    and 1/4); s = 1 draws exactly what torch.randint draws (the runs made before the setting)."""
    n = 200_000
    t = training_timesteps(n, 0, 1000, 3.0, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
    assert float((t < 500).double().mean()) == pytest.approx(0.25, abs=0.004)  # 4 binomial sd
    assert float((t >= 750).double().mean()) == pytest.approx(0.5, abs=0.005)
    low = training_timesteps(n, 1, 1000, 1 / 3, torch.Generator().manual_seed(0))  # s < 1: toward low noise
    assert int(low.min()) >= 1 and float((low < 500).double().mean()) == pytest.approx(0.75, abs=0.004)
    same = training_timesteps(64, 1, 1000, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(same, torch.randint(1, 1000, (64,), generator=torch.Generator().manual_seed(5)))


def test_shards_weight_every_sample_by_world_over_n():
    """n = 5 on 2 processes: ranks hold 0, 2, 4 and 1, 3, each weighted 2/5, so that DDP's average
    (1/2)(sum of both) is the mean over the 5; n = 1: rank 1 gets a zero-weighted stand-in."""
    (a, wa), (b, wb) = shard_of(5, 0, 2), shard_of(5, 1, 2)
    assert a.tolist() == [0, 2, 4] and b.tolist() == [1, 3]
    assert wa.tolist() == pytest.approx([0.4] * 3) and wb.tolist() == pytest.approx([0.4] * 2)
    (a, wa), (b, wb) = shard_of(1, 0, 2), shard_of(1, 1, 2)
    assert (a.tolist(), wa.tolist(), b.tolist(), wb.tolist()) == ([0], [2.0], [0], [0.0])
    indices, weights = shard_of(4, 0, 1)
    assert indices.tolist() == [0, 1, 2, 3] and weights.tolist() == [0.25] * 4


def test_validation_loss_weights_chunks_by_their_size():
    """Per-image losses 1, 1, 1, 4, 4 scored in chunks of 3 (mean 1) and 2 (mean 4): the mean over
    the five images is 11/5 = 2.2, not the mean of the chunk means (2.5)."""
    losses = torch.tensor([1.0, 1.0, 1.0, 4.0, 4.0])
    starts = []

    def chunk_loss(indices, start):
        starts.append(start)
        return float(losses[indices].mean())

    assert validation_loss(chunk_loss, 5, chunk=3) == pytest.approx(2.2)
    assert starts == [0, 3]


def test_validation_words_cycle_through_each_class_words():
    """Image i of the held-out set (class c) gets word i mod len(words of c): 0%3, 1%3, 2%2, 3%2, 4%3, 5%2."""
    word_ids = [[0, 1, 0], [2, 1]]
    assert validation_words(torch.tensor([0, 0, 1, 1, 0, 1]), word_ids).tolist() == [0, 1, 2, 1, 1, 1]


def test_train_and_test_splits_are_disjoint_and_loaded_as_such(small_dataset):
    """conftest's set: 10 images per class, test_fraction 0.2 -> 8 train + 2 test per class, and no
    image index in both."""
    classes = list(load_class_words())
    for split, per_class in (("train", 8), ("test", 2)):
        _, labels = load_split(small_dataset, split, classes, 32)
        assert torch.bincount(labels).tolist() == [per_class] * 6
    for name in classes:
        train = {p.name for p in (small_dataset / "train" / name).iterdir()}
        test = {p.name for p in (small_dataset / "test" / name).iterdir()}
        assert len(train) == 8 and len(test) == 2 and not train & test


def test_validation_row_is_the_loss_over_every_test_image(smoke_run, small_dataset):
    """Recompute the last validation row by hand from the saved weights: all 12 test images (the
    test split, not the training one), word i mod 3 of each class, one draw from the 'val' seed,
    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, target v = sqrt(abar) eps - sqrt(1 - abar) x0."""
    from bias_begets_bias.modules import ConditionalUNet, UNetConfig
    from bias_begets_bias.utils import derived_seed

    config = json.loads((smoke_run / "config.json").read_text())
    latest = smoke_run / "checkpoints" / (smoke_run / "checkpoints/latest").read_text().strip()
    tensors = load_file(str(latest / "state.safetensors"))
    table = load_file(str(smoke_run / "conditioning.safetensors"))["word_table"]
    model = ConditionalUNet(UNetConfig(**config["unet"]), table)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    model.eval()
    classes = config["classes"]
    images, labels = load_split(small_dataset, "test", classes, 32)
    assert len(images) == 12
    words = [config["words"].index(config["class_words"][classes[c]][i % 3]) for i, c in enumerate(labels.tolist())]
    g = torch.Generator().manual_seed(derived_seed(config["train"]["seed"], "val", 0))
    x0 = images.float() / 127.5 - 1
    t = torch.randint(0, 1000, (12,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    abar = train_scheduler(1000, "squaredcos_cap_v2", "v_prediction").alphas_cumprod[t].double()[:, None, None, None]
    x_t = (abar.sqrt() * x0 + (1 - abar).sqrt() * eps).float()
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    with torch.no_grad():
        out = model(x_t, t, table[torch.tensor(words)])
    expected = float(((out.double() - v) ** 2).mean())
    rows = list(csv.DictReader((smoke_run / "metrics.csv").open()))
    assert float([r for r in rows if r["val_loss"]][-1]["val_loss"]) == pytest.approx(expected, abs=5e-6)


# ----------------------------------------------------------------------------- presets and the run folder
def test_paper_preset_is_the_original_configuration():
    cfg = constants_of(vars(ddpm_conditional)) | PRESETS["paper"]
    assert (cfg["image_size"], cfg["batch_size"], cfg["epochs"], cfg["lr"], cfg["adam_eps"]) == (64, 50, 81, 1e-4, 1e-5)
    assert (cfg["ema_beta"], cfg["ema_warmup"], cfg["cond_dropout"]) == (0.995, 2000, 0.05)
    assert (cfg["prediction"], cfg["beta_schedule"], cfg["pair_order"]) == ("epsilon", "linear", "consecutive")
    assert (cfg["lr_schedule"], cfg["min_timestep"], cfg["ddpm_variance"], cfg["timestep_shift"]) == \
        ("onecycle", 1, "beta", 1.0)
    assert (cfg["sampler"], cfg["sample_steps"]) == ("ddpm", 1000)
    tiny = constants_of(vars(ddpm_conditional))
    assert (tiny["min_timestep"], tiny["ddpm_variance"]) == (0, "posterior")
    model = ddpm_conditional.ConditionalUNet(ddpm_conditional.unet_config(cfg))
    assert sum(p.numel() for p in model.parameters()) == 23_332_739


def test_smoke_run_writes_the_run_folder(smoke_run):
    from bias_begets_bias.pipeline import sha256_hex

    config = json.loads((smoke_run / "config.json").read_text())
    assert config["words"] == ["man", "person", "woman", "nurse", "philosopher"]
    assert (config["min_timestep"], config["ddpm_variance"]) == (0, "posterior")
    assert config["conditioning_sha256"] == sha256_hex((smoke_run / "conditioning.safetensors").read_bytes())
    for name in ("metrics.csv", "loss.png", "conditioning.safetensors", "checkpoints/latest"):
        assert (smoke_run / name).exists(), name
    assert list((smoke_run / "samples").glob("*.png"))
    latest = (smoke_run / "checkpoints" / (smoke_run / "checkpoints/latest").read_text().strip())
    tensors = load_file(str(latest / "state.safetensors"))
    assert any(k.startswith("ema.") for k in tensors) and any(k.startswith("optim.") for k in tensors)
    state = json.loads((latest / "state.json").read_text())
    assert state["step"] == 6 and state["sha256"] == sha256_hex((latest / "state.safetensors").read_bytes())
    assert state["lr_scheduler"]["last_epoch"] == 6 and state["grad_scaler"] is None  # fp32 on the CPU
    conditioning = load_file(str(smoke_run / "conditioning.safetensors"))
    assert conditioning["jl_matrix"].shape == (300, 128) and conditioning["word_table"].shape == (5, 128)
    umask = os.umask(0)
    os.umask(umask)
    for path in (smoke_run / "config.json", latest / "state.json", latest / "state.safetensors",
                 smoke_run / "samples" / next(p.name for p in (smoke_run / "samples").iterdir())):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path  # the user's umask, not mkstemp's 0600


def test_training_loop_applies_onecycle_lr_and_beta1(tmp_path, small_dataset):
    """6 steps of onecycle at lr 1e-3: a = 0.3 * 6 - 1 = 0.8, so lr_0 = 1e-3/25 = 4e-5 and lr_s for s >= 1
    = 1e-3/25e4 + (1e-3 - 1e-3/25e4)(1 + cos(pi (s - 0.8) / 4.2)) / 2; beta1 after 3 steps is
    0.85 + 0.1 (1 - cos(pi 2.2 / 4.2)) / 2 (its value for step 3, saved in the step-3 checkpoint)."""
    run = tmp_path / "run"
    ddpm_conditional.main(["--preset", "smoke", "--dataset_path", str(small_dataset), "--run_dir", str(run),
                           "--num_threads", "1", "--lr_schedule", "onecycle", "--sample_every", "0",
                           "--keep_checkpoints", "5"])
    low = 1e-3 / 25 / 1e4
    expected = [4e-5] + [low + (1e-3 - low) * (1 + math.cos(math.pi * (s - 0.8) / 4.2)) / 2 for s in range(1, 6)]
    logged = [float(r["lr"]) for r in csv.DictReader((run / "metrics.csv").open()) if r["lr"]]
    assert logged == pytest.approx(expected, rel=2e-3)  # logged with 4 significant digits
    groups = json.loads((run / "checkpoints/step-00000003/state.json").read_text())["optimizer"]["param_groups"]
    assert groups[0]["betas"][0] == pytest.approx(0.85 + 0.1 * (1 - math.cos(math.pi * 2.2 / 4.2)) / 2, rel=1e-9)


def final_weights(run_dir: Path) -> dict:
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints/latest").read_text().strip()
    return load_file(str(latest / "state.safetensors"))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# The training script, paused for good right after it first points checkpoints/latest at a
# checkpoint. It says "paused" on stdout, and only then is it killed: the kill lands at the same
# point whatever the machine's speed.
PAUSED_TRAINING = """
import os, runpy, signal, sys
real_replace = os.replace
def replace_then_pause(source, target, *args, **kwargs):
    real_replace(source, target, *args, **kwargs)
    if os.path.basename(target) == "latest":
        print("paused", flush=True)
        while True:
            signal.pause()
os.replace = replace_then_pause
sys.argv = ["ddpm_conditional.py"] + sys.argv[1:]
runpy.run_path("diffusion_from_scratch/ddpm_conditional.py", run_name="__main__")
"""


@pytest.mark.smoke
def test_kill_9_then_bare_resume_gives_the_same_weights(tmp_path, small_dataset):
    """SIGKILL mid-run, then `--run_dir X --resume true` alone: the saved run's settings (24 steps
    over an epoch boundary at 18, a checkpoint every 3, no sample grids) continue, and the final
    tensors are bit-identical."""
    common = ["--preset", "smoke", "--dataset_path", str(small_dataset), "--epochs", "2", "--max_steps", "24",
              "--checkpoint_every", "3", "--num_threads", "1", "--sample_every", "0", "--keep_checkpoints", "3"]
    straight = tmp_path / "straight"
    run_script(SCRIPT, *common, "--run_dir", str(straight))
    killed = tmp_path / "killed"
    paused = kill_when_paused(PAUSED_TRAINING, [*common, "--run_dir", str(killed)], tmp_path / "stderr.txt")
    assert paused, "the run ended without pausing:\n" + (tmp_path / "stderr.txt").read_text()[-3000:]
    stopped_at = int((killed / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert stopped_at == 3  # the first checkpoint
    result = run_script(SCRIPT, "--run_dir", str(killed), "--resume", "true")
    assert f"step {stopped_at} of 24" in result.stdout and "the saved run has" not in result.stdout
    assert_same_tensors(final_weights(straight), final_weights(killed))
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == \
        sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert (killed / "metrics.csv").read_text().count("\n") == (straight / "metrics.csv").read_text().count("\n")


def test_resume_after_the_last_checkpoint_redoes_the_end_of_run_work(tmp_path, smoke_run):
    """A kill between the final checkpoint and the end-of-run work: resume writes the validation
    row, the loss plot and the final grid (the same ones), not 'trained 0 steps'."""
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    metrics = (run / "metrics.csv").read_text()
    grids = {p.name: p.read_bytes() for p in (run / "samples").iterdir()}
    (run / "metrics.csv").write_text("".join(line for line in metrics.splitlines(keepends=True)
                                             if not line.startswith("6,0,,,")))
    final_grid = sorted(grids)[-1]
    (run / "samples" / final_grid).unlink()
    (run / "loss.png").unlink()
    ddpm_conditional.main(["--run_dir", str(run), "--resume", "true"])
    assert (run / "metrics.csv").read_text().splitlines()[-1].split(",")[:6] == \
        metrics.splitlines()[-1].split(",")[:6]
    assert (run / "samples" / final_grid).read_bytes() == grids[final_grid]
    assert (run / "loss.png").is_file()
    ddpm_conditional.main(["--run_dir", str(run), "--resume", "true"])  # nothing left to do: no second row
    without_seconds = lambda text: [line.split(",")[:6] for line in text.splitlines()]  # noqa: E731
    assert without_seconds((run / "metrics.csv").read_text()) == without_seconds(metrics)


def settings(*argv: str) -> tuple[dict, set]:
    return config_from_constants(constants_of(vars(ddpm_conditional)), PRESETS, list(argv),
                                 choices=ddpm_conditional.CHOICES, return_explicit=True)


def test_bare_resume_takes_the_saved_settings_and_prints_explicit_changes(tmp_path, smoke_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    cfg, checkpoint, changes = prepare_run(*settings("--run_dir", str(run), "--resume", "true"))
    saved = json.loads((run / "config.json").read_text())["train"]
    assert checkpoint.name == "step-00000006" and changes == {}
    assert {k: cfg[k] for k in ("epochs", "max_steps", "checkpoint_every", "sample_every", "keep_checkpoints",
                                "batch_size", "widths", "preset")} == \
        {k: saved[k] for k in ("epochs", "max_steps", "checkpoint_every", "sample_every", "keep_checkpoints",
                               "batch_size", "widths", "preset")}
    assert (cfg["max_steps"], cfg["widths"]) == (6, "8,16,16,16")  # smoke's, not the script's defaults
    capsys.readouterr()
    cfg, _, changes = prepare_run(*settings("--run_dir", str(run), "--resume", "true", "--max_steps", "9",
                                            "--epochs", "1"))
    assert cfg["max_steps"] == 9 and changes == {"max_steps": (6, 9)}
    assert "--max_steps: the saved run has 6; using 9" in capsys.readouterr().out
    with pytest.raises(InputError, match="--lr differ from the saved run"):
        prepare_run(*settings("--run_dir", str(run), "--resume", "true", "--lr", "0.5"))
    with pytest.raises(InputError, match="--preset differ"):
        prepare_run(*settings("--run_dir", str(run), "--resume", "true", "--preset", "paper"), preset_given=True)


def test_a_run_saved_before_a_setting_existed_resumes_doing_what_it_did(tmp_path, smoke_run, monkeypatch):
    """A config.json without timestep_shift / min_timestep / ddpm_variance / bottleneck_cond was trained
    with uniform timesteps from 0, the posterior variance and an unconditioned bottleneck: a resume
    keeps that, whatever the defaults are now."""
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    record = json.loads((run / "config.json").read_text())
    for key in ("timestep_shift", "min_timestep", "ddpm_variance", "bottleneck_cond"):
        record["train"].pop(key)
    (run / "config.json").write_text(json.dumps(record))
    monkeypatch.setattr(ddpm_conditional, "TIMESTEP_SHIFT", 2.0)
    monkeypatch.setattr(ddpm_conditional, "MIN_TIMESTEP", 1)
    monkeypatch.setattr(ddpm_conditional, "BOTTLENECK_COND", True)
    cfg, checkpoint, changes = prepare_run(*settings("--run_dir", str(run), "--resume", "true"))
    assert checkpoint is not None and changes == {}
    assert (cfg["timestep_shift"], cfg["min_timestep"], cfg["ddpm_variance"], cfg["bottleneck_cond"]) == \
        (1.0, 0, "posterior", False)


def test_explicit_longer_run_continues_and_is_recorded(tmp_path, smoke_run):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    ddpm_conditional.main(["--run_dir", str(run), "--resume", "true", "--max_steps", "8", "--sample_every", "0"])
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["max_steps"] == 8 and config["resumes"] == [{"step": 6, "changed": {"max_steps": 8,
                                                                                                "sample_every": 0}}]
    assert json.loads((run / "checkpoints/step-00000008/state.json").read_text())["lr_scheduler"]["last_epoch"] == 8
    with pytest.raises(InputError, match="already at step 8"):
        ddpm_conditional.main(["--run_dir", str(run), "--resume", "true", "--max_steps", "7"])


@pytest.mark.smoke
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, small_dataset):
    """144 (image, word) pairs in batches of 13: 11 steps split 7 + 6 and a last step of one pair,
    which leaves process 1 an empty share. Every step's logged loss (the global batch mean) must
    equal the one-process run's, and so must the validation row (all 12 test images, not process
    0's half). The weights after 12 AdamW steps agree to a relative L2 distance of 1e-3: gloo's
    all-reduce sums in another order, and AdamW's m / sqrt(v) turns those last-bit differences on
    near-zero gradients into steps of up to lr (measured here: 4e-5; weighting each process's mean
    equally instead, the old code's, gives 6e-3 and a last-step loss of 0.26 instead of 0.52)."""
    common = ["--preset", "smoke", "--dataset_path", str(small_dataset), "--max_steps", "12", "--batch_size", "13",
              "--num_threads", "1", "--device", "cpu", "--sample_every", "0", "--checkpoint_every", "100"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_script(SCRIPT, *common, "--run_dir", str(one))
    result = subprocess.run(
        # --multi_gpu only selects accelerate's torchrun launcher; --device cpu makes the processes use gloo
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / SCRIPT), *common, "--run_dir", str(two)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((two / "config.json").read_text())["processes"] == 2
    rows = [list(csv.DictReader((run / "metrics.csv").open())) for run in (one, two)]
    assert len(rows[0]) == len(rows[1]) == 13
    for a, b in zip(*rows):
        for column in ("train_loss", "val_loss", "val_loss_ema"):
            assert (a[column] == "") == (b[column] == "")
            if a[column]:
                assert float(b[column]) == pytest.approx(float(a[column]), abs=1e-5), (a["step"], column)
    a, b = final_weights(one), final_weights(two)
    for prefix in ("model.", "ema."):
        keys = [k for k in a if k.startswith(prefix)]
        distance = math.sqrt(sum(float((a[k].double() - b[k].double()).norm()) ** 2 for k in keys))
        norm = math.sqrt(sum(float(a[k].double().norm()) ** 2 for k in keys))
        assert distance <= 1e-3 * norm, (prefix, distance / norm)


# ----------------------------------------------------------------------------- bad input
def run_main(tmp_path, dataset, *extra):
    return ddpm_conditional.main(["--preset", "smoke", "--dataset_path", str(dataset), "--run_dir",
                                  str(tmp_path / "run"), "--num_threads", "1", *extra])


def copy_dataset(small_dataset, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(small_dataset, copy)
    return copy


def test_misplaced_dataset_is_named(tmp_path, small_dataset):
    with pytest.raises(InputError, match="train does not exist"):
        run_main(tmp_path, small_dataset.parent)  # the root instead of <root>/<size>
    assert not (tmp_path / "run").exists()


def test_class_folders_must_match_class_words(tmp_path, small_dataset):
    data = copy_dataset(small_dataset, tmp_path)
    (data / "train" / "man").rename(data / "train" / "men")
    with pytest.raises(InputError, match=r"missing: \['man'\], unexpected: \['men'\]"):
        run_main(tmp_path, data)


def test_empty_class_and_corrupt_image_are_named(tmp_path, small_dataset):
    data = copy_dataset(small_dataset, tmp_path)
    for image in (data / "test" / "woman").iterdir():
        image.unlink()
    with pytest.raises(InputError, match="woman has no images"):
        run_main(tmp_path, data)
    data = copy_dataset(small_dataset, tmp_path / "b")
    broken = sorted((data / "train" / "male_phil").iterdir())[0]
    broken.write_bytes(b"not a png")
    with pytest.raises(InputError, match=str(broken)):
        run_main(tmp_path, data)


def test_incomplete_generated_dataset_is_refused_with_the_command_that_finishes_it(tmp_path, small_dataset):
    root = tmp_path / "portraits"
    shutil.copytree(small_dataset.parent, root)
    (root / "manifest.jsonl").rename(tmp_path / "manifest.jsonl")
    with pytest.raises(InputError, match=r"incomplete .*synthetic_data.py --out .*portraits --source procedural "
                                         r"--per_class 10 --test_fraction 0.2"):
        run_main(tmp_path, root / "32")
    (tmp_path / "manifest.jsonl").rename(root / "manifest.jsonl")
    next((root / "32" / "train" / "woman").iterdir()).unlink()
    with pytest.raises(InputError, match=r"train/woman: 7 found, 8 listed.*synthetic_data.py"):
        run_main(tmp_path, root / "32")
    assert not (tmp_path / "run").exists()


def test_unbalanced_own_data_needs_the_override(tmp_path, small_dataset):
    data = copy_dataset(small_dataset, tmp_path)  # the size folder alone: no dataset.json, a user's own data
    for image in sorted((data / "train" / "male_nurse").iterdir())[:4]:
        image.unlink()
    with pytest.raises(InputError, match=r"unbalanced \(man 8, .*male_nurse 4.*--class_balance 0"):
        run_main(tmp_path, data)
    assert not (tmp_path / "run").exists()
    run_main(tmp_path, data, "--class_balance", "0", "--max_steps", "1", "--sample_every", "0")


def test_word_missing_from_the_embedding(tmp_path, small_dataset):
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("4 3\nman 1 0 0\nwoman 0 1 0\nperson 0 0 1\nnurse 1 1 0\n")
    with pytest.raises(InputError, match="philosopher"):
        run_main(tmp_path, small_dataset, "--embedding", str(vectors))


def test_nan_loss_stops_with_a_true_message_and_the_folder_accepts_the_fix(tmp_path, small_dataset):
    with pytest.raises(InputError, match=r"loss became (nan|inf) at step \d, before any checkpoint"):
        run_main(tmp_path, small_dataset, "--lr", "1e30", "--grad_clip", "0", "--warmup_steps", "1")
    assert (tmp_path / "run" / "config.json").is_file()  # the failed start's record ...
    run_main(tmp_path, small_dataset, "--max_steps", "1", "--sample_every", "0")  # ... does not block the fix
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr"] == 1e-3
    with pytest.raises(InputError, match="loss became nan"):
        run_main(tmp_path / "b", small_dataset, "--lr", "1e30", "--grad_clip", "0", "--warmup_steps", "1")
    run_main(tmp_path / "b", small_dataset, "--resume", "true", "--lr", "1e-3", "--max_steps", "1")  # or with resume


@pytest.mark.parametrize("flag, value", [("keep_checkpoints", "0"), ("ema_beta", "2"), ("guidance", "nan"),
                                         ("max_steps", "-5"), ("sample_steps", "5000"), ("min_timestep", "1000"),
                                         ("lr", "inf"), ("seed", "-1")])
def test_bad_numbers_are_refused_before_anything_is_written(tmp_path, small_dataset, flag, value):
    with pytest.raises(InputError, match=f"--{flag}"):
        run_main(tmp_path, small_dataset, f"--{flag}", value)
    assert not (tmp_path / "run").exists()


def test_unstartable_logger_leaves_a_folder_that_accepts_the_fix(tmp_path, small_dataset, monkeypatch):
    import wandb

    def refuse(*args, **kwargs):
        raise RuntimeError("no network\nat all")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(InputError, match=r"--wandb offline: Weights & Biases could not start \(RuntimeError: no "
                                         r"network at all\); rerun with --wandb off"):
        run_main(tmp_path, small_dataset, "--wandb", "offline")
    run_main(tmp_path, small_dataset, "--max_steps", "1", "--sample_every", "0")


def test_existing_run_is_not_overwritten_and_corrupt_checkpoints_are_refused(tmp_path, smoke_run):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # config.json records the dataset relative to the repository, else to the run folder
    dataset = str(resolve_recorded_path(json.loads((run / "config.json").read_text())["dataset_path"], run))
    with pytest.raises(InputError, match="already holds a run"):
        run_main(tmp_path, dataset)
    latest = run / "checkpoints" / (run / "checkpoints/latest").read_text().strip()
    state = latest / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-100] ^= 0x01  # one flipped bit in a tensor: the file still parses
    state.write_bytes(bytes(data))
    before[state] = state.read_bytes()
    with pytest.raises(InputError, match=f"{state} is truncated or corrupt: its sha256 differs"):
        run_main(tmp_path, dataset, "--resume", "true", "--max_steps", "9")
    state.write_bytes(bytes(data[:1000]))
    before[state] = state.read_bytes()
    with pytest.raises(InputError, match="truncated or corrupt"):
        run_main(tmp_path, dataset, "--resume", "true", "--max_steps", "9")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_orphaned_checkpoint_folders_are_removed_on_the_next_start(tmp_path, smoke_run):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = run / "checkpoints" / f".tmp-step-00000009-{dead.pid}"
    live = run / "checkpoints" / f".tmp-step-00000009-{os.getppid()}"  # a running writer's folder is left alone
    for folder in (orphan, live):
        folder.mkdir()
        (folder / "state.safetensors").write_bytes(b"partial")
    ddpm_conditional.main(["--run_dir", str(run), "--resume", "true"])
    assert not orphan.exists() and live.exists()


@pytest.mark.smoke
def test_bad_flag_is_one_line_and_nonzero_exit(tmp_path):
    result = run_script(SCRIPT, "--batch_size", "lots", "--run_dir", str(tmp_path / "r"), check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "--batch_size" in result.stderr
