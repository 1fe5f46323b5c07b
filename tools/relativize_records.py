"""One-off migration: rewrite the absolute paths in the records under results/ as paths that
hold on any machine.

    python tools/relativize_records.py            # rewrites in place; a second run changes nothing

The committed runs were made on other machines, and their records (config.json, jobs.json,
audit.json, the reports' titles) name /root/bbb/... and /work/main/... paths. Rules, in order:
- a file of a clone of this repository (/root/bbb/code-<commit>/X, /work/main/X): X, relative
  to the repository root (the commit of each job is in results/experiment/README.md);
- a run folder of the experiment (/root/bbb/experiment3[b]/<run>/...) whose copy is kept in
  results/experiment/runs/<run>: that copy's path, relative to the repository root;
- anything else under /root/bbb/ (the experiment's logs and dataset, not kept): ~/bbb/...,
  the home-relative names results/experiment/README.md gives those folders;
- any other absolute path: an error naming it (nothing is rewritten by guess).
Only UTF-8 text files are read; each changed file is replaced atomically.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bias_begets_bias.cli import InputError, config_from_constants, constants_of, require, run_main  # noqa: E402
from bias_begets_bias.utils import atomic_write_text  # noqa: E402

ROOT = "results"  # folder whose records are rewritten, relative to the repository root
KEPT_RUNS = "results/experiment/runs"  # where the experiment's run copies are kept

# An absolute path as the records write it: up to whitespace, a quote, backtick, comma, colon or bracket.
ABSOLUTE = re.compile(r"(?<![\w.~])/(?:root|work|tmp|home)/[^\s\"'`,:()\[\]]*")
CLONE = re.compile(r"^(?:/root/bbb/code-[0-9a-f]{7,40}|/work/main)(?:/(?P<rest>.*))?$")
EXPERIMENT = re.compile(r"^/root/bbb/experiment3b?/(?P<run>[^/]+)(?P<rest>/.*)?$")
HOME = re.compile(r"^/root/(?P<rest>bbb/.*)$")


def relative_path(path: str, kept: set[str]) -> str:
    """The machine-independent form of one absolute ``path`` (rules in the module docstring)."""
    clone = CLONE.match(path)
    if clone:
        return clone["rest"] or "."
    run = EXPERIMENT.match(path)
    if run and run["run"] in kept:
        return f"{KEPT_RUNS}/{run['run']}{run['rest'] or ''}"
    home = HOME.match(path)
    if home:
        return f"~/{home['rest']}"
    raise InputError(f"{path}: an absolute path no rule of tools/relativize_records.py maps; add a rule for it")


def relativize_text(text: str, kept: set[str]) -> str:
    return ABSOLUTE.sub(lambda m: relative_path(m.group(0), kept), text)


def text_of(path: Path) -> str | None:
    """A file's text, or None for a binary (a PNG) or non-UTF-8 file, which holds no record."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def main(argv: list[str] | None = None) -> list[str]:
    cfg = config_from_constants(constants_of(globals()), argv=argv, description=__doc__.splitlines()[0])
    root, kept_dir = REPO / cfg["root"], REPO / cfg["kept_runs"]
    require(root.is_dir(), f"--root: {root} is not a folder")
    kept = {p.name for p in kept_dir.iterdir() if p.is_dir()} if kept_dir.is_dir() else set()
    rewrites = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):  # every new text first, then any write
        text = text_of(path)
        if text is not None and (new := relativize_text(text, kept)) != text:
            rewrites[path] = new
    for path, text in rewrites.items():
        atomic_write_text(path, text)
    changed = [p.relative_to(REPO).as_posix() for p in rewrites]
    print(f"[relativize] {len(changed)} files rewritten under {cfg['root']}" + "".join(f"\n  {c}" for c in changed))
    return changed


if __name__ == "__main__":
    run_main(main)
