"""The systemd units: valid for `systemd-analyze verify`, hardened, and pointing at regproxy."""

from __future__ import annotations

import configparser
import subprocess
from pathlib import Path

import pytest

from tests.support.tools import require_tool

pytestmark = pytest.mark.packaging

REPO_ROOT = Path(__file__).resolve().parents[2]
UNITS = REPO_ROOT / "packaging" / "systemd"
NAMES = ("regproxy.service", "regproxy-gc.service", "regproxy-gc.timer")


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


@pytest.mark.parametrize("name", ["regproxy.service", "regproxy-gc.service"])
def test_services_are_hardened(name: str) -> None:
    service = unit(name)["Service"]
    assert service["User"] == "regproxy" and service["Group"] == "regproxy"
    assert service["StateDirectory"] == "regproxy"
    assert service["ReadWritePaths"] == "/var/lib/regproxy"
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes"  # the one-file binary unpacks itself there
    assert service["CapabilityBoundingSet"] == ""
    assert "--config /etc/regproxy/configuration.toml" in service["ExecStart"]


def test_server_unit_stops_gracefully() -> None:
    service = unit("regproxy.service")["Service"]
    assert service["ExecStart"].split()[1] == "serve"
    assert service["KillSignal"] == "SIGTERM"
    # longer than the default [server] shutdown_timeout (30 s): never a SIGKILL mid-request
    assert int(service["TimeoutStopSec"].rstrip("s")) > 30
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_gc_runs_nightly() -> None:
    assert unit("regproxy-gc.service")["Service"]["ExecStart"].split()[1] == "gc"
    timer = unit("regproxy-gc.timer")
    assert timer["Timer"]["OnCalendar"] == "*-*-* 03:30:00"
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")  # skipped locally when missing, fails in CI
    # verify wants ExecStart= to exist: point the copies at a stand-in executable
    stand_in = tmp_path / "regproxy"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    for name in NAMES:
        text = (UNITS / name).read_text().replace("/usr/local/bin/regproxy", str(stand_in))
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        [analyze, "verify", *(str(tmp_path / name) for name in NAMES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 0, output
    assert "Unknown" not in output and "ignoring" not in output, output
