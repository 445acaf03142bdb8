"""Debian's `tinyproxy` as the forward proxy of a corporate network, on loopback.

`Tinyproxy(workdir, connect_ports=[…]).start()` runs it in the foreground (`-d`) on a
free 127.0.0.1 port, allowing only 127.0.0.1 and CONNECT to the given ports, with
optional Basic credentials. `requests()` reads what it was asked from its log:
`("CONNECT", "127.0.0.1:4433")` for a tunnel, `("GET", "http://…")` for a plain-HTTP
request in absolute form.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable
from pathlib import Path

from .processes import ManagedProcess, free_port
from .tools import require_tool

#: tinyproxy's log line for each request it reads
_REQUEST = re.compile(r"Request \(file descriptor \d+\): (?P<method>[A-Z]+) (?P<target>\S+) HTTP/")


class Tinyproxy:
    def __init__(
        self,
        workdir: Path,
        *,
        connect_ports: Iterable[int],
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.binary = require_tool("tinyproxy")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.connect_ports = list(connect_ports)
        self.credentials = credentials
        self.port: int | None = None
        self.process: ManagedProcess | None = None
        self.log_path = workdir / "tinyproxy.log"

    @property
    def url(self) -> str:
        """`http://[user:password@]127.0.0.1:PORT`."""
        assert self.port is not None, "not started"
        auth = f"{self.credentials[0]}:{self.credentials[1]}@" if self.credentials else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    def _config(self, port: int) -> str:
        lines = [
            f"Port {port}",
            "Listen 127.0.0.1",
            "Timeout 30",
            f'LogFile "{self.log_path}"',
            "LogLevel Info",
            "MaxClients 50",
            "Allow 127.0.0.1",
            "DisableViaHeader Yes",
            *(f"ConnectPort {p}" for p in self.connect_ports),
        ]
        if self.credentials:
            lines.append(f"BasicAuth {self.credentials[0]} {self.credentials[1]}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15.0) -> Tinyproxy:
        self.port = self.port or free_port()
        config = self.workdir / "tinyproxy.conf"
        config.write_text(self._config(self.port))
        self.process = ManagedProcess(
            [self.binary, "-d", "-c", config],
            name="tinyproxy",
            log_path=self.workdir / "tinyproxy.out",
        ).start()
        port = self.port
        self.process.wait_for(lambda: _accepts(port), timeout=timeout, what=f"port {port}")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def requests(self) -> list[tuple[str, str]]:
        """(method, target) of every request tinyproxy read, in order."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [(m["method"], m["target"]) for m in _REQUEST.finditer(text)]

    def connects(self) -> list[str]:
        """The `host:port` of every CONNECT, in order."""
        return [target for method, target in self.requests() if method == "CONNECT"]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
