"""Bad values and bad files, everywhere (issue 11): every script, run as a user would, on bad
flags and damaged, missing, foreign or unwritable files.

Each case must end with exit status 2 and exactly one line on stderr ("error: ...") that names
the flag or the file, with no traceback, and every file that was there before must be
byte-identical afterwards (every file under the cases' folders is hashed before and after).
The fixtures are built once (copies of the session's small dataset and smoke run, damaged
copies of them, hand-made audit outputs); the cases, one subprocess each, run side by side.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO

SD = "diffusion_from_scratch/synthetic_data.py"
TR = "diffusion_from_scratch/ddpm_conditional.py"
FI = "diffusion_from_scratch/fidelity.py"
AU = "statistical_auditing/audit.py"
FF = "statistical_auditing/fairface.py"
DC = "statistical_auditing/diffusion_classifier.py"
DP = "statistical_auditing/diff_prompts_same_score.py"
RP = "statistical_auditing/real_prompts_proportion.py"
CA = "statistical_auditing/combine_audits.py"
DR = "statistical_auditing/dose_response.py"
LI = "statistical_auditing/lipschitz.py"
EX = "statistical_auditing/experiment.py"
NOT_UTF8 = "caf\xe9,nurse\n".encode("latin-1") + b"\xff\xfe\x00"
HUGE = str(10 ** 15)
TIMEOUT_S = 240


@dataclass
class Case:
    name: str
    script: str
    args: list[str]  # "{key}" is replaced by the path of fixture ``key``
    names: tuple[str, ...]  # the message must contain one of these (a flag or a file name)
    touched: tuple[str, ...] = field(default_factory=tuple)  # extra fixtures whose files must not change


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels (and holds no image data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def copy_run(source: Path, target: Path) -> Path:
    """A copy of a run without its older checkpoints (the latest one is enough)."""
    shutil.copytree(source, target)
    latest = (target / "checkpoints" / "latest").read_text().strip()
    for folder in (target / "checkpoints").glob("step-*"):
        if folder.name != latest:
            shutil.rmtree(folder)
    return target


def fake_audit(run_dir: Path, words: list[str]) -> Path:
    """The files combine_audits.py and lipschitz.py read from <run>/audit, written by hand."""
    audit = run_dir / "audit"
    audit.mkdir(parents=True)
    (audit / "audit.json").write_text(json.dumps({
        "debias": "none", "jl_seed": 0, "run_step": 6, "k": 10, "config": {}, "controls_failed": [],
        "seen": words, "unseen": [], "embedding": "w2v-bundled"}))
    (audit / "proportions.csv").write_text(
        "word,seen,guidance,method,n,successes,share,ci_low,ci_high\n"
        + "".join(f"{w},True,1,scoredecomp,2,1,0.5,0.1,0.9\n" for w in words))
    (audit / "seeds.csv").write_text("word,guidance,method,n,successes\n"
                                     + "".join(f"{w},1,scoredecomp,2,1\n" for w in words))
    return run_dir


def unwritable(tmp: Path) -> Path:
    """A folder path this process cannot create: a read-only folder's child (as root, whom
    permissions do not stop, a path under /sys, which refuses new entries)."""
    if os.geteuid() != 0:
        locked = tmp / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        return locked / "out"
    return Path("/sys/bias_begets_bias_no_such_folder/out")


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_dataset, smoke_run) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_inputs")
    w: dict[str, Path] = {"root": root}
    w["data_root"] = shutil.copytree(small_dataset.parent, root / "data")
    w["data"] = w["data_root"] / small_dataset.name
    w["run"] = copy_run(smoke_run, root / "run")
    words = json.loads((w["run"] / "config.json").read_text())["words"]
    w["file"] = root / "a_file.txt"
    w["file"].write_text("not a folder\n")
    w["under_file"] = w["file"] / "sub"
    w["unwritable"] = unwritable(root)
    w["not_utf8"] = root / "not_utf8.txt"
    w["not_utf8"].write_bytes(NOT_UTF8)
    w["not_utf8_csv"] = root / "labels.csv"
    w["not_utf8_csv"].write_bytes(b"file,label\n" + NOT_UTF8)
    w["not_utf8_json"] = root / "not_utf8.json"
    w["not_utf8_json"].write_bytes(b'{"man": "caf\xe9"}')
    w["list_json"] = root / "list.json"
    w["list_json"].write_text('["man", "woman"]')
    w["out"] = root / "outputs"  # a fresh output folder (the cases must leave no file in it)

    # a dataset whose dataset.json a killed writer truncated
    w["data_badjson_root"] = shutil.copytree(w["data_root"], root / "data_badjson")
    w["data_badjson"] = w["data_badjson_root"] / small_dataset.name
    text = (w["data_badjson_root"] / "dataset.json").read_text()
    (w["data_badjson_root"] / "dataset.json").write_text(text[:len(text) // 2])
    # a dataset with one image whose header claims 100,000 x 100,000 pixels
    w["data_bomb"] = shutil.copytree(w["data_root"], root / "data_bomb") / small_dataset.name
    for split in ("train", "test"):
        victim = sorted((w["data_bomb"] / split).glob("*/*.png"))[0]
        victim.write_bytes(png_claiming(100_000, 100_000))
    w["bomb_csv"] = root / "bomb" / "labels.csv"
    w["bomb_csv"].parent.mkdir()
    (w["bomb_csv"].parent / "big.png").write_bytes(png_claiming(100_000, 100_000))
    w["bomb_csv"].write_text("file,label\nbig.png,male\n")
    # damaged copies of the run
    for key, damage in (("run_badconfig", lambda r: (r / "config.json").write_text(
                            (r / "config.json").read_text()[:200])),
                        ("run_nocond", lambda r: (r / "conditioning.safetensors").unlink()),
                        ("run_badunet", lambda r: (r / "config.json").write_text(json.dumps(
                            json.loads((r / "config.json").read_text()) | {"unet": "not a shape"})))):
        damage(copy_run(w["run"], root / key))
        w[key] = root / key
    # audited runs (hand-made audit outputs) for lipschitz.py and combine_audits.py
    w["audited"] = fake_audit(copy_run(w["run"], root / "audited"), words)
    w["audited_listjson"] = fake_audit(copy_run(w["run"], root / "audited_listjson"), words)
    (w["audited_listjson"] / "audit" / "audit.json").write_text("[1, 2]")
    w["audited_badcsv"] = fake_audit(copy_run(w["run"], root / "audited_badcsv"), words)
    (w["audited_badcsv"] / "audit" / "proportions.csv").write_bytes(b"word,seen,guidance\n" + NOT_UTF8)
    for key, damage in (("audit_only_badjson", lambda a: (a / "audit.json").write_text("{")),
                        ("audit_only_notutf8", lambda a: (a / "proportions.csv").write_bytes(NOT_UTF8)),
                        ("audit_only_nocolumn", lambda a: (a / "proportions.csv").write_text("word,seen\nman,True\n")),
                        ("audit_only_badcount", lambda a: (a / "seeds.csv").write_text(
                            "word,guidance,method,n,successes\nman,1,scoredecomp,two,1\n")),
                        ("audit_only_badlipschitz", lambda a: (a.parent / "lipschitz").mkdir() or
                         (a.parent / "lipschitz" / "lipschitz.json").write_text('{"per_timestep": ['))):
        damage(fake_audit(root / key, words) / "audit")
        w[key] = root / key
    # experiment folders with a damaged ledger or record
    for key, name in (("exp_badjobs", "records/train__w2v-jl0.json"), ("exp_badrecord", "experiment.json")):
        (root / key / name).parent.mkdir(parents=True)
        (root / key / name).write_text('{"starts": [{"status": "do')
        w[key] = root / key
    return w


O = ["--out", "{out}/{case}"]  # a fresh output folder in the fixtures, never the repository's runs/
CASES = [
    # synthetic_data.py
    Case("sd_per_class_0", SD, ["--per_class", "0", *O], ("--per_class",)),
    Case("sd_test_fraction_nan", SD, ["--test_fraction", "nan", *O], ("--test_fraction",)),
    Case("sd_seed_negative", SD, ["--seed", "-1", *O], ("--seed",)),
    Case("sd_sizes_empty_item", SD, ["--sizes", "32,,64", *O], ("--sizes",)),
    Case("sd_per_class_huge", SD, ["--per_class", HUGE, *O], ("--per_class",)),
    Case("sd_out_under_a_file", SD, ["--out", "{under_file}"], ("--out",)),
    Case("sd_out_unwritable", SD, ["--out", "{unwritable}"], ("--out",)),
    Case("sd_dataset_json_truncated", SD, ["--out", "{data_badjson_root}", "--per_class", "10", "--sizes", "32",
                                           "--test_fraction", "0.2"], ("dataset.json",)),
    Case("sd_prompts_not_utf8", SD, ["--prompts", "{not_utf8_json}", *O], ("not_utf8.json",)),
    Case("sd_prompts_a_list", SD, ["--prompts", "{list_json}", *O], ("list.json",)),
    # ddpm_conditional.py
    Case("tr_ema_beta_2", TR, ["--ema_beta", "2", "--run_dir", "{out}/{case}"], ("--ema_beta",)),
    Case("tr_guidance_nan", TR, ["--guidance", "nan", "--run_dir", "{out}/{case}"], ("--guidance",)),
    Case("tr_max_steps_negative", TR, ["--max_steps", "-5", "--run_dir", "{out}/{case}"], ("--max_steps",)),
    Case("tr_sample_steps_5000", TR, ["--sample_steps", "5000", "--run_dir", "{out}/{case}"], ("--sample_steps",)),
    Case("tr_widths_vs_attention_heads", TR, ["--preset", "smoke", "--widths", "8,16,16,18", "--dataset_path",
                                              "{data}", "--run_dir", "{out}/{case}"], ("--widths",)),
    Case("tr_image_size_huge", TR, ["--preset", "smoke", "--image_size", "400000", "--dataset_path", "{data}",
                                    "--run_dir", "{out}/{case}"], ("--image_size",)),
    Case("tr_run_dir_under_a_file", TR, ["--preset", "smoke", "--dataset_path", "{data}", "--run_dir",
                                         "{under_file}"], ("--run_dir",)),
    Case("tr_image_bomb", TR, ["--preset", "smoke", "--dataset_path", "{data_bomb}", "--run_dir", "{out}/{case}"],
         (".png",)),
    # fidelity.py
    Case("fi_batch_size_0", FI, ["--run", "{run}", "--batch_size", "0", *O], ("--batch_size",)),
    Case("fi_sample_steps_0", FI, ["--run", "{run}", "--sample_steps", "0", *O], ("--sample_steps",)),
    Case("fi_sample_steps_5000", FI, ["--run", "{run}", "--sample_steps", "5000", *O], ("--sample_steps",)),
    Case("fi_guidance_nan", FI, ["--run", "{run}", "--guidance", "1,nan", *O], ("--guidance",)),
    Case("fi_guidance_empty_item", FI, ["--run", "{run}", "--guidance", "1,,3", *O], ("--guidance",)),
    Case("fi_config_foreign_unet", FI, ["--run", "{run_badunet}", *O], ("config.json",)),
    Case("fi_no_conditioning", FI, ["--run", "{run_nocond}", *O], ("conditioning.safetensors",)),
    Case("fi_out_unwritable", FI, ["--run", "{run}", "--out", "{unwritable}"], ("--out",)),
    # audit.py
    Case("au_k_list_empty_item", AU, ["--run", "{run}", "--k_list", "1,,5", *O], ("--k_list",)),
    Case("au_k_list_outside_table", AU, ["--run", "{run}", "--k_list", "5000", *O], ("--k_list",)),
    Case("au_guidance_inf", AU, ["--run", "{run}", "--guidance", "1,inf", *O], ("--guidance",)),
    Case("au_n_per_seed_huge", AU, ["--run", "{run}", "--preset", "smoke", "--dataset_path", "{data}", "--n_per_seed",
                                    HUGE, *O], ("--n_per_seed",)),
    Case("au_words_file_not_utf8", AU, ["--run", "{run}", "--preset", "smoke", "--dataset_path", "{data}",
                                        "--words_file", "{not_utf8}", *O], ("not_utf8.txt",)),
    Case("au_dataset_json_truncated", AU, ["--run", "{run}", "--preset", "smoke", "--dataset_path",
                                           "{data_badjson}", *O], ("dataset.json",)),
    Case("au_config_truncated", AU, ["--run", "{run_badconfig}", *O], ("config.json",)),
    # fairface.py (on the smoke run and the six-class test images)
    Case("ff_k_list_word", FF, ["--model", "{run}", "--data", "{data}", "--k_list", "5,x", *O], ("--k_list",)),
    Case("ff_elbo_samples_0", FF, ["--model", "{run}", "--data", "{data}", "--elbo_samples", "0", *O],
         ("--elbo_samples",)),
    Case("ff_resize_minus_2", FF, ["--model", "{run}", "--data", "{data}", "--resize", "-2", *O], ("--resize",)),
    Case("ff_label_csv_not_utf8", FF, ["--model", "{run}", "--data", "{not_utf8_csv}", "--kind", "csv", *O],
         ("labels.csv",)),
    Case("ff_image_bomb", FF, ["--model", "{run}", "--data", "{bomb_csv}", "--kind", "csv", "--label_column",
                               "label", "--classes", "male,female", "--candidates", "man,woman", "--elbo", "false",
                               *O], ("big.png",)),
    Case("ff_out_under_a_file", FF, ["--model", "{run}", "--data", "{data}", "--out", "{under_file}"], ("--out",)),
    # diffusion_classifier.py
    Case("dc_n_samples_0", DC, ["--model", "{run}", "--data", "{data}", "--n_samples", "0", *O], ("--n_samples",)),
    Case("dc_prune_word", DC, ["--model", "{run}", "--data", "{data}", "--prune", "20:x", *O], ("--prune",)),
    Case("dc_out_under_a_file", DC, ["--model", "{run}", "--data", "{data}", "--out", "{under_file}"], ("--out",)),
    # diff_prompts_same_score.py
    Case("dp_k_list_empty", DP, ["--model", "{run}", "--data", "{data}", "--k_list", "", *O], ("--k_list",)),
    Case("dp_timesteps_file_not_utf8", DP, ["--model", "{run}", "--data", "{data}", "--timesteps_file",
                                            "{not_utf8}", *O], ("not_utf8.txt",)),
    Case("dp_out_under_a_file", DP, ["--model", "{run}", "--data", "{data}", "--out", "{under_file}"], ("--out",)),
    # real_prompts_proportion.py (bad inputs found before any model or dataset is loaded)
    Case("rp_n_boot_0", RP, ["--n_boot", "0", "--out_dir", "{out}/{case}"], ("--n_boot",)),
    Case("rp_prompt_template", RP, ["--prompt_template", "a {kind} of a {}", "--out_dir", "{out}/{case}"],
         ("--prompt_template",)),
    Case("rp_professions_not_utf8", RP, ["--professions", "{not_utf8}", "--out_dir", "{out}/{case}"],
         ("not_utf8.txt",)),
    Case("rp_out_dir_under_a_file", RP, ["--out_dir", "{under_file}"], ("--out_dir",)),
    # combine_audits.py
    Case("ca_audit_json_truncated", CA, ["--runs", "{audit_only_badjson}", *O], ("audit.json",)),
    Case("ca_proportions_not_utf8", CA, ["--runs", "{audit_only_notutf8}", *O], ("proportions.csv",)),
    Case("ca_proportions_columns", CA, ["--runs", "{audit_only_nocolumn}", *O], ("proportions.csv",)),
    Case("ca_seeds_count_not_a_number", CA, ["--runs", "{audit_only_badcount}", *O], ("seeds.csv",)),
    Case("ca_lipschitz_json_truncated", CA, ["--runs", "{audit_only_badlipschitz}", *O], ("lipschitz.json",)),
    Case("ca_jl_dims_empty_item", CA, ["--runs", "{audited}", "--jl_dims", "64,,128", *O], ("--jl_dims",)),
    Case("ca_out_under_a_file", CA, ["--runs", "{audited}", "--out", "{under_file}"], ("--out",)),
    # dose_response.py
    Case("dr_alphas_nan", DR, ["--run", "{run}", "--k", "10", "--alphas", "0,nan", *O], ("--alphas",)),
    Case("dr_k_outside_table", DR, ["--run", "{run}", "--k", "5000", *O], ("--k",)),
    Case("dr_k_0_without_audit", DR, ["--run", "{run}", *O], ("audit.json",)),
    Case("dr_out_under_a_file", DR, ["--run", "{run}", "--k", "10", "--out", "{under_file}"], ("--out",)),
    # lipschitz.py
    Case("li_timesteps_outside_table", LI, ["--run", "{audited}", "--timesteps", "5000", *O], ("--timesteps",)),
    Case("li_dose_alphas_inf", LI, ["--run", "{audited}", "--dose_alphas", "0,inf", *O], ("--dose_alphas",)),
    Case("li_audit_json_a_list", LI, ["--run", "{audited_listjson}", *O], ("audit.json",)),
    Case("li_proportions_not_utf8", LI, ["--run", "{audited_badcsv}", "--preset", "smoke", *O],
         ("proportions.csv",)),
    # experiment.py
    Case("ex_jl_seeds_empty_item", EX, ["--jl_seeds", "0,,1", "--data", "{data_root}", *O], ("--jl_seeds",)),
    Case("ex_workers_negative", EX, ["--workers", "-1", "--data", "{data_root}", *O], ("--workers",)),
    Case("ex_train_args_ema_beta", EX, ["--train_args", "--ema_beta 2", "--data", "{data_root}", *O],
         ("--train_args",)),
    Case("ex_arms_unknown", EX, ["--arms", "w2v,foo", "--data", "{data_root}", *O], ("--arms",)),
    Case("ex_keep_under_a_file", EX, ["--keep", "{under_file}", "--data", "{data_root}", *O], ("--keep",)),
    Case("ex_jobs_json_truncated", EX, ["--out", "{exp_badjobs}", "--data", "{data_root}"], ("train__w2v-jl0.json",)),
    Case("ex_record_truncated", EX, ["--out", "{exp_badrecord}", "--data", "{data_root}"], ("experiment.json",)),
]


def resolve(arg: str, w: dict[str, Path], case: str) -> str:
    arg = arg.replace("{case}", case)
    for key, path in w.items():
        arg = arg.replace("{" + key + "}", str(path))
    return arg


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (empty folders are not files)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_case(case: Case, w: dict[str, Path]) -> subprocess.CompletedProcess:
    environment = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
                                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / case.script), *(resolve(a, w, case.name) for a in case.args)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO, env=environment)


@pytest.fixture(scope="module")
def outcomes(world) -> dict[str, tuple[subprocess.CompletedProcess, dict, dict]]:
    """Every case, run side by side once: its process and the fixtures' files before and after."""
    before = snapshot(world["root"])
    repo_data = snapshot(REPO / "data")
    workers = max(2, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = dict(zip((c.name for c in CASES), pool.map(lambda c: run_case(c, world), CASES)))
    after = snapshot(world["root"])
    assert snapshot(REPO / "data") == repo_data, "a case changed the repository's data/ folder"
    return {name: (result, before, after) for name, result in results.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(case, world, outcomes):
    result, before, after = outcomes[case.name]
    stderr = result.stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert result.returncode == 2, f"exit {result.returncode}:\n{stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert any(name in lines[0] for name in case.names), lines[0]
    # every file of the fixtures this case was given (and every other one) is as it was
    changed = sorted(key for key in before if after.get(key) != before[key])
    added = sorted(set(after) - set(before))
    assert not changed and not added, f"changed: {changed[:5]}, added: {added[:5]}"
