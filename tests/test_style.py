"""The code stays ruff-clean: CI fails on a lint error like on a failing test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean() -> None:
    # the ruff of this environment (the `lint` extra's pinned range), not whichever is on PATH
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "regproxy", "tests", "--output-format", "concise"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
