"""`serve` with `[server] workers = N > 1`: bind, pre-fork N workers, keep them running.

The supervisor is a plain synchronous process: it binds the listening sockets, checks the
TLS files, then forks every worker before any event loop or thread exists, and from then
on only waits for signals (all blocked, taken with `sigtimedwait`: no handler runs at an
odd moment). Each worker runs the app on its inherited sockets (`runner.serve_worker`).

Sockets: each worker has its own listening socket per address, all bound with
`SO_REUSEPORT`, so the kernel spreads new connections evenly over the workers (one socket
shared by all workers lets whichever wakes first take each connection, which is uneven
under load). The supervisor keeps its copies open: connections that arrive for a worker
that just died wait in its socket's queue for the replacement instead of being refused. A
port that something else already listens on is refused as with one process (a probe bind
without `SO_REUSEPORT` comes first), so a second `serve` cannot silently share the port.

Signals: SIGTERM or SIGINT → SIGTERM to every worker (each drains like a single process
does, for up to `shutdown_timeout`), SIGKILL to any still running after that plus a
margin, exit 0. SIGHUP → to every worker (each reloads its TLS certificate). A worker
that exits on its own is replaced at once, or after a growing delay when it keeps dying
within seconds of its start; a worker failing while the server starts stops `serve` with
the worker's error, exit 2, as a single process would.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import secrets
import select
import shutil
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from regproxy.config import Config, split_listen
from regproxy.server import logs, runner
from regproxy.server.workers import Worker, folder_of, retire, write_json

log = logging.getLogger("regproxy")

BACKLOG = 1024
#: beyond `shutdown_timeout`, how long workers get before SIGKILL
STOP_MARGIN = 5.0
#: a worker that dies sooner than this after its start is restarted with a growing delay
QUICK_DEATH = 5.0
MAX_RESTART_DELAY = 30.0
#: how long the first start of all workers may take (stores on S3 are probed by each)
START_TIMEOUT = 120.0
#: the variable that carries a signing key the supervisor made to its workers (not a
#: `REGPROXY_` one: those are configuration overrides)
SHARED_KEY_ENV = "_REGPROXY_WORKERS_SIGNING_KEY"
_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1


class WorkerStartError(Exception):
    """A worker could not start; the message says why (as `serve` would have said it)."""


@dataclass
class _Slot:
    number: int
    pid: int | None = None
    started: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None


@dataclass
class Listeners:
    """The bound sockets: `per_worker[i]` are worker i+1's (one per address)."""

    listen: str
    per_worker: list[list[socket.socket]] = field(default_factory=list)

    def addresses(self) -> list[tuple[str, int]]:
        return [(s.getsockname()[0], s.getsockname()[1]) for s in self.per_worker[0]]

    def close(self) -> None:
        for sockets in self.per_worker:
            for sock in sockets:
                sock.close()


def bind(listen: str, count: int) -> Listeners:
    """`count` listening sockets per address of `listen`, joined with SO_REUSEPORT;
    `runner.ListenError` when the address is taken or cannot be bound."""
    host, port = split_listen(listen)
    listeners = Listeners(listen, [[] for _ in range(count)])
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        seen = set()
        for family, kind, proto, _name, address in infos:
            if address in seen:
                continue
            seen.add(address)
            try:
                if port:
                    _probe(family, kind, proto, address)
                bound_port = port
                for sockets in listeners.per_worker:
                    sock = socket.socket(family, kind, proto)
                    sockets.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind((address[0], bound_port, *address[2:]))
                    bound_port = sock.getsockname()[1]  # port 0: every worker's the same
                    sock.listen(BACKLOG)
            except OSError as exc:  # worded as asyncio words it for a single process
                reason = (exc.strerror or str(exc)).lower()
                message = f"error while attempting to bind on address {address!r}: {reason}"
                raise OSError(exc.errno, message) from exc
    except OSError as exc:
        listeners.close()
        raise runner.ListenError(listen, exc) from exc
    return listeners


def _probe(family: int, kind: int, proto: int, address: tuple) -> None:
    """EADDRINUSE when anything listens on `address` (a socket group of another process
    with SO_REUSEPORT would otherwise take ours in)."""
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(address)


def share_signing_key(config: Config, count: int) -> Config:
    """With auth on and no key configured, one key made here for every worker (a token
    issued by one is accepted by all); warn that other replicas will not accept them."""
    if not config.auth.enabled or config.auth.signing_key() is not None:
        return config
    log.warning(
        "no [auth] signing_key_file or signing_key_env: the %d workers share a key made at "
        "start-up, so tokens end when serve stops and no other replica accepts them; "
        "configure one key for every replica",
        count,
    )
    os.environ[SHARED_KEY_ENV] = secrets.token_urlsafe(32)
    auth = dataclasses.replace(config.auth, signing_key_env=SHARED_KEY_ENV)
    return dataclasses.replace(config, auth=auth)


def prepare_folder(config: Config) -> Path:
    """`temporary_registry_storage/workers/`, without a previous run's metric snapshots."""
    folder = folder_of(config)
    shutil.rmtree(folder / "metrics", ignore_errors=True)
    (folder / "metrics").mkdir(parents=True, exist_ok=True)
    return folder


def run(
    config: Config,
    version: str,
    count: int,
    describe: Callable[[BaseException], str | None],
) -> None:
    """Serve with `count` workers until SIGTERM or SIGINT. Raises what binding, TLS or the
    signing key raise (as a single process would), or `WorkerStartError`."""
    context = runner.tls_context(config)  # bad files: refused once, here
    config = share_signing_key(config, count)
    folder = prepare_folder(config)
    main = bind(config.server.listen, count)
    ops = None
    try:
        if config.metrics.listen is not None:
            ops = bind(config.metrics.listen, count)
        supervisor = Supervisor(config, version, count, folder, main, ops, context, describe)
        supervisor.run()
    finally:
        main.close()
        if ops is not None:
            ops.close()


class Supervisor:
    def __init__(
        self,
        config: Config,
        version: str,
        count: int,
        folder: Path,
        main: Listeners,
        ops: Listeners | None,
        context: ssl.SSLContext | None,
        describe: Callable[[BaseException], str | None],
    ) -> None:
        self.config = config
        self.version = version
        self.folder = folder
        self.main = main
        self.ops = ops
        self.context = context
        self.describe = describe
        self.slots = [_Slot(n) for n in range(1, count + 1)]
        self.pid = os.getpid()
        self.restarts: dict[int, int] = {}

    # ---- the supervisor's side ----------------------------------------------------------

    def run(self) -> None:
        if threading.active_count() > 1:  # fork copies no thread: none may exist yet
            log.warning("threads running before the workers are forked: %s", threading.enumerate())
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            self._start_all()
            self._announce()
            self._watch()
        finally:
            # stopped: a late SIGTERM or SIGHUP must not turn the exit into a kill
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)

    def _announce(self) -> None:
        scheme = "https" if self.context is not None else "http"
        count = len(self.slots)
        for host, port in self.main.addresses():
            shown = f"[{host}]" if ":" in host else host
            log.info(
                "regproxy %s listening on %s://%s:%d (%d workers)",
                self.version,
                scheme,
                shown,
                port,
                count,
            )
        if self.ops is not None:
            for host, port in self.ops.addresses():
                shown = f"[{host}]" if ":" in host else host
                log.info("metrics listening on http://%s:%d/metrics", shown, port)

    def _start_all(self) -> None:
        """Fork every worker and wait until each listens, or one says why it cannot."""
        pending: dict[int, tuple[_Slot, bytearray]] = {}
        for slot in self.slots:
            read_end, write_end = os.pipe()
            self._spawn(slot, write_end)
            os.close(write_end)
            pending[read_end] = (slot, bytearray())
        errors: list[str] = []
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while pending and not errors:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    errors.append(f"the workers did not start within {START_TIMEOUT:.0f} s")
                    break
                readable, _, _ = select.select(list(pending), [], [], remaining)
                for fd in readable:
                    slot, buffer = pending[fd]
                    data = os.read(fd, 65536)
                    if data:
                        buffer += data
                        continue
                    del pending[fd]  # the worker closed its end: ready, or failed
                    os.close(fd)
                    if not buffer.startswith(b"R"):
                        message = bytes(buffer[1:]).decode(errors="replace").strip()
                        errors.append(message or f"worker {slot.number} exited while starting")
        finally:
            for fd in pending:
                os.close(fd)
        self._write_state()
        if errors:
            self._stop(quiet=True)
            raise WorkerStartError(errors[0])

    def _watch(self) -> None:
        while True:
            due = [s.restart_at for s in self.slots if s.restart_at is not None]
            timeout = max(0.0, min(due) - time.monotonic()) if due else 3600.0
            info = signal.sigtimedwait(_SIGNALS, timeout)
            if info is None:
                self._restart_due()
            elif info.si_signo == signal.SIGCHLD:
                self._reap(restart=True)
                self._restart_due()
            elif info.si_signo == signal.SIGHUP:
                if self.context is None:
                    log.info("SIGHUP: nothing to reload (no TLS certificate configured)")
                else:
                    self._signal_all(signal.SIGHUP)
            else:
                self._stop()
                return

    def _reap(self, restart: bool) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            slot.pid = None
            if not restart:
                continue
            lived = time.monotonic() - slot.started
            if os.WIFSIGNALED(status):
                how = f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
            else:
                how = f"exited with code {os.waitstatus_to_exitcode(status)}"
            slot.quick_deaths = slot.quick_deaths + 1 if lived < QUICK_DEATH else 0
            delay = 0.0
            if slot.quick_deaths > 1:
                delay = min(0.5 * 2 ** (slot.quick_deaths - 2), MAX_RESTART_DELAY)
            log.warning(
                "worker %d (pid %d) %s after %.1f s; starting another%s",
                slot.number,
                pid,
                how,
                lived,
                f" in {delay:.1f} s" if delay else "",
            )
            with contextlib.suppress(OSError):
                retire(self.folder, slot.number)
            self.restarts[slot.number] = self.restarts.get(slot.number, 0) + 1
            slot.restart_at = time.monotonic() + delay

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now and slot.pid is None:
                slot.restart_at = None
                self._spawn(slot, None)
        self._write_state()

    def _signal_all(self, sig: int) -> None:
        for slot in self.slots:
            if slot.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, sig)

    def _stop(self, quiet: bool = False) -> None:
        """SIGTERM to every worker; wait for them to drain; SIGKILL the late ones."""
        if not quiet:
            log.info("shutting down: the workers finish their in-flight requests")
        # the listening sockets close once the workers have closed theirs too
        self.main.close()
        if self.ops is not None:
            self.ops.close()
        for slot in self.slots:
            slot.restart_at = None
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_timeout + STOP_MARGIN
        while any(s.pid is not None for s in self.slots):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                late = [s.number for s in self.slots if s.pid is not None]
                log.warning("workers %s still running: SIGKILL", late)
                self._signal_all(signal.SIGKILL)
                for slot in self.slots:
                    if slot.pid is not None:
                        with contextlib.suppress(ChildProcessError):
                            os.waitpid(slot.pid, 0)
                        slot.pid = None
                break
            info = signal.sigtimedwait(_SIGNALS, remaining)
            if info is not None and info.si_signo == signal.SIGCHLD:
                self._reap(restart=False)
        if not quiet:
            log.info("stopped")

    def _write_state(self) -> None:
        state = {
            "supervisor": self.pid,
            "workers": {
                str(s.number): {"pid": s.pid, "restarts": self.restarts.get(s.number, 0)}
                for s in self.slots
            },
        }
        with contextlib.suppress(OSError):
            write_json(self.folder / "state.json", state)

    def _spawn(self, slot: _Slot, ready: int | None) -> None:
        pid = os.fork()
        if pid:
            slot.pid = pid
            slot.started = time.monotonic()
            return
        code = 1
        try:
            code = self._child(slot, ready)
        except BaseException:
            log.exception("worker %d failed", slot.number)
        finally:
            logging.shutdown()  # os._exit skips atexit: write the access lines still queued
            os._exit(code)  # never back into the supervisor's stack

    # ---- the worker's side (after fork) -------------------------------------------------

    def _child(self, slot: _Slot, ready: int | None) -> int:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # the supervisor killed: stop too
        if os.getppid() != self.pid:
            return 1
        _prctl(_PR_SET_NAME, ctypes.create_string_buffer(f"regproxy-w{slot.number}".encode()))
        # the per-process prefix of request ids was drawn in the supervisor
        logs._ID_PREFIX = os.urandom(4).hex()
        index = slot.number - 1
        for listeners in (self.main, self.ops):
            if listeners is not None:
                for i, sockets in enumerate(listeners.per_worker):
                    if i != index:
                        for sock in sockets:
                            sock.close()
        worker = Worker(slot.number, len(self.slots), self.folder)
        started = False

        def on_ready() -> None:
            nonlocal started
            started = True
            if ready is not None:
                os.write(ready, b"R")
                os.close(ready)

        try:
            runner.run_worker(
                self.config,
                self.version,
                worker,
                self.main.per_worker[index],
                self.ops.per_worker[index] if self.ops is not None else [],
                self.context,
                on_ready,
            )
        except BaseException as exc:
            if started:
                raise
            message = self.describe(exc)
            if message is None:
                log.exception("worker %d could not start", slot.number)
                message = f"worker {slot.number} could not start: {exc!r}"
            elif ready is None:
                log.error("worker %d could not start: %s", slot.number, message)
            if ready is not None:
                os.write(ready, b"E" + message.encode())
                os.close(ready)
            return 2
        return 0


def _prctl(option: int, value: object) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
