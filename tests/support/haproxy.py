"""Debian's HAProxy (`/usr/sbin/haproxy`) as the round-robin load balancer in front of
regproxy replicas, on loopback.

`HAProxy(workdir, backends).start()` writes a configuration and runs haproxy in the
foreground (`-db`) on a free 127.0.0.1 port, as an operator would put it in front of
several hosts with no sticky sessions:

- `mode http`, `balance roundrobin`, no cookie, no `stick-table`, no `prefer-last-server`.
  HAProxy's default connection mode is keep-alive on both sides, and in it *every*
  request of a client connection goes through load balancing again ("option
  http-keep-alive": a request that must go to another server than the one behind the
  idle server connection gets a new one); `prefer-last-server` is what would keep them
  together, and it is not set. tests/replicas/test_spread.py proves it through the
  `X-Regproxy-Replica` header of consecutive requests on one client connection.
- Health checks `GET /healthz` on the main listener: the one that says the process
  answers. `/readyz` says whether its storage takes writes (on S3 it writes a probe
  object per check, too many at this interval) and upstreams never make it fail; a dead
  replica is what the balancer must notice, and a refused connection fails either.
  `inter 200ms`, `fall 2`: a replica killed with SIGKILL is out within about half a
  second; `rise 2` brings a restarted one back as quickly.
- `retries 3` with `option redispatch`: a request whose connection to a replica is
  refused (it was just killed, before the checks noticed) is sent to another one.
  Only connection failures are retried (HAProxy's default `retry-on conn-failure`): a
  request a replica has begun to answer is never replayed elsewhere.
- Generous timeouts for large bodies (`timeout client`/`server` 300 s, as a registry
  needs for big layers on slow links); `option forwardfor` so replicas can count
  clients by their own address (`[server] trust_forwarded_headers`).

Its log (`log stdout`, one `option httplog` line per request naming the server that
took it) goes to `haproxy.log` in `workdir`; `log_tail()` is for failure messages.
`servers()` reads each backend's state from the admin socket. `stop()` ends the process
by its PID (SIGTERM, then SIGKILL of its process group), never by name.
"""

from __future__ import annotations

import csv
import io
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .processes import ManagedProcess, ProcessError, free_port
from .tools import require_tool

BACKEND = "replicas"
#: health check interval and thresholds: a dead replica is out after FALL failed checks
CHECK_INTER_MS = 200
FALL = 2
RISE = 2


#: `option httplog`: `127.0.0.1:56906 [07/Dec/2026:06:29:25.748] registry replicas/r1
#: 0/0/0/31/31 202 396 - - ---- 1/1/0/0/0 0/0 "POST /v2/… HTTP/1.1"`
_HTTPLOG = re.compile(
    r"^(?P<client>\S+) \[[^\]]+\] \S+ [^/\s]+/(?P<server>\S+) \S+ (?P<status>-?\d+) \S+ "
    r"\S+ \S+ (?P<termination>\S+) \S+ \S+ \"(?P<request>[^\"]*)\""
)


@dataclass(frozen=True)
class Logged:
    """One request as HAProxy logged it."""

    client: str  # address:port of the client connection
    server: str  # the replica that took it (`<NOSRV>` if none)
    status: int  # -1: no answer reached the client
    termination: str  # `----` for a clean end; `SH--` a server that died mid-answer, …
    request: str  # the request line


class HAProxy:
    """One haproxy balancing `backends` (`(name, port)` on 127.0.0.1) round-robin."""

    name = "haproxy"

    def __init__(
        self,
        workdir: Path,
        backends: Sequence[tuple[str, int]],
        *,
        check_path: str = "/healthz",
    ) -> None:
        self.binary = require_tool("haproxy")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.backends = list(backends)
        self.check_path = check_path
        self.port: int | None = None
        self.process: ManagedProcess | None = None
        self.config_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        # a unix socket path must stay under 108 bytes: pytest's tmp_path can be long
        self.admin_socket = Path(f"/tmp/rp-haproxy-{id(self):x}-{free_port()}.sock")

    @property
    def host(self) -> str:
        assert self.port is not None, "haproxy has not been started"
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def config(self, port: int) -> str:
        servers = [f"    server {name} 127.0.0.1:{p}" for name, p in self.backends]
        return "\n".join(
            [
                "global",
                "    log stdout format raw local0 info",
                f"    stats socket {self.admin_socket} mode 600 level admin",
                "    maxconn 2000",
                "",
                "defaults",
                "    mode http",
                "    log global",
                "    option httplog",
                "    option dontlognull",
                "    option forwardfor",
                "    option redispatch",
                "    retries 3",
                "    timeout connect 2s",
                "    timeout client 300s",
                "    timeout server 300s",
                "    timeout http-request 30s",
                "    timeout http-keep-alive 30s",
                "    timeout queue 30s",
                "    timeout check 1s",
                "",
                "frontend registry",
                f"    bind 127.0.0.1:{port}",
                f"    default_backend {BACKEND}",
                "",
                f"backend {BACKEND}",
                "    balance roundrobin",
                f"    option httpchk GET {self.check_path}",
                "    http-check expect status 200",
                f"    default-server check inter {CHECK_INTER_MS}ms fastinter 100ms"
                f" downinter 300ms fall {FALL} rise {RISE}",
                *servers,
                "",
            ]
        )

    def start(self, timeout: float = 15.0) -> HAProxy:
        """Start on a free port; ready once it accepts and every backend is UP."""
        for attempt in range(3):
            self.port = free_port()
            self.config_path.write_text(self.config(self.port))
            self.process = ManagedProcess(
                [self.binary, "-db", "-f", self.config_path],
                name=self.name,
                log_path=self.log_path,
            ).start()
            try:
                self.process.wait_for(self._accepting, timeout=timeout, what=f"port {self.port}")
                break
            except ProcessError:
                self.process.stop()
                text = self.process.log_text(current_run_only=True)
                if attempt == 2 or "Address already in use" not in text:
                    raise
        try:
            self.wait_for_state({name: "UP" for name, _ in self.backends}, timeout=timeout)
        except BaseException:
            self.stop()  # the caller never gets this object to stop
            raise
        return self

    def _accepting(self) -> bool:
        assert self.port is not None
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def admin(self, command: str) -> str:
        """One command on the admin socket (`show stat`, `disable server …`); its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.admin_socket))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def servers(self) -> dict[str, str]:
        """{server name: status} of the backend (`UP`, `DOWN`, `UP 1/2`, `MAINT`, …)."""
        text = self.admin("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == BACKEND and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_for_state(self, wanted: dict[str, str], timeout: float = 10.0) -> None:
        """Wait until each named server has the wanted status (`UP` or `DOWN`)."""
        assert self.process is not None

        def reached() -> bool:
            try:
                now = self.servers()
            except OSError:
                return False
            return all(now.get(name) == state for name, state in wanted.items())

        self.process.wait_for(reached, timeout=timeout, what=f"servers {wanted}")

    def requests(self) -> list[Logged]:
        """Every request HAProxy logged (`option httplog` lines), in order."""
        found = []
        for line in self.log_text().splitlines():
            match = _HTTPLOG.match(line)
            if match:
                found.append(
                    Logged(
                        client=match["client"],
                        server=match["server"],
                        status=int(match["status"]),
                        termination=match["termination"],
                        request=match["request"],
                    )
                )
        return found

    def requests_by_server(self) -> list[tuple[str, str]]:
        """(server, request line) of every logged request, in order."""
        return [(r.server, r.request) for r in self.requests()]

    def log_text(self) -> str:
        return self.process.log_text() if self.process else ""

    def log_tail(self, lines: int = 60) -> str:
        return self.process.log_tail(lines) if self.process else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        self.admin_socket.unlink(missing_ok=True)

    def __enter__(self) -> HAProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
