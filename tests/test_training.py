import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_script
from diffusion_from_scratch import ddpm_conditional
from diffusion_from_scratch.cli import InputError
from diffusion_from_scratch.ddpm_conditional import PRESETS, constants_of, epoch_plan, lr_at
from diffusion_from_scratch.utils import DATA_DIR, load_class_words, training_vocabulary

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


def test_onecycle_matches_torch():
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    total = 50
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-4, total_steps=total)
    cfg = {"lr": 1e-4, "lr_schedule": "onecycle", "warmup_steps": 0}
    for step in range(total):
        assert lr_at(step, total, cfg) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()
        scheduler.step()


def test_paper_preset_is_the_original_configuration():
    cfg = constants_of(vars(ddpm_conditional)) | PRESETS["paper"]
    assert (cfg["image_size"], cfg["batch_size"], cfg["epochs"], cfg["lr"], cfg["adam_eps"]) == (64, 50, 81, 1e-4, 1e-5)
    assert (cfg["ema_beta"], cfg["ema_warmup"], cfg["cond_dropout"]) == (0.995, 2000, 0.05)
    assert (cfg["prediction"], cfg["beta_schedule"], cfg["pair_order"]) == ("epsilon", "linear", "consecutive")
    model = ddpm_conditional.ConditionalUNet(ddpm_conditional.unet_config(cfg))
    assert sum(p.numel() for p in model.parameters()) == 23_332_739


def test_smoke_run_writes_the_run_folder(smoke_run):
    config = json.loads((smoke_run / "config.json").read_text())
    assert config["words"] == ["man", "person", "woman", "nurse", "philosopher"]
    for name in ("metrics.csv", "loss.png", "conditioning.safetensors", "checkpoints/latest"):
        assert (smoke_run / name).exists(), name
    assert list((smoke_run / "samples").glob("*.png"))
    latest = (smoke_run / "checkpoints" / (smoke_run / "checkpoints/latest").read_text().strip())
    tensors = load_file(str(latest / "state.safetensors"))
    assert any(k.startswith("ema.") for k in tensors) and any(k.startswith("optim.") for k in tensors)
    assert json.loads((latest / "state.json").read_text())["step"] == 6
    conditioning = load_file(str(smoke_run / "conditioning.safetensors"))
    assert conditioning["jl_matrix"].shape == (300, 128) and conditioning["word_table"].shape == (5, 128)


def final_weights(run_dir: Path) -> dict:
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints/latest").read_text().strip()
    return load_file(str(latest / "state.safetensors"))


@pytest.mark.smoke
def test_kill_9_then_resume_gives_the_same_weights(tmp_path, small_dataset):
    common = ["--preset", "smoke", "--dataset_path", str(small_dataset), "--max_steps", "12",
              "--checkpoint_every", "3", "--num_threads", "1", "--sample_every", "0"]
    straight = tmp_path / "straight"
    run_script(SCRIPT, *common, "--run_dir", str(straight))
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(REPO / SCRIPT), *common, "--run_dir", str(killed)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = killed / "checkpoints" / "latest"
    deadline = time.time() + 180
    while time.time() < deadline and not pointer.exists():
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped_at = int(pointer.read_text().strip().split("-")[1])
    assert stopped_at < 12, "the run finished before it could be killed"
    result = run_script(SCRIPT, *common, "--run_dir", str(killed), "--resume", "true")
    assert f"step {stopped_at} of 12" in result.stdout
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.smoke
def test_two_process_accelerate_launch(tmp_path, small_dataset):
    run_dir = tmp_path / "ddp"
    result = subprocess.run(
        # --multi_gpu only selects accelerate's torchrun launcher; --device cpu makes the processes use gloo
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / SCRIPT), "--preset", "smoke",
         "--dataset_path", str(small_dataset), "--run_dir", str(run_dir), "--max_steps", "3", "--num_threads", "1",
         "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "config.json").read_text())["processes"] == 2
    assert json.loads((run_dir / "checkpoints/step-00000003/state.json").read_text())["step"] == 3


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


def test_word_missing_from_the_embedding(tmp_path, small_dataset):
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("4 3\nman 1 0 0\nwoman 0 1 0\nperson 0 0 1\nnurse 1 1 0\n")
    with pytest.raises(InputError, match="philosopher"):
        run_main(tmp_path, small_dataset, "--embedding", str(vectors))


def test_nan_loss_stops_with_a_message(tmp_path, small_dataset):
    with pytest.raises(InputError, match="loss became"):
        run_main(tmp_path, small_dataset, "--lr", "1e30", "--grad_clip", "0", "--warmup_steps", "1")


def test_existing_run_is_not_overwritten_and_truncated_checkpoint_is_refused(tmp_path, smoke_run):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    dataset = json.loads((run / "config.json").read_text())["dataset_path"]
    with pytest.raises(InputError, match="already holds a run"):
        run_main(tmp_path, dataset)
    latest = run / "checkpoints" / (run / "checkpoints/latest").read_text().strip()
    state = latest / "state.safetensors"
    state.write_bytes(state.read_bytes()[:1000])
    before[state] = state.read_bytes()
    with pytest.raises(InputError, match="truncated or corrupt"):
        run_main(tmp_path, dataset, "--resume", "true", "--max_steps", "9")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.smoke
def test_bad_flag_is_one_line_and_nonzero_exit(tmp_path):
    result = run_script(SCRIPT, "--batch_size", "lots", "--run_dir", str(tmp_path / "r"), check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "--batch_size" in result.stderr
