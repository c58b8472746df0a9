"""mypy on the package with pyproject's [tool.mypy] settings: the annotations are contracts a type checker holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")

ROOT = Path(__file__).resolve().parents[1]


def test_package_type_checks():
    # From the repository root, so pyproject's files and cache_dir (.cache/mypy: ~1 s warm, ~20 s cold) apply.
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mypy found type errors:\n{proc.stdout}{proc.stderr}"
