"""The benchmark still runs: ``tests/benchmarks/bench.py --quick`` once, end to end.

Tiny sizes, one repetition, 1 s load runs: this keeps the benchmark working in CI. It
judges nothing about speed (no timed assertion): only that every section ran (or was
skipped with a reason), that the JSON result is valid and complete, and that no server
was left running.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.tools import require_tool

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"push", "pull", "small", "image", "proxy", "verify", "gc", "https"}


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def _benchmark(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m tests.benchmarks.SCRIPT ARGS…`, which must succeed."""
    proc = subprocess.run(
        [sys.executable, "-m", f"tests.benchmarks.{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.timeout(120)
def test_quick_benchmark_runs_and_writes_valid_json(tmp_path: Path) -> None:
    for tool in ("docker-registry", "wrk", "skopeo"):
        require_tool(tool)
    out = tmp_path / "quick.json"
    before = set(_children_of(os.getpid()))
    _benchmark("bench", "--quick", "--out", str(out), "--workdir", str(tmp_path / "work"))
    assert set(_children_of(os.getpid())) <= before, "the benchmark left a process running"

    result = json.loads(out.read_text())  # strict JSON: NaN or Infinity would not parse
    assert result["mode"] == "quick"
    assert set(result["sections"]) == SECTIONS
    for name, section in result["sections"].items():
        assert section["status"] in ("ok", "skipped"), (name, section)
        if section["status"] == "skipped":
            assert section["reason"], name
    assert result["machine"]["cores"] >= 1
    assert result["header"]

    ran = {n for n, s in result["sections"].items() if s["status"] == "ok"}
    rows = result["rows"]
    assert {row["section"] for row in rows} >= ran
    for row in rows:
        for label, values in row["runs"].items():
            assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in values), row
            if values:
                assert row["median"][label] is not None, row
        if row["target"] is not None and row["median"].get("regproxy") is not None:
            assert row["met"] in (True, False), row
    # every server-side measurement was taken against both servers
    compared = [r for r in rows if r["section"] in ("push", "pull", "small", "image", "proxy")]
    assert compared
    for row in compared:
        assert row["runs"]["regproxy"] and row["runs"]["reference"], row
    # the table for the README was written next to the JSON
    table = out.with_suffix(".md").read_text()
    assert "| section |" in table and "regproxy" in table


@pytest.mark.timeout(120)
def test_the_toggled_access_log_benchmark_pairs_phases(tmp_path: Path) -> None:
    """`access_log --toggle`: the shim switches the log off and on inside the server, and
    every load gets pairs of phases (an "on" one after an "off" one) with a ratio."""
    require_tool("wrk")
    out = tmp_path / "toggle.json"
    proc = _benchmark(
        "access_log", "--toggle", "0.2", "--rounds", "1", "--seconds", "2", "--json", str(out)
    )
    result = json.loads(out.read_text())
    assert result["toggle"] == 0.2
    for load, cells in result["loads"].items():
        for variant in ("text", "json"):
            assert cells[variant]["pairs"] >= 1, (load, variant, proc.stdout)
            assert 0.2 < cells[variant]["ratio"] < 5, (load, variant, cells)


def test_phase_pairs_compare_each_on_phase_with_the_off_phase_before_it() -> None:
    from tests.benchmarks.access_log import phase_pairs

    def row(on: bool, start: float, requests: int, cpu: float) -> dict[str, float]:
        return {"on": on, "start": start, "end": start + 1.0, "requests": requests, "cpu": cpu}

    rows = [
        row(True, 0, 100, 0.1),  # before the load: left out
        row(False, 10, 1000, 0.05),
        row(True, 11, 900, 0.054),
        row(True, 12, 900, 0.054),  # no "off" just before it: not a pair
        row(False, 13, 0, 0.0),  # no requests: left out
        row(False, 14, 1000, 0.05),
        row(True, 15, 800, 0.048),
    ]
    pairs = phase_pairs(rows, 10, 16)
    assert [round(ratio, 3) for ratio, _ in pairs] == [0.9, 0.8]
    assert [round(cpu, 1) for _, cpu in pairs] == [10.0, 10.0]
