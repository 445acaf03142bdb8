"""Running the operator commands from tests: configuration files, subprocesses, CliRunner.

Subprocesses run `python -m regproxy` from this checkout with a timeout and are
always reaped; `as_restricted=True` drops CAP_DAC_OVERRIDE when running as root,
so a read-only directory really is read-only to the command.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from regproxy import config as config_mod
from regproxy.cli import main
from regproxy.config import Config
from tests.support.tools import require_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0


def write_config(base: Path, extra: str = "", upstreams: dict[str, str] | None = None) -> Path:
    """A configuration.toml with the three storage folders under `base`; returns its path."""
    base.mkdir(parents=True, exist_ok=True)
    lines = [
        'registry_storage = "registry"',
        'temporary_registry_storage = "tmp"',
        'proxy_storage = "proxy"',
        "",
        extra,
    ]
    for name, url in (upstreams or {}).items():
        lines += [f'[proxy.upstreams."{name}"]', f"url = {json.dumps(url)}", ""]
    path = base / "configuration.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def load(path: Path) -> Config:
    return config_mod.load(path, environ={})


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGPROXY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["COLUMNS"] = "200"
    return env


def _argv(args: tuple[str | Path, ...], as_restricted: bool) -> list[str]:
    argv = [sys.executable, "-m", "regproxy", *map(str, args)]
    if as_restricted and os.geteuid() == 0:
        # as root, only dropping the override capabilities makes a folder read-only
        setpriv = require_tool("setpriv")
        return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *argv]
    return argv


def run_cli(*args: str | Path, as_restricted: bool = False, stdin: str | None = None) -> Ran:
    """`python -m regproxy ARGS…` as a subprocess (blocking)."""
    proc = subprocess.run(
        _argv(args, as_restricted),
        input=stdin,
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO_ROOT,
        timeout=TIMEOUT,
    )
    return Ran(proc.returncode, proc.stdout, proc.stderr)


async def arun_cli(*args: str | Path, as_restricted: bool = False, timeout: float = TIMEOUT) -> Ran:
    """The same, without blocking the event loop (in-process servers keep serving)."""
    proc = await asyncio.create_subprocess_exec(
        *_argv(args, as_restricted),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(),
        cwd=REPO_ROOT,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


def invoke(*args: str | Path) -> Ran:
    """The command in this process (fast; not for `prefetch`, which runs its own loop)."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return Ran(result.exit_code, result.stdout, result.stderr)


def assert_one_line_error(ran: Ran, code: int, *fragments: str) -> None:
    """Exit `code`, one `regproxy: …` line on stderr naming the fragments, no traceback."""
    assert ran.code == code, (ran.code, ran.stdout, ran.stderr)
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1, ran.stderr
    assert lines[0].startswith("regproxy: "), ran.stderr
    assert "Traceback" not in ran.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
