"""No import cycle between the project's modules, counting imports inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("diffusion_from_scratch", "statistical_auditing")


def project_modules() -> dict[str, Path]:
    return {f"{package}.{path.stem}": path for package in PACKAGES for path in sorted((REPO / package).glob("*.py"))
            if path.stem != "__init__"}


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere in its file (module level or inside a function):
    ``import a.b``, ``from a.b import c`` (a.b, or a.b.c where that is a module), ``from a import b``."""
    found = set()
    package = name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y (the packages are one level deep)
                base = package + (f".{base}" if base else "")
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in modules and target != name}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_function_level_imports_are_counted(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from statistical_auditing import fairface\n"
                      "    from statistical_auditing.scoring import decide\n")
    modules = {"statistical_auditing.fairface", "statistical_auditing.scoring", "statistical_auditing.m"}
    assert imported_modules("statistical_auditing.m", source, modules) == {"statistical_auditing.fairface",
                                                                            "statistical_auditing.scoring"}


def test_no_import_cycle_between_project_modules():
    modules = project_modules()
    assert "statistical_auditing.fairface" in modules and "diffusion_from_scratch.cli" in modules
    graph = {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
