"""Every script refuses what is not its own (output folders, checkpoints, edited configs, flag
values the run never measured), records hold no absolute paths, and a kept run (exported EMA
weights) is audited like the run it came from."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_script
from bias_begets_bias.cli import InputError
from bias_begets_bias.pipeline import EXPORTED_WEIGHTS, TrainedRun, export_weights, latest_checkpoint
from bias_begets_bias.utils import (DATA_DIR, OWNER_FILE, REPO_ROOT, check_output_folder, claim_output_folder,
                                          file_sha256, record_path, resolve_recorded_path, run_identity)


def copy_run(smoke_run: Path, target: Path) -> Path:
    """A private copy of the session's smoke run (the fixture is shared by every test)."""
    return Path(shutil.copytree(smoke_run, target))


def fake_audit(run_dir: Path, guidances=(1.0,), methods=("scoredecomp",)) -> Path:
    """The audit files lipschitz.py reads, written by hand (as tests/test_bad_inputs.py does)."""
    words = json.loads((run_dir / "config.json").read_text())["words"]
    audit = run_dir / "audit"
    audit.mkdir()
    (audit / "audit.json").write_text(json.dumps({"seen": words, "unseen": [], "k": 10}))
    rows = "".join(f"{w},True,{g:g},{m},2,1,0.5,0.1,0.9\n" for w in words for g in guidances for m in methods)
    (audit / "proportions.csv").write_text("word,seen,guidance,method,n,successes,share,ci_low,ci_high\n" + rows)
    return run_dir


def strings_in(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return []


def absolute_strings(value, outside: Path | None = None) -> list[str]:
    """Absolute paths in a record, except those under ``outside``: a place outside both the
    repository and the run (the tests' dataset in a temporary folder), which record_path writes
    absolute on purpose (a relative path to it would break when the run moves without it)."""
    allowed = str(outside.resolve()) if outside is not None else None
    return [s for s in strings_in(value) if (s.startswith("/") or str(REPO_ROOT) in s)
            and not (allowed and s.startswith(allowed))]


# ----------------------------------------------------------------------------- 1. output folders
def test_audit_refuses_to_clean_another_runs_audit(smoke_run, tmp_path):
    run_a, run_b = copy_run(smoke_run, tmp_path / "aa"), copy_run(smoke_run, tmp_path / "vB")
    victim = run_b / "audit"
    victim.mkdir()
    (victim / "report.md").write_text("vB's audit\n")
    (victim / "controls.png").write_bytes(b"png")
    result = run_script("statistical_auditing/audit.py", "--run", str(run_a), "--out", str(victim),
                        "--preset", "smoke", "--num_threads", "1", check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "--out" in lines[0] and "vB" in lines[0], result.stderr
    assert (victim / "report.md").read_text() == "vB's audit\n" and (victim / "controls.png").exists()
    assert not (victim / OWNER_FILE).exists()


@pytest.mark.parametrize("script,tool_folder", [("statistical_auditing/lipschitz.py", "lipschitz"),
                                                ("statistical_auditing/dose_response.py", "dose_response"),
                                                ("diffusion_from_scratch/fidelity.py", "fidelity")])
def test_every_script_refuses_another_tools_folder_of_its_own_run(smoke_run, tmp_path, script, tool_folder):
    """--out <run>/audit (the audit's folder, made before markers existed) is not lipschitz's,
    dose_response's or fidelity's, though it lies in their own run."""
    run = fake_audit(copy_run(smoke_run, tmp_path / "run"))
    before = {p.name: p.read_bytes() for p in (run / "audit").iterdir()}
    extra = ["--k", "10"] if tool_folder == "dose_response" else []
    result = run_script(script, "--run", str(run), "--out", str(run / "audit"), *extra, check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "--out" in lines[0], result.stderr
    assert {p.name: p.read_bytes() for p in (run / "audit").iterdir()} == before


def test_owner_marker_rules(tmp_path, smoke_run):
    run_a, run_b = copy_run(smoke_run, tmp_path / "aa"), copy_run(smoke_run, tmp_path / "vB")
    config = json.loads((run_a / "config.json").read_text())
    id_a, id_b = run_identity(run_a, config), run_identity(run_b, config)
    assert id_a != id_b and not id_a.startswith("/")
    # the default place, made before the markers existed, is this tool's own; claiming marks it
    (run_a / "audit").mkdir()
    (run_a / "audit" / "report.md").write_text("old")
    claim_output_folder(run_a / "audit", "audit", run_a, id_a, run_a / "audit")
    assert json.loads((run_a / "audit" / OWNER_FILE).read_text()) == {"tool": "audit", "run": id_a}
    # ... and then no other tool's, nor another run's when it lies outside any run
    with pytest.raises(InputError, match="holds the output of audit"):
        check_output_folder(run_a / "audit", "lipschitz", run_a, id_a, run_a / "lipschitz")
    elsewhere = tmp_path / "elsewhere"
    claim_output_folder(elsewhere, "audit", run_a, id_a, run_a / "audit")
    (elsewhere / "report.md").write_text("aa's")
    with pytest.raises(InputError, match="--out: .*elsewhere holds the output of audit for run aa@"):
        check_output_folder(elsewhere, "audit", run_b, id_b, run_b / "audit")
    check_output_folder(elsewhere, "audit", run_a, id_a, run_a / "audit")  # its own rerun
    # inside another run, with or without a marker; a run folder itself
    with pytest.raises(InputError, match="lies inside the run folder"):
        check_output_folder(run_b / "new", "audit", run_a, id_a, run_a / "audit")
    with pytest.raises(InputError, match="is a run folder"):
        check_output_folder(run_a, "audit", run_a, id_a, run_a / "audit")
    # a non-empty unmarked folder of the run that is not the tool's default place
    (run_a / "misc").mkdir()
    (run_a / "misc" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="did not make"):
        check_output_folder(run_a / "misc", "audit", run_a, id_a, run_a / "audit")


# ----------------------------------------------------------------------------- 2. checkpoints
def test_a_checkpoint_of_another_run_is_refused(smoke_run, tmp_path):
    run_a, run_b = copy_run(smoke_run, tmp_path / "aa"), copy_run(smoke_run, tmp_path / "vB")
    foreign = latest_checkpoint(run_b)
    for given in (str(foreign), f"../vB/checkpoints/{foreign.name}", str(run_a / "checkpoints")):
        with pytest.raises(InputError, match="--checkpoint: .* is not one of the checkpoints of the run"):
            TrainedRun(run_a, checkpoint=given)
    assert TrainedRun(run_a, checkpoint=foreign.name).checkpoint == run_a / "checkpoints" / foreign.name
    result = run_script("diffusion_from_scratch/fidelity.py", "--run", str(run_a), "--checkpoint", str(foreign),
                        "--n_per_word", "1", "--guidance", "1", "--sample_steps", "1", check=False)
    assert result.returncode == 2 and "--checkpoint" in result.stderr, result.stderr
    assert not list(run_a.glob("fidelity*"))


# ----------------------------------------------------------------------------- 3. edited configs
@pytest.mark.parametrize("key,value", [("jl_seed", 7), ("jl_dim", 64)])
def test_a_hand_edited_config_key_is_refused(smoke_run, tmp_path, key, value):
    run = copy_run(smoke_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config[key] = config["train"][key] = value  # edited consistently, so only the saved tensors can tell
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=f"config.json: key '{key}'"):
        TrainedRun(run)


def test_an_edited_debias_or_embedding_is_refused(smoke_run, tmp_path):
    run = copy_run(smoke_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["debias"] = config["train"]["debias"] = "hard"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="config.json: keys 'embedding' .* and 'debias' = 'hard'"):
        TrainedRun(run).word_vectors(["nurse"])
    config["debias"] = "projected"  # the top level no longer says what the train block says
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="config.json: key 'debias'"):
        TrainedRun(run)


# ----------------------------------------------------------------------------- 4. measured values
def test_lipschitz_refuses_a_guidance_or_method_the_audit_never_measured(smoke_run, tmp_path):
    from statistical_auditing import lipschitz

    run = fake_audit(copy_run(smoke_run, tmp_path / "run"), guidances=(1.0, 3.0))
    base = ["--run", str(run), "--preset", "smoke", "--num_threads", "1", "--dose_word", ""]
    with pytest.raises(InputError, match=r"--guidance_for_outputs: .* drew guidance 1, 3 for scoredecomp, not 2"):
        lipschitz.main(base + ["--guidance_for_outputs", "2"])
    with pytest.raises(InputError, match=r"--method_for_outputs: .* measured scoredecomp, not attribute"):
        lipschitz.main(base + ["--method_for_outputs", "attribute"])
    dose = run / "dose_response"
    dose.mkdir()
    (dose / "dose_response.csv").write_text("word,space,alpha,method,share\nperson,embedding,0,scoredecomp,0.5\n")
    with pytest.raises(InputError, match=r"--dose_word: .* moved person, not 'nurse'"):
        lipschitz.main(base[:-2] + ["--dose_word", "nurse"])
    assert not (run / "lipschitz").exists()


# ----------------------------------------------------------------------------- 5. flag ranges
def test_dose_response_n_unseen_is_a_count_of_at_least_one(smoke_run, tmp_path):
    from statistical_auditing import dose_response

    with pytest.raises(InputError, match=r"--n_unseen: expected a .*\[1, inf\), got 0"):
        dose_response.main(["--run", str(smoke_run), "--n_unseen", "0", "--k", "10", "--out", str(tmp_path / "dose")])
    source = (REPO_ROOT / "statistical_auditing" / "dose_response.py").read_text()
    assert "N_UNSEEN = 5  # [1, inf) how many professions" in source


# ----------------------------------------------------------------------------- 6. recorded paths
def test_record_path_is_relative_to_the_repository_else_to_the_run_else_absolute(tmp_path):
    assert record_path(DATA_DIR / "professions.txt", tmp_path) == "data/professions.txt"
    assert record_path(tmp_path / "run" / "audit", tmp_path / "run") == "audit"
    # outside both: absolute (a relative "../data/x" would break when the run moves without its data)
    assert record_path(tmp_path / "data" / "x", tmp_path / "run") == str((tmp_path / "data" / "x").resolve())


def test_recorded_paths_resolve_here_and_old_absolute_ones_fall_back_to_data(tmp_path):
    words = DATA_DIR / "professions.txt"
    assert resolve_recorded_path("data/professions.txt") == words
    old = "/home/someone-else/bias_begets_bias/data/professions.txt"  # another machine's absolute record
    assert resolve_recorded_path(old) == words
    assert resolve_recorded_path(old, sha256=file_sha256(words)) == words
    assert resolve_recorded_path(old, sha256="0" * 64) == Path(old)  # other content: not silently swapped
    assert resolve_recorded_path("/elsewhere/class_words.json") == DATA_DIR / "class_words.json"
    (tmp_path / "mine.txt").write_text("x\n")
    assert resolve_recorded_path("mine.txt", base=tmp_path) == tmp_path / "mine.txt"


def test_training_config_records_no_absolute_path_but_the_data_outside_the_repository(smoke_run, small_dataset):
    config = json.loads((smoke_run / "config.json").read_text())
    assert absolute_strings(config, outside=small_dataset) == []
    assert config["dataset_path"] == str(small_dataset.resolve())
    assert config["class_words_file"] == "data/class_words.json"
    assert config["class_words_sha256"] == file_sha256(DATA_DIR / "class_words.json")


def test_an_old_run_with_another_machines_absolute_paths_still_loads(smoke_run, tmp_path):
    from bias_begets_bias.utils import resolve_dataset

    run = copy_run(smoke_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    dataset = resolve_dataset(config, "", run)
    config["dataset_path"] = str(Path("/nowhere/machine") / dataset.name)  # neither here nor under data/
    with pytest.raises(InputError, match="dataset_path"):
        resolve_dataset(config, "", run)
    config["dataset_path"] = "/nowhere/machine/bias_begets_bias/data"  # the same place under this data/
    assert resolve_dataset(config, "", run) == DATA_DIR


# ----------------------------------------------------------------------------- 7. exported weights
def test_export_weights_writes_only_the_ema_in_fp16_and_loads_as_a_run(smoke_run, tmp_path):
    run = copy_run(smoke_run, tmp_path / "run")
    kept = export_weights(run, tmp_path / "kept")
    assert sorted(p.name for p in kept.iterdir()) == ["conditioning.safetensors", "config.json", EXPORTED_WEIGHTS]
    from safetensors.torch import load_file

    tensors = load_file(kept / EXPORTED_WEIGHTS)
    original = TrainedRun(run)
    ema = original.model.state_dict()
    assert set(tensors) == set(ema)  # the EMA model's tensors, no raw model or optimizer state
    assert all(t.dtype == torch.float16 for t in tensors.values() if t.is_floating_point())
    loaded = TrainedRun(kept)
    assert loaded.kept and loaded.step == original.step and loaded.words == original.words
    for name, value in loaded.model.state_dict().items():
        assert value.dtype == ema[name].dtype  # float32 for compute
        assert torch.equal(value, ema[name].half().to(ema[name].dtype))
    from bias_begets_bias.pipeline import safetensors_metadata

    meta = safetensors_metadata((kept / EXPORTED_WEIGHTS).read_bytes())
    assert meta["dtype"] == "float16" and int(meta["step"]) == original.step
    assert meta["source_sha256"] == json.loads((latest_checkpoint(run) / "state.json").read_text())["sha256"]
    with pytest.raises(InputError, match="--checkpoint: .* kept run"):
        TrainedRun(kept, checkpoint="step-00000006")


# ----------------------------------------------------------------------------- 8. precision and the audit
def _shares(path: Path) -> dict[tuple[str, str, str], float]:
    rows = csv.DictReader(io.StringIO(path.read_text()))
    return {(r["word"], r["guidance"], r["method"]): float(r["share"]) if r["share"] else float("nan") for r in rows}


@pytest.mark.smoke
def test_the_audit_does_not_change_with_the_stored_precision(smoke_run, small_dataset, tmp_path):
    """The smoke audit of a run and of its fp16 export: proportions.csv's shares are equal. The
    smoke audit calls 2-6 images per (word, scale, method); fp16 rounding moves the sampled
    pixels by less than one uint8 level almost everywhere, so the calls, and so the shares, are
    the same (measured: every share equal, difference 0)."""
    run = copy_run(smoke_run, tmp_path / "run")
    kept = export_weights(run, tmp_path / "kept")
    for folder in (run, kept):
        run_script("statistical_auditing/audit.py", "--run", str(folder), "--preset", "smoke", "--num_threads", "1")
    original, exported = _shares(run / "audit" / "proportions.csv"), _shares(kept / "audit" / "proportions.csv")
    assert original.keys() == exported.keys() and original
    differences = {key: abs(original[key] - exported[key]) for key in original
                   if original[key] == original[key] or exported[key] == exported[key]}
    assert max(differences.values()) == 0.0, differences
    # and the audit's records hold no absolute path
    summary = json.loads((kept / "audit" / "audit.json").read_text())
    assert absolute_strings(summary, outside=small_dataset) == [], absolute_strings(summary, outside=small_dataset)
    assert summary["run"] == "kept" and summary["config"]["words_file"] == "data/professions.txt"
    assert summary["config"]["words_file_sha256"] == file_sha256(DATA_DIR / "professions.txt")
    assert str(tmp_path) not in (kept / "audit" / "report.md").read_text()
    assert json.loads((kept / "audit" / OWNER_FILE).read_text())["tool"] == "audit"
