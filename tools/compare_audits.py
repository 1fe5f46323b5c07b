"""Do two audits of one model give the same numbers? Compare their proportions.csv row by row.

    python tools/compare_audits.py <audit folder A> <audit folder B>

Use it after re-auditing a committed run (`audit.py --run results/whose_bias/runs/<run> --out
<elsewhere>`: compare <elsewhere> with the run's audit/), or to check that storing the weights in
half precision leaves the audit unchanged. Rows are matched on (word, guidance, method); for each
row present in both, the counts (n, successes, n_undetermined) and the ScoreDecomp k are compared
exactly, the share by its absolute difference. Rows only one audit has are listed. Prints a
summary line per kind of difference; exit status 0 when every common row's counts agree and both
audits hold the same rows, 1 otherwise.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

KEY = ("word", "guidance", "method")
EXACT = ("k", "n", "successes", "n_undetermined")


def read_rows(folder: Path) -> dict[tuple[str, ...], dict]:
    """proportions.csv of an audit folder, keyed by (word, guidance, method)."""
    path = Path(folder) / "proportions.csv"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist (expected an audit folder written by statistical_auditing/audit.py)")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = [column for column in KEY + EXACT + ("share",) if rows and column not in rows[0]]
    if missing:
        raise SystemExit(f"error: {path} lacks the columns {', '.join(missing)} (not an audit's proportions.csv)")
    return {tuple(row[c] for c in KEY): row for row in rows}


def compare(a: dict, b: dict) -> tuple[list[str], float, int]:
    """(differences as lines, largest absolute share difference, number of common rows)."""
    lines = [f"only in A: {' / '.join(key)}" for key in sorted(set(a) - set(b))]
    lines += [f"only in B: {' / '.join(key)}" for key in sorted(set(b) - set(a))]
    largest = 0.0
    common = sorted(set(a) & set(b))
    for key in common:
        for column in EXACT:
            if a[key][column] != b[key][column]:
                lines.append(f"{' / '.join(key)}: {column} {a[key][column]!r} vs {b[key][column]!r}")
        share_a, share_b = a[key]["share"], b[key]["share"]
        if share_a and share_b:
            largest = max(largest, abs(float(share_a) - float(share_b)))
        elif share_a != share_b:  # a share is empty where no image was called
            lines.append(f"{' / '.join(key)}: share {share_a!r} vs {share_b!r}")
    return lines, largest, len(common)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="first audit folder (holds proportions.csv)")
    parser.add_argument("b", type=Path, help="second audit folder")
    args = parser.parse_args(argv)
    lines, largest, n_common = compare(read_rows(args.a), read_rows(args.b))
    for line in lines:
        print(line)
    print(f"{n_common} common rows (word, guidance, method); {len(lines)} differences in rows or counts; "
          f"largest share difference {largest:.6g}")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
