"""The repository's tracked files stay under 50 MB in all (issue "Whose bias is it": kept runs carry
their EMA weights, about 7 MB each, and must fit beside everything else)."""
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 50 * 1000 * 1000


def tracked_bytes() -> tuple[int, list[tuple[int, str]]]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    sizes = [((REPO / name).stat().st_size, name) for name in names.decode().split("\0")
             if name and (REPO / name).is_file()]
    return sum(size for size, _ in sizes), sorted(sizes, reverse=True)[:5]


@pytest.mark.integration  # starts git
def test_tracked_files_stay_under_50_mb():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    total, largest = tracked_bytes()
    assert total < LIMIT_BYTES, f"tracked files hold {total / 1e6:.1f} MB (limit 50 MB); largest: {largest}"
