"""The audit and the combination of audits, on the smoke run (an untrained model: structure and
consistency are checked, not accuracy), and the combined report on hand-made audits whose pooled
numbers are worked out by hand."""
import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from conftest import SMOKE_AUDIT
from bias_begets_bias.cli import InputError, run_main
from statistical_auditing import audit, combine_audits
from statistical_auditing.core.stats import wilson_interval

# audit.py's smoke preset: 2 seeds x 2 images per seen word and scale, 2 per unseen word, 3 unseen words,
# 2 sampler steps, k in {1, 10}, 12 labelled test images, 50 bootstrap resamples, no instrument check
TINY = SMOKE_AUDIT
SEEN = ["man", "person", "woman", "nurse", "philosopher"]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.smoke
def test_audit_writes_a_consistent_report(audited_smoke_run):
    out = audited_smoke_run / "audit"
    stdout = (audited_smoke_run.parent / "audit_stdout.txt").read_text()
    for name in ("report.md", "proportions.csv", "seeds.csv", "controls.csv", "regression.csv", "fidelity.csv",
                 "audit.json", "controls.png", "samples_g1.png", "samples_g3.png", "shares_g1_scoredecomp.png",
                 "shares_g3_scoredecomp.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "audit.json").read_text())
    assert summary["seen"] == SEEN and len(summary["unseen"]) == 3
    assert not set(summary["unseen"]) & set(SEEN)
    assert summary["dataset_source"] == "procedural"
    assert summary["methods"] == ["scoredecomp", "attribute"]
    # 2 scales x (5 seen words x 2 seeds + 3 unseen words) sample sets
    assert summary["k"] in (1, 10) and summary["sampled"] == 26 and summary["cached"] == 0

    rows = read_csv(out / "proportions.csv")
    words = SEEN + summary["unseen"]
    assert len(rows) == len(words) * 2 * 2  # words x guidance scales x methods
    assert {(r["word"], r["guidance"], r["method"]) for r in rows} == {
        (w, g, m) for w in words for g in ("1", "3") for m in ("scoredecomp", "attribute")}
    for r in rows:
        n, successes = int(r["n"]), int(r["successes"])
        images = 4 if r["word"] in SEEN else 2
        assert 0 <= successes <= n and n + int(r["n_undetermined"]) == images
        assert r["seen"] == str(r["word"] in SEEN)
        if n:  # the share and its interval are the Wilson interval of the counts
            low, high = wilson_interval(successes, n)
            assert float(r["share"]) == pytest.approx(successes / n, abs=1e-5)
            assert (float(r["ci_low"]), float(r["ci_high"])) == pytest.approx((low, high), abs=1e-5)
        else:
            assert r["share"] == r["ci_low"] == r["ci_high"] == ""
        assert r["lookup_rule"] in ("word", "underscore", "token-mean")
        assert float(r["cosine_gap"]) == pytest.approx(float(r["cos_woman"]) - float(r["cos_man"]), abs=1e-5)
        assert float(r["cosine_gap_w2v"]) == pytest.approx(float(r["cosine_gap"]), abs=1e-6)  # the w2v run
        assert math.isfinite(float(r["cosine_gap_jl"]))
        if r["method"] == "scoredecomp":
            assert int(r["k"]) == summary["k"] and r["call"] == "argmax"
            assert r["base"] == "person"  # the default --scoredecomp_base, for every word
            assert 0 <= float(r["mean_weight"]) <= 1
        else:
            assert sum(float(r[f"scene_{s}"]) for s in ("neutral", "hospital", "library", "unclear")) == \
                pytest.approx(1)

    controls = read_csv(out / "controls.csv")
    assert [int(c["k"]) for c in controls] == [1, 10]
    assert [c["chosen"] for c in controls].count("True") == 1
    chosen = next(c for c in controls if c["chosen"] == "True")
    # k is the best on the selection half (ties to the smaller k)
    best = max(float(c["selection_accuracy"]) for c in controls)
    assert int(chosen["k"]) == min(int(c["k"]) for c in controls if float(c["selection_accuracy"]) == best)
    for c in controls:
        assert int(c["selection_n"]) == int(c["report_n"]) == 6
        low, high = wilson_interval(int(c["report_correct"]), 6)
        assert (float(c["report_ci_low"]), float(c["report_ci_high"])) == pytest.approx((low, high), abs=1e-5)
    assert summary["accuracy_at_k"]["accuracy"] == pytest.approx(float(chosen["report_accuracy"]), abs=1e-5)
    fits = read_csv(out / "regression.csv")
    assert {(f["guidance"], f["method"], f["x"]) for f in fits} == {
        (g, m, x) for g in ("1", "3") for m in ("scoredecomp", "attribute")
        for x in ("cosine_gap_w2v", "cosine_gap", "cosine_gap_jl")}
    for f in fits:  # fitted (with a plot) or undefined with a reason, never both
        assert (f["defined"] == "True") == bool(f["slope"]) != bool(f["reason"])
        if f["defined"] == "True":
            assert (out / f"regression_g{f['guidance']}_{f['method']}_{f['x']}.png").is_file()

    seeds = read_csv(out / "seeds.csv")
    assert len(seeds) == 5 * 2 * 2 * 2  # seen words x scales x methods x seeds
    report = (out / "report.md").read_text()
    for section in ("## Setup", "## Controls", "## Seen words", "## Unseen words", "## Regression"):
        assert section in report
    for word in words:
        assert f"| {word} |" in report
    assert "training step" in report and "dpm, 2 steps" in report and f"k = {summary['k']}" in report
    for image in ("controls.png", "samples_g1.png", "shares_g1_scoredecomp.png"):
        assert f"]({image})" in report
    assert "[audit] sampling and calling gender:" in stdout  # time per stage is printed


@pytest.mark.smoke
def test_rerun_reuses_the_cached_samples(audited_smoke_run, capsys, tmp_path):
    run = tmp_path / "moved"  # a moved copy keeps its cache valid; the fixture's audit stays untouched
    shutil.copytree(audited_smoke_run, run)
    cache = sorted((run / "audit" / "samples").rglob("*.npy"))
    assert len(cache) == 26
    stamps = {p: p.stat().st_mtime_ns for p in cache}
    before = read_csv(run / "audit" / "proportions.csv")
    summary = audit.main(["--run", str(run)] + TINY)  # in-process: the subprocess start-up is not the point
    assert (summary["sampled"], summary["cached"]) == (0, 26)
    stdout = capsys.readouterr().out
    assert "0 sampled, 26 from the cache" in stdout
    assert {p: p.stat().st_mtime_ns for p in cache} == stamps  # nothing resampled
    after = read_csv(run / "audit" / "proportions.csv")  # same seeds, same calls
    assert [{k: v for k, v in r.items() if k != "mean_weight"} for r in after] == \
        [{k: v for k, v in r.items() if k != "mean_weight"} for r in before]
    # other settings make a new sample set instead of reusing a mismatched one
    summary = audit.main(["--run", str(run)] + TINY + ["--guidance", "1", "--words", "doctor", "--sample_steps", "3",
                                                       "--elbo", "true", "--elbo_samples", "2"])
    assert (summary["sampled"], summary["cached"]) == (11, 0)
    assert summary["methods"] == ["scoredecomp", "attribute", "elbo"] and summary["unseen"] == ["doctor"]
    rows = read_csv(run / "audit" / "proportions.csv")
    assert len(rows) == 6 * 3 and {r["method"] for r in rows} == {"scoredecomp", "attribute", "elbo"}
    assert "ELBO classifier" in (run / "audit" / "report.md").read_text()
    assert not (run / "audit" / "samples_g3.png").exists()  # no output of the previous settings is left


@pytest.mark.smoke
def test_calibrated_call_uses_the_selection_halfs_threshold(audited_smoke_run, tmp_path):
    run = tmp_path / "calibrated"
    shutil.copytree(audited_smoke_run, run)
    summary = audit.main(["--run", str(run)] + TINY + ["--call", "calibrated", "--guidance", "1"])
    controls = json.loads((run / "audit" / "controls.json").read_text())
    from statistical_auditing.core.stats import calibrated_threshold

    k = summary["k"]
    margins = [w1 - w0 for w0, w1 in controls["scores"][str(k)]]
    female = [label == "female" for label in controls["labels"]]
    selection = audit.selection_halves(controls["ids"]) == 0
    threshold = calibrated_threshold([m for m, s in zip(margins, selection) if s],
                                     [f for f, s in zip(female, selection) if s])
    assert summary["accuracy_at_k"]["threshold"] == pytest.approx(threshold)
    rows = read_csv(run / "audit" / "proportions.csv")
    assert {r["call"] for r in rows if r["method"] == "scoredecomp"} == {"calibrated"}


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
    assert "k=5000" in _main_error(run[:4] + ["--k_list", "1,5000"])
    assert _main_error(run + ["--k", "2000"]).startswith("--k: k=2000 is outside the timestep table")
    assert "--guidance" in _main_error(run + ["--guidance", "1,x"])
    assert "--guidance" in _main_error(run + ["--guidance", "nan"])
    assert "--n_seeds" in _main_error(run + ["--n_seeds", "0"])
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


def test_unseen_words_skip_missing_and_respell():
    class Vocabulary:
        source = "fake"
        words = {"Mary", "nurse", "doctor", "baker", "pilot", "teacher"}

        def __contains__(self, word):
            return word in self.words

    cfg = {"words": "", "words_file": "", "max_unseen": 0}
    listing = audit.unseen_candidates(cfg | {"words": "mary,doctor,nurse"}, ["nurse"], Vocabulary())
    assert listing["usable"] == ["Mary", "doctor"] and listing["respelled"] == {"mary": "Mary"}
    assert listing["trained"] == ["nurse"] and listing["missing"] == []
    with pytest.raises(InputError, match="'qwzxv'"):
        audit.unseen_candidates(cfg | {"words": "doctor,qwzxv"}, [], Vocabulary())


def test_selection_and_report_halves_alternate_within_each_class():
    ids = ["man/1", "woman/1", "man/2", "woman/2", "man/3", "nurse/1"]
    assert audit.selection_halves(ids).tolist() == [0, 0, 1, 1, 0, 0]


def test_cohen_kappa_by_hand():
    # 4 images: agree on 3 (p_o = 3/4); marginals a: long 2, short 2; b: long 3, short 1 ->
    # p_e = (2/4)(3/4) + (2/4)(1/4) = 1/2; kappa = (3/4 - 1/2) / (1/2) = 1/2
    assert audit.cohen_kappa(["long", "long", "short", "short"], ["long", "long", "long", "short"]) == 0.5
    assert audit.cohen_kappa(["a", "b"], ["a", "b"]) == 1.0


# ----------------------------------------------------------------------------- the combined report


def _fake_audit(folder: Path, debias: str, jl_seed: int, nurse_seeds: list[tuple[int, int]], slope: float,
                failed: list[str] | None = None) -> None:
    """An audit folder with hand-made numbers: nurse's seed counts, and 6 unseen words on a line."""
    audit_dir = folder / "audit"
    audit_dir.mkdir(parents=True)
    words = [f"w{i}" for i in range(6)]
    summary = {"debias": debias, "jl_seed": jl_seed, "run_step": 100, "k": 500, "config": {"words_file": ""},
               "controls_failed": failed or [], "seen": ["nurse"], "unseen": words, "embedding": "w2v-bundled",
               "accuracy_at_k": {"accuracy": 0.9, "ci_low": 0.8, "ci_high": 0.95, "auc": 0.97}}
    (audit_dir / "audit.json").write_text(json.dumps(summary))
    gaps = [-0.1, -0.05, 0.0, 0.05, 0.1, 0.15]
    rows = [{"word": "nurse", "seen": "True", "guidance": "1", "method": "scoredecomp",
             "successes": sum(s for s, _ in nurse_seeds), "n": sum(n for _, n in nurse_seeds),
             "share": sum(s for s, _ in nurse_seeds) / sum(n for _, n in nurse_seeds), "cosine_gap_w2v": 0.19,
             "cosine_gap": 0.19, "cosine_gap_jl": 0.2}]
    for word, gap in zip(words, gaps):
        share = 0.5 + slope * gap
        after = 0.0 if debias == "projected" else gap
        before = 0.0 if debias == "hard" else gap
        rows.append({"word": word, "seen": "False", "guidance": "1", "method": "scoredecomp", "successes": round(
            share * 100), "n": 100, "share": share, "cosine_gap_w2v": gap, "cosine_gap": before,
                     "cosine_gap_jl": after})
    columns = list(rows[0])
    with open(audit_dir / "proportions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    with open(audit_dir / "seeds.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["word", "guidance", "method", "seed_index", "successes", "n"])
        writer.writeheader()
        for i, (s, n) in enumerate(nurse_seeds):
            writer.writerow({"word": "nurse", "guidance": "1", "method": "scoredecomp", "seed_index": i,
                             "successes": s, "n": n})


def test_combine_audits_pools_seeds_runs_and_arms_by_hand(tmp_path):
    # w2v: two runs, slopes 2 and 2 (every word exactly on its line); debiased: slope 0 on the w2v gap;
    # projected: slope 1. A third w2v run fails its controls and must be left out.
    _fake_audit(tmp_path / "w2v-jl0", "none", 0, [(30, 100), (20, 100)], 2.0)
    _fake_audit(tmp_path / "w2v-jl1", "none", 1, [(60, 100), (40, 100)], 2.0)
    _fake_audit(tmp_path / "w2v-jl2", "none", 2, [(100, 100)], 3.0, failed=["fidelity"])
    _fake_audit(tmp_path / "debiased-jl0", "hard", 0, [(50, 100)], 0.0)
    _fake_audit(tmp_path / "projected-jl0", "projected", 0, [(50, 100)], 1.0)
    runs = ",".join(str(tmp_path / n) for n in ("w2v-jl0", "w2v-jl1", "w2v-jl2", "debiased-jl0", "projected-jl0"))
    out = tmp_path / "combined"
    result = combine_audits.main(["--runs", runs, "--out", str(out), "--n_boot", "200", "--jl_shift_seeds", "0",
                                  "--jl_dims", "128"])
    assert [r["name"] for r in result["included"]] == ["w2v-jl0", "w2v-jl1", "debiased-jl0", "projected-jl0"]
    nurse = next(r for r in result["seen_arms"] if r["arm"] == "w2v" and r["word"] == "nurse")
    assert nurse["share"] == pytest.approx((0.25 + 0.5) / 2) and nurse["n_runs"] == 2  # mean of run shares
    seen_runs = {r["run"]: r for r in (read_csv(out / "seen.csv"))}
    assert float(seen_runs["w2v-jl0"]["share"]) == 0.25 and float(seen_runs["w2v-jl0"]["seed_sd"]) == \
        pytest.approx(math.sqrt(0.005))
    fits = {(f["name"], f["x"]): f for f in result["fits"] if f["level"] == "arm"}
    assert fits[("w2v", "cosine_gap_w2v")]["slope"] == pytest.approx(2.0, abs=0.02)  # rounded counts
    assert fits[("projected", "cosine_gap_w2v")]["slope"] == pytest.approx(1.0, abs=0.02)
    assert not fits[("debiased", "cosine_gap")]["defined"] and not fits[("projected", "cosine_gap_jl")]["defined"]
    contrasts = {(c["arm"], c["x"]): c for c in result["contrasts"]}
    assert contrasts[("debiased", "cosine_gap_w2v")]["difference"] == pytest.approx(-2.0, abs=0.03)
    assert contrasts[("projected", "cosine_gap_w2v")]["difference"] == pytest.approx(-1.0, abs=0.03)
    assert not contrasts[("debiased", "cosine_gap")]["defined"]
    held = {(h["arm"], h["x"]): h for h in result["held_out"]}
    assert held[("w2v", "cosine_gap_w2v")]["rmse"] < 0.01  # words on a line predict each other
    # spread of the unseen shares: w2v's are 0.3, 0.4, ..., 0.8 of 100 in both runs; debiased's all 0.5
    spread = {r["name"]: r for r in read_csv(out / "spread.csv") if r["level"] == "arm"}
    assert float(spread["w2v"]["sd"]) == pytest.approx(math.sqrt(0.035))
    assert float(spread["w2v"]["tau"]) == pytest.approx(math.sqrt(0.035 - 1.31 / 6 / 99))
    assert float(spread["debiased"]["sd"]) == 0.0 and float(spread["debiased"]["tau"]) == 0.0
    assert (float(spread["w2v"]["min"]), float(spread["w2v"]["max"])) == (0.3, 0.8)
    assert len(read_csv(out / "unseen.csv")) == 5 * 6  # every run's unseen words, failed runs too
    report = (out / "report.md").read_text()
    assert "undefined" in report and "w2v-jl2" in report and "FAILED: fidelity" in report
    with pytest.raises(InputError, match="no complete audit"):
        combine_audits.main(["--runs", str(tmp_path / "nothing"), "--out", str(out)])
