"""Shared fixtures: a small procedural dataset made once per test session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # tiny_models and other test helpers


def run_script(script: str, *args: str, timeout: float = 600, check: bool = True,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a project script in a subprocess the way a user would."""
    environment = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"} | (env or {})
    result = subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                            timeout=timeout, cwd=REPO, env=environment)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


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
