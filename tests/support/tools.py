"""Locating external tools and running them with a timeout.

A missing tool skips a test on a developer's machine, but fails it in CI (``CI=true``):
CI must prove the clients work, and a silent skip would hide a broken install step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import pytest

DEFAULT_TIMEOUT = 120.0
_OUTPUT_LIMIT = 4000


def in_ci() -> bool:
    """True when running in CI, where skipping is not acceptable."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def skip_or_fail(reason: str) -> NoReturn:
    """Skip locally, fail in CI: a requirement of the test is not met."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: missing requirements fail instead of skipping)")
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Return the absolute path of executable ``name`` (a name or an absolute path).

    Searches PATH plus the sbin directories, which are not always on a non-login PATH but
    hold ``dockerd``.
    """
    if os.path.isabs(name):
        if os.access(name, os.X_OK):
            return name
    else:
        search = os.pathsep.join(
            [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]
        )
        found = shutil.which(name, path=search)
        if found:
            return found
    skip_or_fail(f"required tool {name!r} is not installed")


def require_root() -> None:
    """Container engines here run rootful; skip (or fail in CI) when not root."""
    if os.geteuid() != 0:
        skip_or_fail("this test needs root (rootful container engine)")


def _clip(text: str) -> str:
    if len(text) <= _OUTPUT_LIMIT:
        return text
    return f"[... {len(text) - _OUTPUT_LIMIT} chars cut ...]\n" + text[-_OUTPUT_LIMIT:]


def run_bytes(
    argv: Sequence[str | Path],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Like :func:`run`, but stdout and stderr stay bytes (e.g. to compare blob content)."""
    args = [str(a) for a in argv]
    full_env = {**os.environ, **env} if env is not None else None
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            timeout=timeout,
            env=full_env,
            cwd=cwd,
            input=input,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = _as_text(exc.stdout)
        err = _as_text(exc.stderr)
        raise AssertionError(
            f"command timed out after {timeout}s: {' '.join(args)}\n"
            f"--- stdout ---\n{_clip(out)}\n--- stderr ---\n{_clip(err)}"
        ) from None
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed with exit code {proc.returncode}: {' '.join(args)}\n"
            f"--- stdout ---\n{_clip(_as_text(proc.stdout))}\n"
            f"--- stderr ---\n{_clip(_as_text(proc.stderr))}"
        )
    return proc


def run(
    argv: Sequence[str | Path],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output as text, and fail clearly.

    Raises ``AssertionError`` (so pytest shows it as a test failure, with the command's
    output) if the command exits non-zero while ``check`` is set, or overruns ``timeout``.
    ``env`` entries are added to the current environment.
    """
    proc = run_bytes(argv, timeout=timeout, check=check, env=env, cwd=cwd, input=input)
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, _as_text(proc.stdout), _as_text(proc.stderr)
    )


def _as_text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode(errors="replace")


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first (the order to unmount them in)."""
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with spaces and such octal-escaped.
            mount_point = line.split()[4].encode().decode("unicode_escape")
            if mount_point == root or mount_point.startswith(root + "/"):
                found.append(mount_point)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """Unmount anything a daemon left mounted below ``path``, then delete it.

    Container engines bind-mount their data roots and layer directories; deleting through
    a live mount would fail, or worse, delete what the mount points to.
    """
    for mount_point in mounts_below(path):
        subprocess.run(["umount", "-l", mount_point], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)
