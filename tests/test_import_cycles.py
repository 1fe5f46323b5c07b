"""The project's modules stand in layers: no import cycle, bias_begets_bias (what both folders need)
imports neither folder, the two folders never import each other, and no entry script imports
another's helpers. Imports inside functions count too."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("bias_begets_bias", "diffusion_from_scratch", "statistical_auditing")


def project_modules() -> dict[str, Path]:
    """Every module of the packages, subpackages included, by dotted name."""
    return {".".join(path.relative_to(REPO).with_suffix("").parts): path
            for package in PACKAGES for path in sorted((REPO / package).rglob("*.py")) if path.stem != "__init__"}


def is_entry_script(path: Path) -> bool:
    """A script a user runs: it ends in an ``if __name__ == "__main__":`` block."""
    return any(isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') == '__name__ == "__main__"'
               for node in ast.parse(path.read_text(encoding="utf-8")).body)


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere in its file (module level or inside a function):
    ``import a.b``, ``from a.b import c`` (a.b, or a.b.c where that is a module), ``from a import b``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                base = ".".join(name.split(".")[:-node.level]) + (f".{base}" if base else "")
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
                      "    from statistical_auditing.core.scoring import decide\n")
    modules = {"statistical_auditing.fairface", "statistical_auditing.core.scoring", "statistical_auditing.m"}
    assert imported_modules("statistical_auditing.m", source, modules) == {"statistical_auditing.fairface",
                                                                            "statistical_auditing.core.scoring"}


def test_no_import_cycle_between_project_modules():
    graph = import_graph()
    assert "statistical_auditing.fairface" in graph and "bias_begets_bias.cli" in graph
    assert "statistical_auditing.core.scoring" in graph  # subpackages are walked
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_one_direction():
    """bias_begets_bias is the bottom layer; the two folders stand on it side by side."""
    graph = import_graph()
    below = {"bias_begets_bias": {"bias_begets_bias"},
             "diffusion_from_scratch": {"bias_begets_bias", "diffusion_from_scratch"},
             "statistical_auditing": {"bias_begets_bias", "statistical_auditing"}}
    wrong = [f"{name} imports {target}" for name, targets in graph.items() for target in targets
             if target.split(".")[0] not in below[name.split(".")[0]]]
    assert not wrong, wrong
    # inside statistical_auditing: core (both jobs) stands below sd_audits (the paper's Stable Diffusion
    # audits) and from_scratch (the from-scratch experiment), which do not import each other
    sub = {"core": {"core"}, "sd_audits": {"core", "sd_audits"}, "from_scratch": {"core", "from_scratch"}}
    layer = {name: name.split(".")[1] for name in graph if name.startswith("statistical_auditing.")
             and name.split(".")[1] in sub}
    wrong = [f"{name} imports {target}" for name, targets in graph.items() if name in layer for target in targets
             if target.startswith("statistical_auditing.") and layer.get(target) not in sub[layer[name]]]
    assert not wrong, wrong


def test_entry_scripts_import_library_modules_only():
    modules = project_modules()
    scripts = {name for name, path in modules.items() if is_entry_script(path)}
    assert {"statistical_auditing.audit", "diffusion_from_scratch.fidelity", "statistical_auditing.fairface"} <= scripts
    assert not scripts & {"bias_begets_bias.utils", "statistical_auditing.core.scoring"}
    graph = import_graph()
    wrong = [f"{name} imports the script {target}" for name in modules for target in graph[name] if target in scripts]
    assert not wrong, wrong


def test_the_layer_checks_see_a_violation(tmp_path):
    """The checks above are not vacuous: a library module importing a script is found."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from statistical_auditing.audit import main\n")
    found = imported_modules("bias_begets_bias.m", source, {"statistical_auditing.audit", "bias_begets_bias.m"})
    assert found == {"statistical_auditing.audit"}
    script = tmp_path / "s.py"
    script.write_text("import sys\n\nif __name__ == '__main__':\n    sys.exit(0)\n")
    assert is_entry_script(script) and not is_entry_script(source)
