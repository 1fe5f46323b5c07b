"""Shared fixtures (a small procedural dataset, a smoke run and its audit, each made once per
test session) and the test lanes.

Lanes (issue 26): every test is in exactly one of them.
  unit         no subprocess, no training: the default for a test with no lane marker;
               `make test-unit` (-m "not smoke and not integration and not heavy") runs them alone
  integration  trains a model, starts a process, or uses a fixture that does
  smoke        runs a script end to end with tiny arguments
  heavy        long or resource-hungry; skipped by default (`make test-all` runs it)
`make test` runs every lane but heavy.

A test is marked integration here, at collection, when it has no lane marker and either
  - requests (directly or through another fixture) one of SLOW_FIXTURES, or
  - names `subprocess` or `run_script` in its own code (nested functions included),
so that tests written without the lanes in mind land in the right one; a test may also carry
@pytest.mark.integration itself. As a safety net, a unit test that starts the Python interpreter
anyway (through a helper the rule above cannot see) fails with the reason.
"""
from __future__ import annotations

import csv
import io
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # tiny_models and other test helpers

LANES = ("integration", "smoke", "heavy")  # a test with none of these markers is a unit test
# Fixtures that train, render a dataset to train on, or run a script: a test using one is integration.
SLOW_FIXTURES = {"small_dataset", "smoke_run", "audited_smoke_run"}
SPAWNING_NAMES = {"subprocess", "run_script"}
SMOKE_AUDIT = ["--preset", "smoke", "--num_threads", "1"]  # the audit of audited_smoke_run


def run_script(script: str, *args: str, timeout: float = 600, check: bool = True,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a project script in a subprocess the way a user would."""
    environment = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"} | (env or {})
    result = subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                            timeout=timeout, cwd=REPO, env=environment)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


# ----------------------------------------------------------------------------- lanes


def names_a_spawner(function) -> bool:
    """Whether a test's own code, or a function nested in it, names subprocess or run_script."""
    codes = [function.__code__]
    while codes:
        code = codes.pop()
        if SPAWNING_NAMES & set(code.co_names):
            return True
        codes += [const for const in code.co_consts if isinstance(const, types.CodeType)]
    return False


def is_unit(item: pytest.Item) -> bool:
    return not any(item.get_closest_marker(lane) for lane in LANES)


@pytest.hookimpl(tryfirst=True)  # before -m deselects, so that the marks added here count
def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_unit(item) and (SLOW_FIXTURES & set(item.fixturenames)
                              or isinstance(item, pytest.Function) and names_a_spawner(item.function)):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_interpreter(request, monkeypatch):
    """Fail a unit test that starts the Python interpreter (a script: seconds of imports each)."""
    if not is_unit(request.node):
        return
    popen_init = subprocess.Popen.__init__

    def refuse_python(self, args, *rest, **kwargs):
        program = args if isinstance(args, (str, bytes, os.PathLike)) else args[0]
        if Path(os.fsdecode(program)).name.startswith("python") or os.fsdecode(program) == sys.executable:
            pytest.fail(f"{request.node.nodeid} is a unit test but starts {program}: mark it "
                        "@pytest.mark.integration", pytrace=False)
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse_python)


# ----------------------------------------------------------------------------- shared fixtures



def kill_when_paused(code: str, args: list[str], stderr_path: Path) -> bool:
    """Run ``python -c code *args`` (a script that prints "paused" and then blocks at the moment a
    test wants to kill it), read its stdout until that line, then SIGKILL it: a kill at a known
    point, whatever the machine's speed. Returns whether it paused (False: it ended first)."""
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, text=True,
                                   stdout=subprocess.PIPE, stderr=stderr)
        backstop = threading.Timer(600, process.kill)  # a hung child ends the wait below, not the suite
        backstop.start()
        paused = any(line.strip() == "paused" for line in process.stdout)  # stops reading at "paused"
        process.send_signal(signal.SIGKILL)
        process.wait()
        backstop.cancel()
    return paused

@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """Six classes x 10 procedural portraits at 32 px (2 test images per class)."""
    from diffusion_from_scratch import synthetic_data

    out = tmp_path_factory.mktemp("portraits")
    synthetic_data.main(["--out", str(out), "--per_class", "10", "--sizes", "32", "--test_fraction", "0.2"])
    return out / "32"


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, small_dataset) -> Path:
    """A finished smoke-preset training run (seconds on a CPU)."""
    from diffusion_from_scratch import ddpm_conditional

    run_dir = tmp_path_factory.mktemp("runs") / "smoke"
    ddpm_conditional.main(["--preset", "smoke", "--dataset_path", str(small_dataset), "--run_dir", str(run_dir),
                           "--num_threads", "1"])
    return run_dir


@pytest.fixture(scope="session")
def audited_smoke_run(tmp_path_factory, smoke_run) -> Path:
    """A copy of smoke_run audited once per session, in a subprocess as a user would run it, with
    `audit.py --preset smoke --num_threads 1` (SMOKE_AUDIT). The audit's stdout is kept beside the
    run, in <parent>/audit_stdout.txt. Shared by every test that needs an audit: a test that
    changes anything must work on its own copy (shutil.copytree)."""
    run = tmp_path_factory.mktemp("audited") / "smoke"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("audit"))
    result = run_script("statistical_auditing/audit.py", "--run", str(run), *SMOKE_AUDIT)
    (run.parent / "audit_stdout.txt").write_text(result.stdout)
    return run


# ----------------------------------------------------------------------------- committed CSVs regenerate

# Floats are written with 6 significant digits. The committed projection shifts were computed in
# float32 through a threaded BLAS, the regenerated ones in float64 with fixed-order sums: a float32
# sum of 300 products of size ~0.1 is off by up to ~1e-6, which moves gap_after and shift by up to
# 1e-6 absolute (measured: 1.0e-6) and the hard-debiased gaps that are 0 up to rounding by 1e-7.
# Every other combined table regenerates digit for digit.
FLOAT_RTOL, FLOAT_ATOL = 1e-5, 2e-6


def _same_cell(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return not (math.isnan(x) or math.isnan(y)) and abs(x - y) <= FLOAT_ATOL + FLOAT_RTOL * abs(y) \
        and any(c in a + b for c in ".e")  # integer cells must match exactly: only floats print a point or e


def compare_csv(new: Path, old: Path) -> list[str]:
    new_rows = list(csv.DictReader(io.StringIO(new.read_text())))
    old_rows = list(csv.DictReader(io.StringIO(old.read_text())))
    if len(new_rows) != len(old_rows):
        return [f"{old.name}: {len(new_rows)} rows, committed {len(old_rows)}"]
    problems = []
    for i, (n, o) in enumerate(zip(new_rows, old_rows)):
        for column in o:
            if column not in n or not _same_cell(n[column], o[column]):
                problems.append(f"{old.name} row {i + 2} {column}: {n.get(column)!r} vs committed {o[column]!r}")
    return problems
