"""The one-file binary: built once per session with PyInstaller, then `packaging/smoke.sh`.

Slow (a build is about half a minute here). Without PyInstaller the tests skip
locally and fail in CI (`CI=true`), where the binary must be proven.
"""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support.tools import require_tool, run, skip_or_fail

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGING = REPO_ROOT / "packaging"
VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(1200)]


@pytest.fixture(scope="session")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("PyInstaller") is None:
        skip_or_fail("PyInstaller is not installed (pip install -e '.[build]')")
    dist = tmp_path_factory.mktemp("dist")
    run(
        ["bash", PACKAGING / "build.sh", dist],
        env={"PYTHON": sys.executable, "REGPROXY_VERSION": ""},
        timeout=900,
    )
    path = dist / "regproxy"
    assert path.is_file()
    return path


def test_binary_knows_its_version(binary: Path) -> None:
    done = run([binary, "--version"], timeout=60)
    assert done.stdout.strip() == f"regproxy, version {VERSION}"
    help_text = run([binary, "--help"], timeout=60).stdout
    for command in ("serve", "gc", "ls", "verify", "prefetch"):
        assert f"  {command} " in help_text, help_text


def test_smoke_script_passes(binary: Path) -> None:
    require_tool("skopeo")
    done = run(
        ["bash", PACKAGING / "smoke.sh", binary],
        env={"EXPECTED_VERSION": VERSION},
        timeout=300,
    )
    assert done.stdout.rstrip().endswith("smoke: OK"), done.stdout + done.stderr
