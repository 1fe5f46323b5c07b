"""Content fingerprints of the code a job runs and of the data files it reads.

The workflow passes them to Snakemake as rule parameters, so Snakemake's `params` rerun
trigger redoes a job whose script, or any project module the script imports (directly or
through other modules, at any depth), or any file under data/ changed. Content, not
modification time: a fresh clone of the same commit has new mtimes but the same
fingerprints, so it resumes an experiment instead of redoing it. Standard library only
(the Snakefile imports this before any job runs).
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGES = ("bias_begets_bias", "diffusion_from_scratch", "statistical_auditing")  # the project's own importable packages


def _module_file(repo: Path, dotted: str) -> Path | None:
    """The project file a dotted import names (a module or a package's __init__), if any."""
    if dotted.split(".")[0] not in PACKAGES:
        return None
    base = repo.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(repo: Path, path: Path) -> set[Path]:
    """The project modules ``path`` imports anywhere in its body (function-level imports
    included: the scripts import heavy modules lazily), one level deep."""
    found: set[Path] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import module` may name a submodule as well as an attribute
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            for depth in range(1, name.count(".") + 2):  # a.b.c imports a, a.b and a.b.c
                module = _module_file(repo, ".".join(name.split(".")[:depth]))
                if module is not None:
                    found.add(module)
    return found


@lru_cache(maxsize=None)
def code_fingerprint(repo: Path, script: str) -> str:
    """sha256 over (relative path, content) of ``script`` and every project module it reaches
    through imports, in sorted order."""
    repo = Path(repo)
    pending, seen = [repo / script], set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        pending.extend(imported_modules(repo, path) - seen)
    digest = hashlib.sha256()
    for path in sorted(seen):
        digest.update(path.relative_to(repo).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@lru_cache(maxsize=None)
def data_fingerprint(repo: Path) -> str:
    """sha256 over (name, content) of the files in data/ (class words, prompts, word lists):
    every script reads some of them by default."""
    digest = hashlib.sha256()
    for path in sorted(p for p in (Path(repo) / "data").iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
