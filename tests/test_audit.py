"""The audit and the combination of audits, on the smoke run (an untrained model: structure and
consistency are checked, not accuracy)."""
import csv
import json
import math
import shutil
import time
from pathlib import Path

import pytest

from conftest import run_script
from diffusion_from_scratch.cli import InputError, run_main
from statistical_auditing import audit, combine_audits

TINY = ["--n_per_word", "2", "--n_control", "0", "--max_unseen", "3", "--sample_steps", "2", "--k_list", "1,10", "--test_limit", "12",
        "--n_boot", "50", "--batch_size", "16", "--num_threads", "1"]
SEEN = ["man", "person", "woman", "nurse", "philosopher"]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def audited(smoke_run, tmp_path_factory):
    """A copy of the smoke run, audited once in a subprocess; (run folder, seconds, stdout)."""
    run = tmp_path_factory.mktemp("audit") / "smoke"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("audit"))
    started = time.perf_counter()
    result = run_script("statistical_auditing/audit.py", "--run", str(run), *TINY)
    return run, time.perf_counter() - started, result.stdout


@pytest.mark.smoke
def test_audit_writes_a_consistent_report(audited):
    run, _, stdout = audited
    out = run / "audit"
    for name in ("report.md", "proportions.csv", "controls.csv", "regression.csv", "fidelity.csv", "audit.json",
                 "controls.png", "samples_g1.png", "samples_g3.png", "shares_g1_scoredecomp.png",
                 "shares_g3_scoredecomp.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "audit.json").read_text())
    assert summary["seen"] == SEEN and len(summary["unseen"]) == 3
    assert not set(summary["unseen"]) & set(SEEN)
    assert summary["dataset_source"] == "procedural"
    assert summary["methods"] == ["scoredecomp", "attribute"]
    assert summary["k"] in (1, 10) and summary["sampled"] == 16 and summary["cached"] == 0

    rows = read_csv(out / "proportions.csv")
    words = SEEN + summary["unseen"]
    assert len(rows) == len(words) * 2 * 2  # words x guidance scales x methods
    assert {(r["word"], r["guidance"], r["method"]) for r in rows} == {
        (w, g, m) for w in words for g in ("1", "3") for m in ("scoredecomp", "attribute")}
    for r in rows:
        n, successes = int(r["n"]), int(r["successes"])
        assert 0 <= successes <= n and n + int(r["n_undetermined"]) == 2
        assert r["seen"] == str(r["word"] in SEEN)
        if n:
            share, low, high = float(r["share"]), float(r["ci_low"]), float(r["ci_high"])
            assert share == pytest.approx(successes / n, abs=1e-5)
            assert 0 <= low <= share <= high <= 1
        else:
            assert r["share"] == r["ci_low"] == r["ci_high"] == ""
        assert r["lookup_rule"] in ("word", "underscore", "token-mean")
        gap = float(r["cosine_gap"])
        assert gap == pytest.approx(float(r["cos_woman"]) - float(r["cos_man"]), abs=1e-5)
        assert math.isfinite(float(r["cosine_gap_jl"]))
        if r["method"] == "scoredecomp":
            assert int(r["k"]) == summary["k"]
            assert r["base"] == "person"  # the default --scoredecomp_base, for every word
            assert 0 <= float(r["mean_weight"]) <= 1

    controls = read_csv(out / "controls.csv")
    assert [int(c["k"]) for c in controls] == [1, 10]
    assert [c["chosen"] for c in controls].count("True") == 1
    for c in controls:
        assert int(c["n"]) == 12 and float(c["ci_low"]) <= float(c["accuracy"]) <= float(c["ci_high"])
    fits = read_csv(out / "regression.csv")
    assert {(f["guidance"], f["method"], f["x"]) for f in fits} == {
        (g, m, x) for g in ("1", "3") for m in ("scoredecomp", "attribute") for x in ("cosine_gap", "cosine_gap_jl")}
    for f in fits:  # fitted (with a plot) or skipped with a reason
        assert bool(f["skipped"]) != bool(f["slope"])
        if f["slope"]:
            plot = out / f"regression_g{f['guidance']}_{f['method']}_{f['x']}.png"
            assert plot.is_file()

    report = (out / "report.md").read_text()
    for section in ("## Setup", "## Controls", "## Seen words", "## Unseen words", "## Regression"):
        assert section in report
    for word in words:
        assert f"| {word} |" in report
    assert "training step" in report and "ddim, 2 steps" in report and f"k = {summary['k']}" in report
    for image in ("controls.png", "samples_g1.png", "shares_g1_scoredecomp.png"):
        assert f"]({image})" in report
    assert "[audit] sampling and calling gender:" in stdout  # time per stage is printed


@pytest.mark.smoke
def test_rerun_reuses_the_cached_samples(audited, capsys, tmp_path):
    audited_run, first_seconds, _ = audited
    run = tmp_path / "moved"  # a moved copy keeps its cache valid; the fixture's audit stays untouched
    shutil.copytree(audited_run, run)
    cache = sorted((run / "audit" / "samples").rglob("*.npy"))
    assert len(cache) == 16
    stamps = {p: p.stat().st_mtime_ns for p in cache}
    before = read_csv(run / "audit" / "proportions.csv")
    started = time.perf_counter()
    summary = audit.main(["--run", str(run)] + TINY)  # in-process: the subprocess start-up is not the point
    assert (summary["sampled"], summary["cached"]) == (0, 16)
    stdout = capsys.readouterr().out
    assert "0 sampled, 16 from the cache" in stdout and "reusing controls.json" in stdout
    assert {p: p.stat().st_mtime_ns for p in cache} == stamps  # nothing resampled
    after = read_csv(run / "audit" / "proportions.csv")  # same seeds, same calls
    assert [{k: v for k, v in r.items() if k != "mean_weight"} for r in after] == \
        [{k: v for k, v in r.items() if k != "mean_weight"} for r in before]
    for old, new in zip(before, after):  # weights agree up to the thread count's rounding
        assert (old["mean_weight"] == new["mean_weight"] == "") or \
            float(old["mean_weight"]) == pytest.approx(float(new["mean_weight"]), abs=1e-4)
    assert time.perf_counter() - started < first_seconds
    # other settings make a new sample set instead of reusing a mismatched one
    summary = audit.main(["--run", str(run)] + TINY + ["--guidance", "1", "--words", "doctor", "--sample_steps", "3",
                                                       "--elbo", "true", "--elbo_samples", "2"])
    assert (summary["sampled"], summary["cached"]) == (6, 0)
    assert summary["methods"] == ["scoredecomp", "attribute", "elbo"] and summary["unseen"] == ["doctor"]
    rows = read_csv(run / "audit" / "proportions.csv")
    assert len(rows) == 6 * 3 and {r["method"] for r in rows} == {"scoredecomp", "attribute", "elbo"}
    assert "ELBO classifier" in (run / "audit" / "report.md").read_text()


def _main_error(argv) -> str:
    with pytest.raises(InputError) as error:
        audit.main(argv)
    return str(error.value)


def test_a_run_without_a_checkpoint_is_refused(tmp_path, smoke_run):
    (tmp_path / "config.json").write_text((smoke_run / "config.json").read_text())
    assert "no checkpoint" in _main_error(["--run", str(tmp_path)])


def test_bad_inputs_are_named(tmp_path, smoke_run, small_dataset):
    run = ["--run", str(smoke_run), "--out", str(tmp_path / "out")] + TINY
    message = _main_error(run + ["--words", "doctor,qwzxv"])
    assert "'qwzxv'" in message and "doctor" not in message.split("not in")[0]
    assert "k=5000 is outside the timestep table" in _main_error(run[:4] + ["--k_list", "1,5000"])
    assert "--k: k=0" not in _main_error(run + ["--k", "2000"])
    assert "--guidance" in _main_error(run + ["--guidance", "1,x"])
    empty = tmp_path / "empty" / "32"
    for name in json.loads((smoke_run / "config.json").read_text())["classes"]:
        (empty / "test" / name).mkdir(parents=True)
    assert "no images" in _main_error(run + ["--dataset_path", str(empty)])
    assert "does not exist" in _main_error(run + ["--dataset_path", str(tmp_path / "nowhere")])


def test_bad_input_exits_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: audit.main(["--run", str(tmp_path / "missing")]))
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.strip().startswith("error: --run:") and "Traceback" not in stderr


def test_unseen_words_skip_missing_respell_and_spread():
    class Vocabulary:
        source = "fake"
        words = {"CEO", "nurse", "doctor", "baker", "pilot", "teacher"}

        def __contains__(self, word):
            return word in self.words

    cfg = {"words": "", "words_file": "", "max_unseen": 0}
    listing = audit.unseen_candidates(cfg | {"words": "ceo,doctor,nurse"}, ["nurse"], Vocabulary())
    assert listing["usable"] == ["CEO", "doctor"] and listing["respelled"] == {"ceo": "CEO"}
    assert listing["trained"] == ["nurse"] and listing["missing"] == []
    with pytest.raises(InputError, match="'qwzxv'"):
        audit.unseen_candidates(cfg | {"words": "doctor,qwzxv"}, [], Vocabulary())
    gaps = {"a": -0.3, "b": -0.1, "c": 0.0, "d": 0.1, "e": 0.4}
    assert audit.pick_unseen(list(gaps), gaps, 3, "spread") == ["a", "c", "e"]
    assert audit.pick_unseen(["e", "a", "d", "b", "c"], gaps, 2, "first") == ["a", "e"]
    assert audit.pick_unseen(list(gaps), gaps, 0, "spread") == list(gaps)


def _rewrite_csv(path: Path, rows: list[dict], columns) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(columns))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.smoke
def test_combine_audits_groups_arms_and_seeds(audited, tmp_path):
    run, _, _ = audited
    copies = []
    # two JL seeds of the original arm, one of the debiased arm; known nurse shares and slopes
    for name, debias, seed, nurse, slope in (("w2v-s0", False, 0, 0.25, 1.0), ("w2v-s1", False, 1, 0.75, 3.0),
                                             ("deb-s0", True, 0, 0.5, -1.0)):
        copy = tmp_path / name
        shutil.copytree(run / "audit", copy / "audit", ignore=shutil.ignore_patterns("samples"))
        summary_path = copy / "audit" / "audit.json"
        summary = json.loads(summary_path.read_text()) | {"debias": debias, "jl_seed": seed}
        summary_path.write_text(json.dumps(summary))
        rows = read_csv(copy / "audit" / "proportions.csv")
        for r in rows:
            if r["word"] == "nurse" and r["method"] == "scoredecomp" and r["guidance"] == "1":
                r["share"] = str(nurse)
        _rewrite_csv(copy / "audit" / "proportions.csv", rows, rows[0])
        fit = {"guidance": "1", "method": "scoredecomp", "x": "cosine_gap", "n_words": "3", "slope": str(slope),
               "slope_ci_low": str(slope - 1), "slope_ci_high": str(slope + 1), "intercept": "0.5", "r2": "0.5",
               "r2_ci_low": "0.1", "r2_ci_high": "0.9", "p_value": "0.2", "skipped": ""}
        skipped = dict.fromkeys(fit, "") | {"guidance": "3", "method": "attribute", "x": "cosine_gap",
                                             "n_words": "0", "skipped": "too few points"}
        _rewrite_csv(copy / "audit" / "regression.csv", [fit, skipped], audit.REGRESSION_COLUMNS)
        copies.append(copy)
    out = tmp_path / "combined"
    result = combine_audits.main(["--runs", ",".join(map(str, copies)), "--out", str(out)])
    assert result["arms"] == ["w2v-bundled, original", "w2v-bundled, hard-debiased"]
    nurse = {r["arm"]: r for r in result["arm_rows"] if r["word"] == "nurse" and r["method"] == "scoredecomp"
             and r["guidance"] == 1.0}
    original, debiased = nurse["w2v-bundled, original"], nurse["w2v-bundled, hard-debiased"]
    assert original["n_runs"] == 2 and original["jl_seeds"] == "0;1"
    assert original["mean"] == pytest.approx(0.5) and original["sd"] == pytest.approx(0.5 ** 0.5 / 2)
    assert (original["min"], original["max"]) == (0.25, 0.75)
    assert debiased["n_runs"] == 1 and debiased["mean"] == 0.5 and math.isnan(debiased["sd"])
    fits = {f["arm"]: f for f in result["arm_fits"]}
    assert len(result["arm_fits"]) == 2  # skipped fits are left out
    assert fits["w2v-bundled, original"]["slope_mean"] == pytest.approx(2.0)
    assert fits["w2v-bundled, original"]["slope_sd"] == pytest.approx(2 ** 0.5)
    assert fits["w2v-bundled, hard-debiased"]["slope_mean"] == pytest.approx(-1.0)
    for name in ("report.md", "shares.csv", "arms.csv", "regressions.csv", "arm_regressions.csv",
                 "shares_g1_scoredecomp.png"):
        assert (out / name).is_file(), name
    assert len(read_csv(out / "regressions.csv")) == 3
    report = (out / "report.md").read_text()
    assert "## Female share per word" in report and "## Regression" in report
    assert "| nurse | yes | 0.50 ± 0.35 [0.25, 0.75] (2; JL seed: share 0: 0.25, 1: 0.75) |" in report
    with pytest.raises(InputError, match="no complete audit"):
        combine_audits.main(["--runs", str(tmp_path / "nothing"), "--out", str(out)])


def test_scoredecomp_base_is_the_mixture_word_or_the_word_itself():
    from statistical_auditing.audit import scoredecomp_base

    assert scoredecomp_base("dentist", {"scoredecomp_base": "person", "control_base": "person"}) == "person"
    word_mode = {"scoredecomp_base": "word", "control_base": "person"}
    assert scoredecomp_base("dentist", word_mode) == "dentist"
    assert scoredecomp_base("woman", word_mode) == "person"  # a candidate's own score is one candidate
