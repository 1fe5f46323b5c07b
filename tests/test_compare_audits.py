"""tools/compare_audits.py: two audits' proportions.csv compared by (word, guidance, method)."""
import csv
import importlib.util
from pathlib import Path

import pytest
from conftest import run_script

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_audits", REPO / "tools" / "compare_audits.py")
compare_audits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_audits)

COLUMNS = ("word", "guidance", "method", "k", "n", "successes", "n_undetermined", "share")


def write_audit(folder: Path, rows):
    folder.mkdir()
    with (folder / "proportions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return folder


def test_identical_counts_pass_and_a_changed_count_or_row_fails(tmp_path, capsys):
    rows = [("nurse", "1", "scoredecomp", "400", "64", "30", "0", "0.46875"),
            ("nurse", "1", "attribute", "", "64", "29", "0", "0.453125")]
    a = write_audit(tmp_path / "a", rows)
    assert compare_audits.main([str(a), str(write_audit(tmp_path / "b", rows))]) == 0
    assert "2 common rows (word, guidance, method); 0 differences" in capsys.readouterr().out
    changed = [rows[0], ("nurse", "1", "attribute", "", "63", "29", "1", "0.460317")]
    assert compare_audits.main([str(a), str(write_audit(tmp_path / "c", changed))]) == 1
    out = capsys.readouterr().out
    assert "nurse / 1 / attribute: n '64' vs '63'" in out and "largest share difference 0.0071" in out
    assert compare_audits.main([str(a), str(write_audit(tmp_path / "d", rows[:1]))]) == 1
    assert "only in A: nurse / 1 / attribute" in capsys.readouterr().out


def test_a_folder_without_an_audit_is_named(tmp_path):
    with pytest.raises(SystemExit, match="proportions.csv does not exist"):
        compare_audits.main([str(tmp_path), str(tmp_path)])
    (tmp_path / "proportions.csv").write_text("word,share\nnurse,0.5\n")
    with pytest.raises(SystemExit, match="lacks the columns guidance, method, k, n, successes, n_undetermined"):
        compare_audits.main([str(tmp_path), str(tmp_path)])


# ----------------------------------------------------------------------------- tools/reaudit.py


def test_reaudit_repeats_a_kept_runs_audit_and_redraws_words(audited_smoke_run, small_dataset, tmp_path):
    from statistical_auditing.keep_run import keep_run

    kept = keep_run(audited_smoke_run, tmp_path / "kept", None, weights=True)
    assert (kept / "ema.safetensors").is_file() and not (kept / "checkpoints").exists()
    out = tmp_path / "reaudit"
    result = run_script("tools/reaudit.py", "--run", str(kept), "--out", str(out), "--data", str(small_dataset.parent),
                        "--num_threads", "1")
    assert "0 differences in rows or counts" in result.stdout
    assert (out / "proportions.csv").is_file()
    drawn = tmp_path / "redraw"
    run_script("tools/reaudit.py", "--run", str(kept), "--out", str(drawn), "--data", str(small_dataset.parent),
               "--words", "surgeon", "--num_threads", "1")
    words = {row.split(",")[0] for row in (drawn / "proportions.csv").read_text().splitlines()[1:]}
    assert "surgeon" in words and not words & {"coach", "janitor"}


def test_reaudit_refuses_a_run_without_weights(audited_smoke_run, tmp_path):
    from statistical_auditing.keep_run import keep_run

    kept = keep_run(audited_smoke_run, tmp_path / "kept", None, weights=False)
    result = run_script("tools/reaudit.py", "--run", str(kept), "--out", str(tmp_path / "x"), check=False)
    assert result.returncode != 0 and "keeps no weights (no ema.safetensors)" in result.stderr
    assert not (tmp_path / "x").exists()
