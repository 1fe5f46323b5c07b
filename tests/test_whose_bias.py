"""whose_bias.py: the crossed-design analysis of kept runs, on synthetic runs with known components."""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from bias_begets_bias.cli import InputError
from statistical_auditing import whose_bias as wb

from conftest import compare_csv

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "results" / "experiment" / "runs" / "w2v-jl0" / "config.json"
WORDS = ["accountant", "architect", "artist", "author", "baker", "bartender", "bus driver", "butcher", "carpenter",
         "cashier", "clerk", "coach", "cook", "dancer", "dentist", "designer", "doctor", "economist", "editor",
         "electrician", "engineer", "farmer", "firefighter", "hairdresser", "janitor", "lawyer", "librarian",
         "mechanic", "nurse practitioner", "pilot", "plumber", "poet", "professor", "receptionist", "secretary",
         "singer", "surgeon", "tailor", "teacher", "writer"]
SEEN = {"man": 0.03, "woman": 0.97, "person": 0.5}
TRUTH = {"w2v": dict(word=0.08, slope=2.0), "debiased": dict(word=0.0, slope=0.0)}
SD_JL, SD_TRAIN, N = 0.06, 0.04, 64


def write_run(folder: Path, arm: str, jl: int, train: int, shares: dict[str, float], gaps: dict[str, float]) -> None:
    config = json.loads(CONFIG.read_text())
    config = copy.deepcopy(config) | {"debias": wb.ARM_DEBIAS[arm], "jl_seed": jl}
    config["train"] = config["train"] | {"seed": train, "debias": wb.ARM_DEBIAS[arm], "jl_seed": jl}
    (folder / "audit").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "conditioning.safetensors").write_bytes(b"")  # marks a run folder; the analysis does not read it
    rng = np.random.default_rng(zlib.crc32(f"{arm}-{jl}-{train}".encode()))
    columns = ["word", "seen", "guidance", "method", "n", "successes", "share", "cosine_gap_w2v", "cosine_gap_jl"]
    with open(folder / "audit" / "proportions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for word, p in [*SEEN.items(), *shares.items()]:
            for method, guidance in (("scoredecomp", 1), ("attribute", 1), ("scoredecomp", 3)):
                successes = int(rng.binomial(N, float(np.clip(p, 0, 1))))
                writer.writerow({"word": word, "seen": word in SEEN, "guidance": guidance, "method": method, "n": N,
                                 "successes": successes, "share": successes / N,
                                 "cosine_gap_w2v": gaps.get(word, 0.0), "cosine_gap_jl": gaps.get(word, 0.0) + 0.01 * jl})
    (folder / "records.json").write_text(json.dumps({"train/x": {"starts": [{"commit": "0123456789abcdef"}]}}))


@pytest.fixture(scope="module")
def crossed_runs(tmp_path_factory) -> Path:
    """Two arms x JL seeds {0, 1, 2} x training seeds {789, 1}: the w2v arm's words lean along a
    planted gap with slope 2 plus a word part; the debiased arm has no word part at all."""
    root = tmp_path_factory.mktemp("whose") / "runs"
    rng = np.random.default_rng(7)
    gaps = dict(zip(WORDS, rng.normal(0, 0.03, len(WORDS))))
    planted = {}
    for arm, truth in TRUTH.items():
        own = rng.normal(0, truth["word"], len(WORDS)) if truth["word"] else np.zeros(len(WORDS))
        base = {w: 0.5 + truth["slope"] * gaps[w] + own[i] for i, w in enumerate(WORDS)}
        planted[arm] = float(np.std(list(base.values()), ddof=1))  # the word part these 40 words carry
        by_jl = {jl: rng.normal(0, SD_JL, len(WORDS)) for jl in (0, 1, 2)}
        by_train = {t: rng.normal(0, SD_TRAIN, len(WORDS)) for t in (789, 1)}
        for jl in (0, 1, 2):
            for train in (789, 1):
                shares = {w: base[w] + by_jl[jl][i] + by_train[train][i] for i, w in enumerate(WORDS)}
                name = f"{arm}-jl{jl}" + ("" if train == 789 else f"-s{train}")
                assert 0.05 < min(shares.values()) and max(shares.values()) < 0.95  # no clipping
                write_run(root / name, arm, jl, train, shares, gaps)
    (root.parent / "planted.json").write_text(json.dumps(planted))
    return root


ARGS = ["--n_boot", "300", "--cv_repeats", "20", "--vocabulary", "800", "--neighbours", "20"]


def test_the_analysis_recovers_the_planted_components(crossed_runs, tmp_path):
    out = tmp_path / "analysis"
    result = wb.main(["--runs", str(crossed_runs), "--out", str(out), *ARGS])
    assert result["words"] == WORDS and result["dropped"] == []
    w2v, debiased = result["results"]["w2v"], result["results"]["debiased"]
    assert w2v.arm.shares.shape == (len(WORDS), 3, 2)
    low, high = w2v.components["intervals"]["sd_word"]
    planted = json.loads((crossed_runs.parent / "planted.json").read_text())
    assert low <= planted["w2v"] <= high  # the sd of the word parts planted (own part + slope x gap)
    assert debiased.components["intervals"]["sd_word"][0] < 0.03  # no word part planted
    for arm in (w2v, debiased):
        jl_low, jl_high = arm.components["intervals"]["sd_word_x_jl"]
        assert jl_low <= SD_JL <= jl_high + 0.02
    assert w2v.on_w2v["slope_ci"][0] <= 2.0 <= w2v.on_w2v["slope_ci"][1]
    assert debiased.on_w2v["slope_ci"][0] <= 0.0 <= debiased.on_w2v["slope_ci"][1]
    differences = {(r["contrast"], r["statistic"]): r for r in result["tables"]["differences"]}
    assert differences[("debiased - w2v", "word variance")]["ci_high"] < 0  # debiasing removed the word part
    seen = {(r["arm"], r["word"]): r for r in result["tables"]["seen"]}
    assert seen[("w2v", "woman")]["runs"] == 6 and seen[("w2v", "woman")]["ci_low"] > 0.9
    assert all(0.0 <= row["ci_low"] <= row["mean_share"] <= row["ci_high"] <= 1.0 for row in seen.values())
    for name in ("components", "differences", "predictors", "per_run", "words", "seen"):
        assert (out / f"{name}.csv").stat().st_size > 0
    for name in ("components.png", "word_effects.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "40 unseen words, 12 runs" in report and "0123456" in report
    # the report's own command, re-run as written (to another --out), gives the same numbers (seeded bootstraps)
    command = shlex.split(re.search(r"`(python statistical_auditing/whose_bias.py [^`]*)`", report).group(1))
    again = wb.main([*command[2:], "--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "components.csv").read_text() == (out / "components.csv").read_text()
    assert again["tables"]["differences"] == result["tables"]["differences"]


def test_bad_designs_are_refused_before_any_output(crossed_runs, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(crossed_runs, runs)
    shutil.rmtree(runs / "debiased-jl1-s1")
    with pytest.raises(InputError, match="debiased is not a complete grid.*missing JL 1 x training 1"):
        wb.main(["--runs", str(runs), "--out", str(tmp_path / "out"), *ARGS])
    shutil.copytree(runs / "debiased-jl1", runs / "copy-of-debiased-jl1")
    with pytest.raises(InputError, match="the same run"):
        wb.main(["--runs", str(runs), "--out", str(tmp_path / "out"), *ARGS])
    with pytest.raises(InputError, match="--out.*lies in the run folder"):
        wb.main(["--runs", str(crossed_runs), "--out", str(crossed_runs / "w2v-jl0" / "x"), *ARGS])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("a user's file")
    with pytest.raises(InputError, match="--out.*not whose_bias's"):
        wb.main(["--runs", str(crossed_runs), "--out", str(tmp_path / "notes"), *ARGS])
    assert (tmp_path / "notes" / "mine.txt").read_text() == "a user's file"
    with pytest.raises(InputError, match="--runs.*not a folder"):
        wb.main(["--runs", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), *ARGS])
    with pytest.raises(InputError, match="no rows of method"):
        wb.main(["--runs", str(crossed_runs), "--out", str(tmp_path / "out"), "--guidance", "2", *ARGS])
    assert not (tmp_path / "out").exists()


def test_an_arm_with_one_training_seed_is_refused(crossed_runs, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for folder in crossed_runs.iterdir():
        if "-s1" not in folder.name:
            shutil.copytree(folder, runs / folder.name)
    with pytest.raises(InputError, match="needs at least 2 of each"):
        wb.main(["--runs", str(runs), "--out", str(tmp_path / "out"), *ARGS])


def test_arms_picks_the_complete_arms_of_a_grid_in_progress(crossed_runs, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(crossed_runs, runs)
    shutil.rmtree(runs / "debiased-jl2-s1")  # the debiased arm is still running
    result = wb.main(["--runs", str(runs), "--out", str(tmp_path / "out"), "--arms", "w2v", *ARGS])
    assert list(result["results"]) == ["w2v"] and result["results"]["w2v"].arm.shares.shape == (len(WORDS), 3, 2)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "6 runs" in report and "--arms w2v" in report and "debiased" not in report
    with pytest.raises(InputError, match="--arms: unknown arm.*w2vv"):
        wb.main(["--runs", str(runs), "--out", str(tmp_path / "out2"), "--arms", "w2vv", *ARGS])
    with pytest.raises(InputError, match="--arms: no run of arm.*projected"):
        wb.main(["--runs", str(runs), "--out", str(tmp_path / "out2"), "--arms", "w2v,projected", *ARGS])
    assert not (tmp_path / "out2").exists()


def test_words_restricts_the_analysis_to_a_list_or_a_csv_column(crossed_runs, tmp_path):
    chosen = ["surgeon", "nurse practitioner", "baker", "pilot", "tailor"]
    result = wb.main(["--runs", str(crossed_runs), "--out", str(tmp_path / "out"), "--words", ",".join(chosen), *ARGS])
    assert result["words"] == ["baker", "nurse practitioner", "pilot", "surgeon", "tailor"]  # in the runs' order
    assert result["results"]["w2v"].arm.shares.shape == (5, 3, 2)
    listing = tmp_path / "words.csv"
    listing.write_text("word,other\nsurgeon,1\nbaker,2\nsurgeon,3\nnurse practitioner,4\ntailor,5\npilot,6\n")
    again = wb.main(["--runs", str(crossed_runs), "--out", str(tmp_path / "out_csv"), "--words", str(listing), *ARGS])
    assert again["words"] == result["words"]
    assert "the 5 unseen words chosen by --words" in (tmp_path / "out_csv" / "report.md").read_text()
    with pytest.raises(InputError, match="--words: not an unseen word audited in every run: astronaut"):
        wb.main(["--runs", str(crossed_runs), "--out", str(tmp_path / "bad"), "--words", "baker,astronaut", *ARGS])
    with pytest.raises(InputError, match="--runs/--words: only 3 unseen words"):
        wb.main(["--runs", str(crossed_runs), "--out", str(tmp_path / "bad"), "--words", "baker,pilot,tailor", *ARGS])
    with pytest.raises(InputError, match="--words: .*nowhere.csv is not a file"):
        wb.main(["--runs", str(crossed_runs), "--out", str(tmp_path / "bad"), "--words", str(tmp_path / "nowhere.csv"),
                 *ARGS])
    assert not (tmp_path / "bad").exists()


# Every committed analysis of results/whose_bias/ regenerates from the committed runs by the command
# its report.md names (seeded bootstraps: the same numbers, up to float rounding).
ANALYSES = sorted(path.parent for path in (REPO / "results" / "whose_bias").glob("*/report.md")
                  if "statistical_auditing/whose_bias.py" in path.read_text())


def test_the_committed_analyses_are_found():
    assert {path.name for path in ANALYSES} >= {"analysis", "analysis_attribute", "analysis_first20"}


@pytest.mark.smoke
@pytest.mark.parametrize("committed", ANALYSES, ids=lambda path: path.relative_to(REPO).as_posix())
def test_a_committed_analysis_regenerates_from_the_committed_runs(tmp_path, committed):
    report = (committed / "report.md").read_text()
    command = shlex.split(re.search(r"`(python statistical_auditing/whose_bias.py [^`]*)`", report).group(1))
    assert command[command.index("--out") + 1] == committed.relative_to(REPO).as_posix()
    result = subprocess.run([sys.executable, *command[1:], "--out", str(tmp_path / "again")], cwd=REPO,
                            capture_output=True, text=True, timeout=900,
                            env=os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    csvs = sorted(path.name for path in committed.glob("*.csv"))
    assert "components.csv" in csvs
    problems = [p for name in csvs for p in compare_csv(tmp_path / "again" / name, committed / name)]
    assert not problems, problems[:20]


def test_a_gap_without_spread_has_no_per_run_slope():
    # debiasing after the projection leaves an after-JL gap of 0 up to float rounding: no slope on it
    rng = np.random.default_rng(0)
    shares = rng.uniform(0.3, 0.7, (6, 2, 2))
    runs = [[wb.Run(f"r{j}{t}", Path("."), "projected", j, t, {}, {}, {}, []) for t in range(2)] for j in range(2)]
    arm = wb.Arm("projected", runs, [f"w{i}" for i in range(6)], shares, np.full(shares.shape, 64.0),
                 rng.normal(0, 0.05, 6), rng.normal(0, 1e-8, (6, 2, 2)))
    fits = wb.per_run_fits(arm)
    assert len(fits) == 4 and all(np.isnan(row["slope_after_jl"]) and np.isnan(row["r2_after_jl"]) for row in fits)
    assert np.isnan(wb.per_run_t(fits, "slope_after_jl", 0.95)["mean"])
    assert wb.fmt_ci(math.nan, "", "") == "not defined"
    arm.jl_gap = arm.jl_gap * 1e6  # sd about 0.01: a predictor again
    assert all(np.isfinite(row["slope_after_jl"]) for row in wb.per_run_fits(arm))
