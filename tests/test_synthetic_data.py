import filecmp
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, kill_when_paused, run_script

SCRIPT = "diffusion_from_scratch/synthetic_data.py"
CLASSES = {"man", "woman", "male_nurse", "female_nurse", "male_phil", "female_phil"}


def png_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*.png"))


def check_complete(out: Path, per_class: int, sizes: list[int]) -> list[dict]:
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == per_class * len(CLASSES)
    listed = sorted(Path(f) for r in rows for f in r["files"].values())
    assert listed == png_files(out), "manifest and files on disk differ"
    for path in listed:
        with Image.open(out / path) as image:
            image.load()
            assert image.size[0] == int(path.parts[0])
    assert not list(out.rglob("*.tmp")), "temporary files left behind"
    return rows


@pytest.mark.smoke
def test_layout_manifest_and_byte_identical_reruns(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    result = run_script(SCRIPT, "--out", str(a), "--per_class", "5", "--sizes", "16,32", "--test_fraction", "0.4")
    assert "images/s" in result.stdout
    rows = check_complete(a, 5, [16, 32])
    assert {r["class"] for r in rows} == CLASSES
    assert len({r["seed"] for r in rows}) == len(rows), "every image needs its own seed"
    assert sum(r["split"] == "test" for r in rows) == 2 * len(CLASSES)
    assert {tuple(sorted(p.name for p in (a / "32" / "train").iterdir()))} == {tuple(sorted(CLASSES))}
    woman = next(r for r in rows if r["class"] == "female_phil")
    assert woman["attributes"] == {"hair": "long", "clothes": "tweed jacket", "scene": "library"}
    run_script(SCRIPT, "--out", str(b), "--per_class", "5", "--sizes", "16,32", "--test_fraction", "0.4")
    match, mismatch, errors = filecmp.cmpfiles(a, b, [str(p) for p in png_files(a)] + ["manifest.jsonl"], shallow=False)
    assert not mismatch and not errors


# The generator, paused for good just before renaming its 41st PNG into place (that file's
# temporary copy is written and synced). It says "paused" on stdout, and only then is it killed:
# the kill lands at the same point whatever the machine's speed.
PAUSED_GENERATOR = """
import os, signal, sys
from diffusion_from_scratch import synthetic_data
real_replace, renamed = os.replace, 0
def replace_or_pause(source, target, *args, **kwargs):
    global renamed
    if str(target).endswith(".png"):
        if renamed == 40:
            print("paused", flush=True)
            while True:
                signal.pause()
        renamed += 1
    return real_replace(source, target, *args, **kwargs)
os.replace = replace_or_pause
synthetic_data.main(sys.argv[1:])
"""


@pytest.mark.smoke
def test_rerun_completes_after_kill_9(tmp_path):
    out = tmp_path / "killed"
    args = ["--out", str(out), "--per_class", "60", "--sizes", "32,64"]
    paused = kill_when_paused(PAUSED_GENERATOR, args, tmp_path / "stderr.txt")
    assert paused, "the generator ended without pausing:\n" + (tmp_path / "stderr.txt").read_text()[-3000:]
    # killed between the write of image 21's first file and its rename: 20 images in 2 sizes, one temporary
    assert len(png_files(out)) == 40 and len(list(out.rglob("*.tmp"))) == 1
    assert not (out / "manifest.jsonl").exists()
    result = run_script(SCRIPT, *args)
    # counted in whole batches of 15: the second batch, 5 of its images on disk, is made again
    assert "15 of 360 images already done" in result.stdout
    check_complete(out, 60, [32, 64])
    # the completed set is exactly what an uninterrupted run writes
    fresh = tmp_path / "fresh"
    run_script(SCRIPT, "--out", str(fresh), "--per_class", "60", "--sizes", "32,64")
    _, mismatch, errors = filecmp.cmpfiles(out, fresh, [str(p) for p in png_files(fresh)], shallow=False)
    assert not mismatch and not errors


@pytest.mark.smoke
def test_shards_together_make_the_whole_set(tmp_path):
    out = tmp_path / "sharded"
    for shard in ("0/2", "1/2"):
        run_script(SCRIPT, "--out", str(out), "--per_class", "4", "--sizes", "16", "--shard", shard)
    check_complete(out, 4, [16])


@pytest.mark.smoke
@pytest.mark.parametrize("args, message", [
    (["--source", "dall-e"], "--source"),
    (["--per_class", "0"], "--per_class"),
    (["--sizes", "32,-4"], "--sizes"),
    (["--sizes", "big"], "--sizes"),
    (["--test_fraction", "1.5"], "--test_fraction"),
    (["--shard", "3/2"], "--shard"),
    (["--epochs", "3"], "unrecognized"),
])
def test_bad_flags_fail_cleanly_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "never"
    result = run_script(SCRIPT, "--out", str(out), *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


@pytest.mark.smoke
def test_unwritable_out_and_non_pipeline_model(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_script(SCRIPT, "--out", str(blocker / "sub"), "--per_class", "1", check=False)
    assert result.returncode != 0 and "--out" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    not_a_pipeline = tmp_path / "empty_model"
    not_a_pipeline.mkdir()
    out = tmp_path / "sd_out"
    result = run_script(SCRIPT, "--source", "stable-diffusion", "--model", str(not_a_pipeline), "--out", str(out),
                        check=False)
    assert result.returncode != 0 and "--model" in result.stderr and str(not_a_pipeline) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


@pytest.mark.smoke
def test_changing_settings_into_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "ds"
    run_script(SCRIPT, "--out", str(out), "--per_class", "2", "--sizes", "16")
    before = png_files(out)
    result = run_script(SCRIPT, "--out", str(out), "--per_class", "2", "--sizes", "16", "--seed", "5", check=False)
    assert result.returncode != 0 and "other settings" in result.stderr
    assert png_files(out) == before


@pytest.mark.smoke
def test_the_prompts_are_identified_by_their_text_not_by_their_file(tmp_path):
    from diffusion_from_scratch import synthetic_data
    from bias_begets_bias.cli import InputError
    prompts = json.loads((REPO / "data" / "prompts.json").read_text())
    first, moved = tmp_path / "a" / "prompts.json", tmp_path / "b" / "prompts.json"
    for path in (first, moved):
        path.parent.mkdir()
        path.write_text(json.dumps(prompts))
    out = tmp_path / "ds"
    common = ["--out", str(out), "--per_class", "2", "--sizes", "16"]
    synthetic_data.main(common + ["--prompts", str(first)])
    assert json.loads((out / "dataset.json").read_text())["prompt_texts"] == prompts
    first.unlink()  # a re-cloned repository: the same prompts at another path resume the same dataset
    synthetic_data.main(common + ["--prompts", str(moved)])
    assert json.loads((out / "dataset.json").read_text())["prompts"] == str(moved)  # what a finishing command names
    moved.write_text(json.dumps(prompts | {"man": prompts["man"] + " Smiling."}))
    with pytest.raises(InputError, match=r"other settings \(prompt_texts\)"):
        synthetic_data.main(common + ["--prompts", str(moved)])


@pytest.mark.smoke
def test_a_dataset_recorded_with_only_its_prompts_path_resumes_if_that_file_matches(tmp_path):
    from diffusion_from_scratch import synthetic_data
    from bias_begets_bias.cli import InputError
    out = tmp_path / "ds"
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text((REPO / "data" / "prompts.json").read_text())
    common = ["--out", str(out), "--per_class", "2", "--sizes", "16"]
    synthetic_data.main(common)
    record = out / "dataset.json"
    settings = json.loads(record.read_text())
    old_format = {k: v for k, v in settings.items() if k != "prompt_texts"} | {"prompts": str(prompts_file)}
    record.write_text(json.dumps(old_format))
    synthetic_data.main(common)  # the recorded file holds the same prompts: resumed, and the record upgraded
    assert json.loads(record.read_text())["prompt_texts"] == settings["prompt_texts"]
    gone = old_format | {"prompts": str(tmp_path / "gone.json")}
    record.write_text(json.dumps(gone))
    with pytest.raises(InputError, match=r"dataset.json records its prompts only as the file .*gone.json"):
        synthetic_data.main(common)
    assert json.loads(record.read_text()) == gone


@pytest.mark.smoke
def test_stable_diffusion_source_with_a_tiny_pipeline(tmp_path):
    from tiny_models import save_tiny_sd_pipeline

    model = save_tiny_sd_pipeline(tmp_path / "tiny_sd")
    out = tmp_path / "sd"
    args = ["--source", "stable-diffusion", "--model", str(model), "--out", str(out), "--per_class", "2",
            "--num_inference_steps", "2", "--batch_size", "2", "--test_fraction", "0.5"]
    run_script(SCRIPT, *args)
    rows = check_complete(out, 2, [16, 64, 128])
    assert {r["source"] for r in rows} == {"stable-diffusion"} and rows[0]["model"] == str(model)
    assert "attributes" not in rows[0]
    again = tmp_path / "sd_again"
    run_script(SCRIPT, *args[:5], str(again), *args[6:])
    _, mismatch, _ = filecmp.cmpfiles(out, again, [str(p) for p in png_files(out)], shallow=False)
    assert not mismatch, "same seeds must give the same Stable Diffusion images"


def test_a_16_bit_source_image_is_saved_as_its_8_bit_values(tmp_path):
    """A source that returns 16-bit greyscale (mode I;16) must not be written white."""
    import numpy as np

    from diffusion_from_scratch.synthetic_data import save_image

    image = Image.fromarray(np.array([[0, 32768], [65535, 257]], dtype=np.uint16))
    save_image(image, tmp_path, {"2": "2/train/man/000000.png"})
    with Image.open(tmp_path / "2/train/man/000000.png") as saved:
        assert saved.mode == "RGB" and np.asarray(saved)[..., 0].tolist() == [[0, 128], [255, 1]]
