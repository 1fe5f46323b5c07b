"""Run every script on tiny inputs from one checkout, or compare two such runs: a refactor's
"no behaviour change" check (issue 26).

    python tools/behaviour_snapshot.py run --code <checkout> --out <folder>
    python tools/behaviour_snapshot.py compare <folder A> <folder B>

`run` works in a fixed scratch folder (WORK below), so that two checkouts' outputs hold the same
paths, and moves the result to --out. It runs the smoke experiment (data, three trainings, audits,
dose-response, Lipschitz, combine, kept copies), fidelity, and the Stable Diffusion-family scripts
(fairface, diff_prompts_same_score, diffusion_classifier, real_prompts_proportion) on a tiny
random-weight SD pipeline and CLIP model (tests/tiny_models.py) and on a smoke pixel run, each at one
torch thread. `compare` says which files differ: safetensors by tensors and metadata (their metadata's
byte order is not stable), CSV and JSON by value with timing fields masked (columns and keys
named like seconds / time / wall), other files byte for byte or, for text, after masking what
differs between any two runs (clock times, commits, durations, hosts); `--rename OLD=NEW`
applies a known rename (a moved module's dotted path) to A's text first. Prints the first
differing lines; exit status 1 if anything differs.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

WORK = Path("/tmp/bbb-behaviour-snapshot/work")  # fixed, so both runs record the same paths
CODE = Path("/tmp/bbb-behaviour-snapshot/code")  # the checkout is copied here for the same reason
TEXT_SUFFIXES = {".md", ".json", ".txt", ".csv", ".log", ".yaml"}
# What legitimately differs between two runs of the same code: clock times, durations, commits, hosts, pids.
VOLATILE = [
    re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?(\+\d\d:\d\d|Z| UTC)?"),
    re.compile(r'"(wall_s|seconds|elapsed_s|elapsed|duration_s|started|ended|start|end|time|pid|host|'
               r'hostname|cpu|commit|local_changes|changed_files|python|platform|torch_threads|'
               r'fingerprint|code_fingerprint)"\s*:\s*("[^"]*"|[-\d.eE+]+|true|false|null|\[[^\]]*\])'),
    re.compile(r"\b[0-9a-f]{7,40}\b"),
    re.compile(r"\b\d+(\.\d+)?\s*(s|min|sec|seconds|minutes|h|ms)\b"),
    re.compile(r"\b\d+:\d\d(:\d\d)?\b"),
]
SKIP_PARTS = {".workflow", ".snakemake", "records", "__pycache__", "log", "logs"}


def sh(command: list[str], cwd: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(CODE), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                        "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=cwd, env=env, check=True)


def make_fixtures() -> dict[str, Path]:
    """Tiny SD + CLIP, a FairFace-layout CSV and a StableBias-layout dataset, built by the tests'
    builders (tests/tiny_models.py) of this tool's own checkout: the inputs are the same whichever
    checkout is under test."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent / 'tests')!r})
from pathlib import Path
from tiny_models import save_tiny_clip_model, save_tiny_fairface_csv, save_tiny_sd_pipeline, save_tiny_stable_bias
root = Path({str(WORK)!r})
save_tiny_sd_pipeline(root / "sd"); save_tiny_clip_model(root / "clip")
save_tiny_fairface_csv(root / "fairface"); save_tiny_stable_bias(root)
"""
    sh([sys.executable, "-c", code], CODE)
    return {"sd": WORK / "sd", "clip": WORK / "clip", "fairface": WORK / "fairface" / "fairface_label_train.csv"}


def run(code: Path, out: Path) -> None:
    if out.exists():
        raise SystemExit(f"--out {out} exists; give a new folder")
    shutil.rmtree(WORK.parent, ignore_errors=True)
    WORK.mkdir(parents=True)
    shutil.copytree(code, CODE, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "generated"))
    py = sys.executable
    exp, data = WORK / "exp", WORK / "data"
    sh([py, "statistical_auditing/experiment.py", "--preset", "smoke", "--out", str(exp), "--data", str(data),
        "--keep", str(WORK / "kept"), "--python", py], CODE)
    run_dir, dataset = exp / "w2v-jl0", data / "32"
    sh([py, "diffusion_from_scratch/fidelity.py", "--run", str(run_dir), "--n_per_word", "2", "--guidance", "1,3",
        "--sample_steps", "4", "--out", str(WORK / "fidelity")], CODE)
    fixtures = make_fixtures()
    sd, fairface = str(fixtures["sd"]), str(fixtures["fairface"])
    for name, model, data_args in [("sd", sd, ["--data", fairface, "--resize", "16"]),
                                   ("pixel", str(run_dir), ["--data", str(dataset), "--kind", "sixclass",
                                                            "--selection", "random"])]:
        sh([py, "statistical_auditing/fairface.py", "--model", model, *data_args, "--num_images", "4",
            "--k_list", "1,5", "--elbo_samples", "2", "--batch_size", "2", "--out", str(WORK / f"fairface-{name}")],
           CODE)
        sh([py, "statistical_auditing/diff_prompts_same_score.py", "--model", model, *data_args, "--num_images",
            "3", "--k_list", "5,50", "--out", str(WORK / f"heat-{name}")], CODE)
        sh([py, "statistical_auditing/diffusion_classifier.py", "--model", model, *data_args, "--num_images", "4",
            "--n_samples", "4", "--prune", "2:1", "--out", str(WORK / f"elbo-{name}")], CODE)
    sh([py, "statistical_auditing/real_prompts_proportion.py", "--preset", "smoke", "--model", sd,
        "--clip_model", str(fixtures["clip"]), "--dataset", str(WORK / "professions"), "--generator", "gen-a",
        "--professions", str(WORK / "professions.txt"), "--out_dir", str(WORK / "stable_bias"),
        "--device", "cpu", "--dtype", "fp32"], CODE)
    for name in ("sd", "clip", "fairface", "professions"):  # inputs, not outputs
        shutil.rmtree(WORK / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(WORK), str(out))
    shutil.rmtree(WORK.parent, ignore_errors=True)


def masked(text: str) -> list[str]:
    for pattern in VOLATILE:
        text = pattern.sub("<*>", text)
    return text.splitlines()


TIMING = re.compile(r"seconds|time|wall|^s / |_s$|elapsed|started|ended|^commit$|local_changes|changed_files|host|python")


def masked_value(key: str, value):
    """A JSON value with timing / provenance fields replaced by a placeholder, recursively."""
    if TIMING.search(key):
        return "<*>"
    if isinstance(value, dict):
        return {k: masked_value(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return [masked_value(key + "[]", v) for v in value]
    return value


def comparable(path: Path, data: bytes, renames: list[tuple[str, str]]):
    """What of a file must agree between two runs of the same code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load

        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        return {"metadata": header.get("__metadata__"), "tensors": {k: v.tolist() for k, v in load(data).items()}}
    text = data.decode(errors="replace")
    for old, new in renames:
        text = text.replace(old, new)
    if path.suffix == ".json":
        return masked_value("", json.loads(text))
    if path.suffix == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        keep = [i for i, name in enumerate(rows[0]) if not TIMING.search(name)] if rows else []
        return [[row[i] for i in keep if i < len(row)] for row in rows]
    if path.suffix == ".md":
        return masked(masked_tables(text))
    if path.suffix in TEXT_SUFFIXES:
        return masked(text)
    return data


def masked_tables(text: str) -> str:
    """Markdown tables with their timing columns (headers named like seconds / time) blanked."""
    lines, timing = text.splitlines(), []
    for i, line in enumerate(lines):
        cells = line.split("|")
        if not line.startswith("|"):
            timing = []
        elif not timing and i + 1 < len(lines) and set(lines[i + 1].replace("|", "").strip()) <= {"-", ":"}:
            timing = [j for j, cell in enumerate(cells) if TIMING.search(cell.strip().lower())]
        else:
            lines[i] = "|".join("<*>" if j in timing else cell for j, cell in enumerate(cells))
    return "\n".join(lines)


def files_of(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")
            if p.is_file() and not SKIP_PARTS & set(p.relative_to(folder).parts)}


def compare(a: Path, b: Path, renames: list[tuple[str, str]]) -> int:
    files_a, files_b = files_of(a), files_of(b)
    problems = [f"only in {a}: {p}" for p in sorted(files_a - files_b)]
    problems += [f"only in {b}: {p}" for p in sorted(files_b - files_a)]
    same = masked_same = 0
    for path in sorted(files_a & files_b):
        bytes_a, bytes_b = (a / path).read_bytes(), (b / path).read_bytes()
        if bytes_a == bytes_b:
            same += 1
            continue
        value_a, value_b = comparable(path, bytes_a, renames), comparable(path, bytes_b, [])
        if value_a == value_b:
            masked_same += 1
            continue
        if isinstance(value_a, bytes):
            problems.append(f"differs (binary): {path}")
            continue
        lines_a, lines_b = (json.dumps(v, indent=1, default=str).splitlines() if not isinstance(v, list)
                            or (v and not isinstance(v[0], str)) else v for v in (value_a, value_b))
        diff = list(difflib.unified_diff(lines_a, lines_b, lineterm="", n=0))[2:8]
        problems.append(f"differs: {path}\n    " + "\n    ".join(map(str, diff)))
    print(f"{len(files_a & files_b)} files in both: {same} byte-identical, {masked_same} equal once timings, "
          f"commits and the given renames are masked; {len(problems)} problems")
    print("\n".join(problems))
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--code", type=Path, required=True, help="the checkout whose scripts run")
    run_parser.add_argument("--out", type=Path, required=True, help="a new folder for the outputs")
    compare_parser = sub.add_parser("compare")
    compare_parser.add_argument("a", type=Path)
    compare_parser.add_argument("b", type=Path)
    compare_parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                                help="a known rename to apply to A's text first (repeatable)")
    args = parser.parse_args()
    if args.command == "run":
        run(args.code.resolve(), args.out.resolve())
        return 0
    renames = [tuple(item.split("=", 1)) for item in args.rename]
    if any(len(pair) != 2 for pair in renames):
        raise SystemExit("--rename: expected OLD=NEW")
    return compare(args.a, args.b, renames)


if __name__ == "__main__":
    sys.exit(main())
