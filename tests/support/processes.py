"""Managed subprocesses for tests: registries under test and reference servers.

Every process is started in its own process group with its output going to a log file, is
waited on with a readiness poll (never a fixed sleep), and is stopped with SIGTERM, then
SIGKILL of the whole group. Backstops, so that no server outlives pytest: an ``atexit``
hook kills what fixtures never reached teardown for, SIGTERM to pytest unwinds through
fixture teardown (as KeyboardInterrupt), and each child gets SIGTERM from the kernel
(``PR_SET_PDEATHSIG``) if pytest is killed outright.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

from .tools import require_tool

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]

_LIVE: set[ManagedProcess] = set()
_PR_SET_PDEATHSIG = 1


class ProcessError(AssertionError):
    """A managed process died or did not become ready; the message carries its log tail."""


class ManagedProcess:
    """A subprocess with a log file, readiness polling and guaranteed teardown."""

    def __init__(
        self,
        argv: Sequence[str | Path],
        *,
        name: str,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.name = name
        self.log_path = log_path
        self.env = dict(env) if env is not None else dict(os.environ)
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> ManagedProcess:
        """Start the process; its stdout and stderr are appended to ``log_path``."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            log.write(f"=== {self.name}: {' '.join(self.argv)}\n".encode())
            log.flush()
            # A new session makes the process a group leader, so stop() can kill whatever
            # it spawned (e.g. dockerd's containerd) together with it.
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        _LIVE.add(self)
        _terminate_gracefully_on_sigterm()
        return self

    # --- logs -------------------------------------------------------------------------

    def log_text(self, *, current_run_only: bool = False) -> str:
        try:
            with open(self.log_path, "rb") as f:
                if current_run_only:
                    f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60, *, exclude: re.Pattern[str] | None = None) -> str:
        """Last ``lines`` lines of the log, leaving out noise that matches ``exclude``."""
        kept = self.log_text().splitlines()
        if exclude is not None:
            kept = [line for line in kept if not exclude.search(line)]
        return "\n".join(kept[-lines:])

    def _error(self, message: str) -> ProcessError:
        state = "running" if self.running else f"exited with {self.proc and self.proc.returncode}"
        return ProcessError(
            f"{self.name} ({state}): {message}\n"
            f"--- last lines of {self.log_path} ---\n{self.log_tail()}"
        )

    # --- readiness --------------------------------------------------------------------

    def wait_for(self, condition: Callable[[], T | None], *, timeout: float, what: str) -> T:
        """Poll ``condition`` until it returns something truthy; return that.

        Fails fast if the process exits meanwhile, and with the log tail either way.
        """
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            result = condition()
            if result:
                return result
            if not self.running:
                raise self._error(f"exited while waiting for {what}")
            if time.monotonic() > deadline:
                raise self._error(f"not ready after {timeout}s: waiting for {what}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)

    def wait_for_log(self, pattern: str | re.Pattern[str], *, timeout: float) -> re.Match[str]:
        """Wait until the current run's log matches ``pattern``; return the match."""
        regex = re.compile(pattern)
        return self.wait_for(
            lambda: regex.search(self.log_text(current_run_only=True)),
            timeout=timeout,
            what=f"log line matching {regex.pattern!r}",
        )

    # --- teardown ---------------------------------------------------------------------

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process, SIGKILL its group if it lingers; return the exit code.

        The group gets SIGKILL even after a clean exit, to reap helpers it left running.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                note = f"=== {self.name}: still running {timeout}s after SIGTERM: SIGKILL\n"
                with open(self.log_path, "ab") as log:
                    log.write(note.encode())
        self._signal_group(signal.SIGKILL)
        code = self.proc.wait(10)
        _LIVE.discard(self)
        return code

    def kill(self) -> int | None:
        """SIGKILL the whole group at once: simulates a crash."""
        if self.proc is None:
            return None
        self._signal_group(signal.SIGKILL)
        code = self.proc.wait(10)
        _LIVE.discard(self)
        return code

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if pytest dies without cleaning up (SIGKILL),
    so no server outlives the test run even then."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _terminate_gracefully_on_sigterm() -> None:
    """Turn SIGTERM to pytest (e.g. from a CI time limit) into KeyboardInterrupt.

    By default SIGTERM ends Python at once, skipping fixture teardown; as an exception
    it unwinds through the fixtures, which stop their processes. Only replaces the
    default handler, and only from the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@atexit.register
def _kill_leftovers() -> None:
    """Backstop for fixtures that never reached teardown (e.g. KeyboardInterrupt)."""
    for proc in list(_LIVE):
        proc.kill()


def free_port() -> int:
    """Ask the kernel for a currently unused loopback TCP port.

    There is a small race until the server binds it; callers retry on "address in use".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, *, method: str = "GET", timeout: float = 2.0) -> int | None:
    """Status code of a request, or None if nothing answers; for readiness polls."""
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, urllib.error.URLError):
        return None


#: what the real-client tests can run against (``RP_TEST_AGAINST``)
TARGETS = ("regproxy", "reference")


def registry_target() -> str:
    """``RP_TEST_AGAINST``: regproxy (default), or Docker's reference registry to validate
    the tests themselves."""
    target = os.environ.get("RP_TEST_AGAINST", "regproxy").strip() or "regproxy"
    if target not in TARGETS:
        raise pytest.UsageError(f"RP_TEST_AGAINST must be one of {TARGETS}, not {target!r}")
    return target


class RegistryServer(Protocol):
    """What client tests need from any registry they push to and pull from."""

    @property
    def host(self) -> str: ...

    @property
    def url(self) -> str: ...

    @property
    def storage_dir(self) -> Path: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def kill(self) -> None: ...

    def restart(self) -> None: ...

    def log_tail(self, lines: int = 60) -> str: ...


class _ServerBase:
    """Shared host/url/teardown for the servers below."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port: int | None = None
        self.process: ManagedProcess | None = None

    @property
    def host(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.name} has not been started")
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def log_tail(self, lines: int = 60) -> str:
        return self.process.log_tail(lines) if self.process else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def kill(self) -> None:
        """SIGKILL: simulate a crash; storage is left as the crash left it."""
        if self.process is not None:
            self.process.kill()

    def __enter__(self) -> _ServerBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ReferenceRegistry(_ServerBase):
    """Docker's Go registry (Debian ``docker-registry``), the conformance yardstick.

    Filesystem storage in ``workdir``, deletes enabled, no auth. With ``proxy_remote_url``
    it becomes a read-only pull-through cache of that registry instead.
    """

    name = "docker-registry"
    #: environment variables it must not see: it reads REGISTRY_* as config overrides
    #: (REGISTRY_AUTH_FILE, set for podman/skopeo, would turn into a bogus auth section)
    dropped_env: tuple[str, ...] = ("REGISTRY_",)

    def __init__(
        self,
        workdir: Path,
        *,
        proxy_remote_url: str | None = None,
        extra_config: Mapping[str, object] | None = None,
        binary: str = "docker-registry",
    ) -> None:
        super().__init__(workdir)
        self.binary = require_tool(binary)
        self.proxy_remote_url = proxy_remote_url
        self.extra_config = dict(extra_config or {})
        self.config_path = self.workdir / "config.yml"

    @property
    def storage_dir(self) -> Path:
        return self.workdir / "storage"

    def _write_config(self, port: int) -> None:
        config: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text"},
            # No blob descriptor cache: it can answer stale results after deletes.
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"127.0.0.1:{port}",
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if self.proxy_remote_url:
            config["proxy"] = {"remoteurl": self.proxy_remote_url}
        config.update(self.extra_config)
        # JSON is YAML, so no YAML library is needed.
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self, port: int | None = None, *, timeout: float = 30.0) -> None:
        """Start on ``port`` (default: a fresh free one), ready once ``/v2/`` answers 200."""
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(self.dropped_env)}
        for attempt in range(3):
            self.port = port or free_port()
            self._write_config(self.port)
            self.process = ManagedProcess(
                [self.binary, "serve", self.config_path],
                name=self.name,
                log_path=self.log_path,
                env=env,
            ).start()
            try:
                self.process.wait_for(
                    lambda: http_status(f"{self.url}/v2/") == 200,
                    timeout=timeout,
                    what=f"GET {self.url}/v2/ == 200",
                )
                return
            except ProcessError:
                self.process.stop()
                in_use = "address already in use" in self.process.log_text(current_run_only=True)
                if not in_use or port is not None or attempt == 2:
                    raise

    def restart(self) -> None:
        """Stop and start again on the same port with the same storage."""
        port = self.port
        self.stop()
        self.start(port)


class RegproxyProcess(_ServerBase):
    """regproxy run as ``python -m regproxy serve`` on a kernel-chosen loopback port.

    Contract with the server: once it accepts connections it logs a line containing
    ``listening on http://127.0.0.1:PORT``.
    """

    name = "regproxy"
    LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")

    def __init__(
        self,
        workdir: Path,
        *,
        extra_config: str = "",
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(workdir)
        self.extra_config = extra_config
        self.python = python
        self.extra_env = dict(env or {})
        self.config_path = self.workdir / "configuration.toml"

    @property
    def storage_dir(self) -> Path:
        """The ``registry_storage`` directory."""
        return self.workdir / "registry"

    @property
    def temporary_storage_dir(self) -> Path:
        return self.workdir / "tmp"

    @property
    def proxy_storage_dir(self) -> Path:
        return self.workdir / "proxy"

    def _write_config(self) -> None:
        lines = [
            # json.dumps gives a valid TOML basic string for any path.
            f"registry_storage = {json.dumps(str(self.storage_dir))}",
            f"temporary_registry_storage = {json.dumps(str(self.temporary_storage_dir))}",
            f"proxy_storage = {json.dumps(str(self.proxy_storage_dir))}",
            "",
            self.extra_config,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, port: int = 0, *, timeout: float = 30.0) -> None:
        """Start the server (port 0: let it choose) and wait for its listening line."""
        for d in (self.storage_dir, self.temporary_storage_dir, self.proxy_storage_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._write_config()
        # Import regproxy from this checkout even when it is not pip-installed.
        pythonpath = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        # regproxy reads REGPROXY_* variables as config overrides, and rejects unknown keys:
        # the environment of the test run must not reach it. Only ``env`` given
        # to this object does.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("REGPROXY_")}
        env = {**inherited, "PYTHONPATH": pythonpath, **self.extra_env}
        self.process = ManagedProcess(
            [
                self.python,
                "-m",
                "regproxy",
                "serve",
                "-c",
                self.config_path,
                "--listen",
                f"127.0.0.1:{port}",
            ],
            name=self.name,
            log_path=self.log_path,
            env=env,
            cwd=REPO_ROOT,
        ).start()
        try:
            match = self.process.wait_for_log(self.LISTENING, timeout=timeout)
        except ProcessError:
            self.process.stop()
            raise
        self.port = int(match.group(1))

    def restart(self) -> None:
        """Stop and start again with the same directories, on the same port.

        Keeping the port means references a test already built (``host/repo:tag``) stay
        valid across the restart.
        """
        port = self.port or 0
        self.stop()
        self.start(port)
