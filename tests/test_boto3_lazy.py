"""boto3 is loaded only for stores on S3: `serve` and the offline commands on filesystem
stores never import it (~0.33 s and ~40 MiB), checked in the real commands' processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import REPO_ROOT, ManagedProcess

#: run the command line, then say on stderr which S3 modules the process ever loaded
WRAPPER = """
import atexit, json, sys
def report():
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("boto3", "botocore"))
    print("S3-MODULES " + json.dumps(loaded), file=sys.stderr, flush=True)
atexit.register(report)
from regproxy.cli import main
main(sys.argv[1:], prog_name="regproxy")
"""


def s3_modules(output: str) -> list[str]:
    line = next(x for x in output.splitlines() if x.startswith("S3-MODULES "))
    return json.loads(line.removeprefix("S3-MODULES "))


@pytest.fixture
def fs_config(tmp_path: Path) -> Path:
    path = tmp_path / "configuration.toml"
    path.write_text(
        'registry_storage = "registry"\n'
        'temporary_registry_storage = "tmp"\n'
        'proxy_storage = "proxy"\n'
    )
    return path


def environment() -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("REGPROXY_")}
    return {**inherited, "PYTHONPATH": str(REPO_ROOT)}


@pytest.mark.parametrize("command", [["ls"], ["gc", "--dry-run"], ["verify"]])
def test_offline_commands_on_disk_load_no_boto3(fs_config: Path, command: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, *command, "-c", str(fs_config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment(),
        cwd=fs_config.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert s3_modules(done.stderr) == []


def test_serve_on_disk_loads_no_boto3(fs_config: Path) -> None:
    """Through start-up and a graceful stop (SIGTERM)."""
    argv = [sys.executable, "-c", WRAPPER, "serve", "-c", fs_config, "--listen", "127.0.0.1:0"]
    process = ManagedProcess(
        argv, name="regproxy", log_path=fs_config.parent / "serve.log", env=environment()
    )
    process.start()
    try:
        process.wait_for_log(r"listening on http://127\.0\.0\.1:\d+", timeout=30)
    finally:
        code = process.stop()
    assert code == 0, process.log_tail()
    assert s3_modules(process.log_text()) == []
