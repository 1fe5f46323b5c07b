"""combine_audits.py refuses what does not belong together, reads its inputs from the repository,
writes no absolute path and only where it owns the folder; its committed results regenerate."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bias_begets_bias.cli import InputError
from statistical_auditing import combine_audits
from statistical_auditing.from_scratch import experiment_stats

from conftest import compare_csv

REPO = Path(__file__).resolve().parent.parent
WORDS = ["accountant", "nurse", "pilot", "baker", "lawyer", "cashier"]  # all in data/professions.txt
COMMITTED = REPO / "results" / "experiment"
ARM_DEBIAS = {"w2v": "none", "debiased": "hard", "projected": "projected"}


def make_run(folder: Path, arm: str = "w2v", jl_seed: int = 0, seed: int = 789, step: int = 8112,
             audit: dict | None = None, train: dict | None = None, summary: dict | None = None,
             words_file: str = "", words: list[str] = WORDS) -> Path:
    """A run folder with a config.json and a hand-made audit: nurse 50/100 female in one seed, the
    unseen ``words`` on a line of slope 1 in their gap."""
    debias = ARM_DEBIAS[arm]
    training = {"debias": debias, "jl_seed": jl_seed, "embedding": "w2v-bundled", "jl_dim": 128,
                "conditioning_sha256": f"{arm}{jl_seed}", "dataset_path": str(folder.parent / "data"),
                "train": {"seed": seed, "lr": 0.001, "epochs": 16, "debias": debias, "jl_seed": jl_seed,
                          "run_dir": str(folder), "num_threads": 2, "class_words": "data/class_words.json"}
                | (train or {})}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(training))
    (folder / "audit").mkdir()
    config = {"k": 0, "k_list": "1,5", "sampler": "dpm", "sample_steps": 50, "n_per_word": 64, "n_per_seed": 128,
              "n_seeds": 4, "words_file": words_file, "run": str(folder)} | (audit or {})
    record = {"debias": debias, "jl_seed": jl_seed, "run_step": step, "k": 5, "config": config,
              "controls_failed": [], "seen": ["nurse"], "unseen": words, "embedding": "w2v-bundled",
              "guidance": [1.0], "methods": ["scoredecomp"], "missing": [], "respelled": {}} | (summary or {})
    (folder / "audit" / "audit.json").write_text(json.dumps(record))
    rows = ["word,seen,guidance,method,n,successes,share,cosine_gap_w2v,cosine_gap,cosine_gap_jl",
            "nurse,True,1,scoredecomp,100,50,0.5,0.1,0.1,0.1"]
    for i, word in enumerate(words):
        gap = 0.05 * i - 0.1
        rows.append(f"{word},False,1,scoredecomp,100,{round(100 * (0.5 + gap))},{0.5 + gap},{gap},{gap},{gap}")
    (folder / "audit" / "proportions.csv").write_text("\n".join(rows) + "\n")
    (folder / "audit" / "seeds.csv").write_text("word,guidance,method,seed_index,n,successes\n"
                                                "nurse,1,scoredecomp,0,100,50\n")
    return folder


def combine(runs: list[Path | str], out: Path, *extra: str) -> dict:
    return combine_audits.main(["--runs", ",".join(map(str, runs)), "--out", str(out), "--n_boot", "20",
                                "--jl_dims", "64", "--jl_shift_seeds", "0", *extra])


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- 1. duplicates


@pytest.mark.parametrize("spelling", ["trailing_slash", "audit_folder", "symlink", "copy"])
def test_a_run_listed_twice_under_another_spelling_is_refused(tmp_path, spelling):
    a = make_run(tmp_path / "w2v-jl0")
    make_run(tmp_path / "debiased-jl0", "debiased")
    if spelling == "trailing_slash":
        second = f"{a}/"
    elif spelling == "audit_folder":
        second = str(a / "audit")
    elif spelling == "symlink":
        second = tmp_path / "link-to-a"
        second.symlink_to(a)
    else:
        second = shutil.copytree(a, tmp_path / "elsewhere" / "w2v-jl0-copy")
    with pytest.raises(InputError, match="list each run once") as error:
        combine([a, tmp_path / "debiased-jl0", second], tmp_path / "out")
    assert str(a) in str(error.value) and str(second) in str(error.value)
    assert not (tmp_path / "out").exists()


def test_two_runs_differing_only_in_training_seed_are_both_pooled(tmp_path):
    runs = [make_run(tmp_path / "w2v-jl0-s1", seed=1), make_run(tmp_path / "w2v-jl0-s2", seed=2)]
    result = combine(runs, tmp_path / "out")
    assert [r["name"] for r in result["included"]] == ["w2v-jl0-s1", "w2v-jl0-s2"]


def test_a_word_one_run_could_not_call_leaves_that_cell_in_every_run_and_is_listed(tmp_path):
    """n = 0 (e.g. the attribute rule undetermined on all of a word's images) is a measurement, not a
    broken design: the word leaves that guidance and method in every run, and the report says so."""
    runs = [make_run(tmp_path / "w2v-jl0"), make_run(tmp_path / "w2v-jl1", jl_seed=1)]
    table = runs[1] / "audit" / "proportions.csv"
    table.write_text(re.sub(r"pilot,False,1,scoredecomp,100,\d+,[^,]*,", "pilot,False,1,scoredecomp,0,0,,",
                            table.read_text()))
    assert "pilot,False,1,scoredecomp,0,0,," in table.read_text()
    result = combine(runs, tmp_path / "out")
    pooled = [r for r in csv.DictReader(open(tmp_path / "out" / "regressions.csv")) if r["level"] == "arm"]
    assert pooled and {r["n_points"] for r in pooled} == {"10"}  # 2 runs x the 5 words both called
    per_word = [r for r in csv.DictReader(open(tmp_path / "out" / "unseen.csv")) if r["word"] == "pilot"]
    assert [r["run"] for r in per_word] == ["w2v-jl0"]  # each run's own rows stay listed
    assert "Left out here (some run called none of their images): pilot." in (tmp_path / "out" / "report.md").read_text()
    assert [r["name"] for r in result["included"]] == ["w2v-jl0", "w2v-jl1"]


# ----------------------------------------------------------------------------- 2. runs that do not belong together


@pytest.mark.parametrize("what, change, shown", [
    ("training step", {"step": 6}, "(8112 vs 6)"),
    ("training recipe: train.lr", {"train": {"lr": 0.01}}, "(0.001 vs 0.01)"),
    ("training recipe: jl_dim", {"summary": {}, "train": {}, "jl_dim": 64}, "(128 vs 64)"),
    ("audit k", {"audit": {"k": 600}}, "(0 vs 600)"),
    ("audit sampler", {"audit": {"sampler": "ddim"}}, "(dpm vs ddim)"),
    ("audit sample_steps", {"audit": {"sample_steps": 20}}, "(50 vs 20)"),
    ("audit n_per_word", {"audit": {"n_per_word": 8}}, "(64 vs 8)"),
    ("guidance scales", {"summary": {"guidance": [1.0, 3.0]}}, "([1.0] vs [1.0, 3.0])"),
    ("unseen words", {"words": WORDS[:5]}, "pilot"),
])
def test_runs_that_do_not_belong_together_are_refused(tmp_path, what, change, shown):
    jl_dim = change.pop("jl_dim", None)
    make_run(tmp_path / "w2v-jl0")
    other = make_run(tmp_path / "w2v-jl1", jl_seed=1, **change)
    if jl_dim:
        record = json.loads((other / "config.json").read_text()) | {"jl_dim": jl_dim}
        (other / "config.json").write_text(json.dumps(record))
    # --include_failed does not make a mismatch poolable
    with pytest.raises(InputError, match="do not belong together") as error:
        combine([tmp_path / "w2v-jl0", other], tmp_path / "out", "--include_failed", "true")
    message = str(error.value)
    assert f": {what} differs" in message and shown in message and "w2v-jl0" in message and "w2v-jl1" in message
    assert "\n" not in message and not (tmp_path / "out").exists()


def test_identity_paths_and_thread_counts_may_differ(tmp_path):
    runs = [make_run(tmp_path / "w2v-jl0"), make_run(tmp_path / "debiased-jl1", "debiased", 1, train={
        "num_threads": 1})]
    assert len(combine(runs, tmp_path / "out")["included"]) == 2


def test_the_word_list_is_checked_in_every_run_not_only_the_first(tmp_path):
    make_run(tmp_path / "w2v-jl0", words_file="data/professions.txt")
    make_run(tmp_path / "w2v-jl1", jl_seed=1, words_file="data/class_words.json")
    with pytest.raises(InputError, match="data/class_words.json: lacks"):
        combine([tmp_path / "w2v-jl0", tmp_path / "w2v-jl1"], tmp_path / "out")


# ----------------------------------------------------------------------------- 3. reference arm


def test_an_unknown_reference_arm_is_refused_naming_the_arms(tmp_path):
    runs = [make_run(tmp_path / "w2v-jl0"), make_run(tmp_path / "debiased-jl0", "debiased")]
    with pytest.raises(InputError, match=r"--reference_arm: 'foo' .*\(arms: w2v, debiased\)"):
        combine(runs, tmp_path / "out", "--reference_arm", "foo")
    assert not (tmp_path / "out").exists()
    result = combine(runs, tmp_path / "out", "--reference_arm", "debiased")
    assert result["contrasts"] and {c["arm"] for c in result["contrasts"]} == {"w2v"}
    assert "### Each arm's slope minus the debiased slope" in (tmp_path / "out" / "report.md").read_text()


def test_nothing_pooled_says_so_instead_of_listing_no_arms(tmp_path):
    runs = [make_run(tmp_path / name, arm, summary={"controls_failed": ["accuracy"]})
            for name, arm in (("w2v-jl0", "w2v"), ("debiased-jl0", "debiased"))]
    with pytest.raises(InputError, match="no run passes its controls.*--include_failed"):
        combine(runs, tmp_path / "out", "--reference_arm", "debiased")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 4. thread-invariant projection shifts


def test_jl_gap_shifts_by_hand():
    # u = (1, 1)/sqrt 2 is as near f = (1, 0) as m = (0, 1): gap 0. P = diag(1, 2) stretches the
    # second axis: uP ~ (1, 2), fP ~ (1, 0), mP ~ (0, 1), so gap after = 1/sqrt 5 - 2/sqrt 5 = -1/sqrt 5.
    result = experiment_stats.jl_gap_shifts(np.array([[1.0, 1.0]]), np.array([1.0, 0.0]), np.array([0.0, 1.0]),
                                            np.array([[1.0, 0.0], [0.0, 2.0]]))
    assert result["gap_before"][0] == pytest.approx(0.0, abs=1e-15)
    assert result["gap_after"][0] == pytest.approx(-1 / math.sqrt(5))
    assert result["shift"][0] == pytest.approx(-1 / math.sqrt(5))


def test_fixed_order_matmul_is_the_matrix_product():
    a, b = np.array([[1.0, 2.0, 3.0]]), np.array([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    assert experiment_stats.fixed_order_matmul(a, b).tolist() == [[4.0, -1.0]]


JL_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from bias_begets_bias.utils import compact_csv_text, load_word_list
from bias_begets_bias.word_vectors import load_word_vectors, vocabulary_form
from statistical_auditing.combine_audits import jl_shift_rows
import torch
torch.set_num_threads({threads})
wv = load_word_vectors("w2v-bundled")
words = [w for w in dict.fromkeys(vocabulary_form(w, wv) for w in load_word_list(Path({repo!r}) / "data/professions.txt"))
         if w]
rows = jl_shift_rows(words, "w2v-bundled", [0, 1], [64, 256])
sys.stdout.write(compact_csv_text(rows, list(rows[0])))
"""


def test_jl_shift_table_is_the_same_text_under_one_and_two_threads():
    texts = []
    for threads in (1, 2):
        env = os.environ | {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                           "OPENBLAS_NUM_THREADS")}
        result = subprocess.run([sys.executable, "-c", JL_SCRIPT.format(repo=str(REPO), threads=threads)],
                                capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        texts.append(result.stdout)
    assert texts[0].count("\n") > 500 and texts[0] == texts[1]


# ----------------------------------------------------------------------------- 5. inputs from the repository


def test_the_word_list_is_read_from_the_repository_not_the_recorded_machine_path(tmp_path):
    # old form: the absolute path of the machine that made the run (no such folder here)
    old = make_run(tmp_path / "w2v-jl0", words_file="/nowhere/bbb/code-d806bef/data/professions.txt")
    # new form: a repository path and the file's sha256
    digest = hashlib.sha256((REPO / "data" / "professions.txt").read_bytes()).hexdigest()
    new = make_run(tmp_path / "w2v-jl1", jl_seed=1, words_file="data/professions.txt",
                   audit={"words_file_sha256": digest})
    combine([old, new], tmp_path / "out")
    shifts = list(csv.DictReader(io.StringIO((tmp_path / "out" / "jl_shifts.csv").read_text())))
    assert {"accountant", "pilot"} <= {r["word"] for r in shifts}


def test_a_recorded_hash_or_words_that_do_not_match_the_repository_file_are_refused(tmp_path):
    bad_hash = make_run(tmp_path / "a" / "w2v-jl0", words_file="data/professions.txt",
                        audit={"words_file_sha256": "0" * 64})
    with pytest.raises(InputError, match="sha256 .* differs from the 0000"):
        combine([bad_hash], tmp_path / "out")
    foreign_words = make_run(tmp_path / "b" / "w2v-jl0", words_file="/elsewhere/data/professions.txt",
                             words=["accountant", "dragon tamer"])
    with pytest.raises(InputError, match="data/professions.txt: lacks dragon tamer"):
        combine([foreign_words], tmp_path / "out")
    nowhere = make_run(tmp_path / "c" / "w2v-jl0", words_file="/elsewhere/not_in_the_repo.txt")
    with pytest.raises(InputError, match="no counterpart in the repository"):
        combine([nowhere], tmp_path / "out")


# ----------------------------------------------------------------------------- 6. where it writes


def test_out_inside_a_run_or_a_foreign_folder_is_refused_and_nothing_changes(tmp_path):
    run = make_run(tmp_path / "w2v-jl0")
    before = tree_snapshot(run)
    for out in (run / "audit", run, run / "audit" / "combined"):
        with pytest.raises(InputError, match="--out: .* inside the run folder"):
            combine([run], out)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me\n")
    with pytest.raises(InputError, match="--out: .* not an earlier combine output"):
        combine([run], foreign)
    assert tree_snapshot(run) == before and tree_snapshot(foreign) == {"mine.txt": b"keep me\n"}


def test_out_may_be_an_earlier_combine_output_marked_or_not(tmp_path):
    run = make_run(tmp_path / "w2v-jl0")
    out = tmp_path / "combined"
    combine([run], out)
    assert json.loads((out / ".owner.json").read_text()) == {"tool": "combine_audits"}
    combine([run], out)  # a rerun replaces its own output
    (out / ".owner.json").unlink()  # an output made before the marker: report.md + runs.csv
    combine([run], out)
    (out / ".owner.json").write_text(json.dumps({"tool": "audit"}))
    with pytest.raises(InputError, match="belongs to 'audit'"):
        combine([run], out)


# ----------------------------------------------------------------------------- 7. no absolute paths written


def test_outputs_name_runs_by_relative_paths(tmp_path):
    runs = [make_run(tmp_path / "runs" / "w2v-jl0"), make_run(tmp_path / "runs" / "debiased-jl0", "debiased")]
    out = tmp_path / "combined"
    combine(runs, out)
    for path in out.iterdir():
        if path.suffix in (".csv", ".md", ".json"):
            assert str(tmp_path) not in path.read_text(), path.name
    rows = list(csv.DictReader(io.StringIO((out / "runs.csv").read_text())))
    assert [r["path"] for r in rows] == ["../runs/w2v-jl0", "../runs/debiased-jl0"]  # outside the repository
    assert combine_audits.display_path(REPO / "results" / "experiment" / "runs" / "w2v-jl0", out) == \
        "results/experiment/runs/w2v-jl0"


ABSOLUTE_MARKERS = ("/root/", "/work/", "/tmp/", "/home/")


def test_no_file_under_results_holds_an_absolute_path():
    offenders = []
    for path in sorted((REPO / "results").rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if b"\0" not in data:  # text files; PNGs hold no records
                text = data.decode("utf-8", errors="replace")
                offenders += [f"{path.relative_to(REPO)}: {m}" for m in ABSOLUTE_MARKERS if m in text]
    assert not offenders, offenders[:10]


def test_relativize_records_maps_each_kind_of_path_and_is_idempotent():
    sys.path.insert(0, str(REPO / "tools"))
    import relativize_records as R

    kept = {"w2v-jl0"}
    text = ('"/root/bbb/code-d806bef/data/professions.txt" `/root/bbb/experiment3/w2v-jl0`, '
            '/root/bbb/experiment3/logs/train__w2v-jl0.log: /work/main/.venv/bin/python /root/bbb/expdata/32/test')
    once = R.relativize_text(text, kept)
    assert once == ('"data/professions.txt" `results/experiment/runs/w2v-jl0`, ~/bbb/experiment3/logs/'
                    'train__w2v-jl0.log: .venv/bin/python ~/bbb/expdata/32/test')
    assert R.relativize_text(once, kept) == once
    with pytest.raises(InputError, match="/home/someone/x.txt"):
        R.relativize_text("see /home/someone/x.txt", kept)


# ----------------------------------------------------------------------------- 8/9. the committed results regenerate

# The files combine_audits.py writes as CSV; runs.csv gained its "path" column after the committed
# run, so it is compared on the committed columns.
COMBINED_CSVS = ("runs.csv", "seen.csv", "seen_arms.csv", "regressions.csv", "contrasts.csv", "r2_contrasts.csv",
                 "held_out.csv", "unseen.csv", "spread.csv", "components.csv", "jl_shifts.csv", "jl_shift_summary.csv", "dose_slopes.csv",
                 "dose_points.csv", "lipschitz.csv")
REGENERATED = {  # committed combine output -> the committed runs it was made from (their pages give the command)
    COMMITTED: [COMMITTED / "runs" / f"{arm}-jl{seed}" for seed in (0, 1, 2) for arm in ("w2v", "debiased", "projected")],
    REPO / "results" / "whose_bias" / "combined": [REPO / "results" / "whose_bias" / "runs" / f"{arm}-jl{seed}{train}"
                                                   for seed in (0, 1) for arm in ("w2v", "debiased", "projected")
                                                   for train in ("", "-s1")],
}


@pytest.mark.smoke
@pytest.mark.parametrize("committed", list(REGENERATED), ids=lambda path: path.relative_to(REPO).as_posix())
def test_the_committed_combined_csvs_regenerate_from_the_committed_runs(tmp_path, committed):
    runs = [str(run) for run in REGENERATED[committed]]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "statistical_auditing" / "combine_audits.py"), "--runs",
                             ",".join(runs), "--out", str(tmp_path / "combined")], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    problems = []
    for name in COMBINED_CSVS:
        problems += compare_csv(tmp_path / "combined" / name, committed / name)
    assert not problems, problems[:20]
