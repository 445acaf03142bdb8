"""Read the access logs of the servers under test, to see who asked whom for what.

Both servers write one combined-format line per request: Debian's ``docker-registry``
(``127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 200 123 "" "agent"``) and regproxy
(``... regproxy.access: 127.0.0.1 [date] "GET /v2/... HTTP/1.1" 200 123 "-" "agent"``).
Tests count upstream requests with it (coalescing) and tell clients apart by their
User-Agent (did podman reach the upstream itself, or only regproxy's aiohttp client?).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from regproxy.server.logs import LineWriter

_LINE = re.compile(
    r'"(?P<method>[A-Z]+) (?P<target>/\S*) HTTP/[0-9.]+" (?P<status>\d{3}) \S+ '
    r'"(?:[^"\\]|\\.)*" "(?P<agent>(?:[^"\\]|\\.)*)"'
)

#: regproxy's upstream client (aiohttp) introduces itself like this.
AIOHTTP_AGENT = re.compile(r"aiohttp/")


@dataclass(frozen=True)
class AccessEntry:
    method: str
    target: str  # path and query, as sent
    status: int
    agent: str

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)


#: a little over serve's batch window of access lines (regproxy/server/logs.py)
SETTLE = 2 * LineWriter.BATCH_WINDOW


class AccessLog:
    """The access lines of one server's log file, from a byte offset on."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        """An offset to pass to :meth:`entries` to see only what comes after now (after
        the lines of requests already answered have been written)."""
        time.sleep(SETTLE)
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def entries(self, since: int = 0) -> list[AccessEntry]:
        """The lines after `since`, once those of requests already answered are written:
        `serve` writes access lines in batches (`logs.LineWriter.BATCH_WINDOW`)."""
        time.sleep(SETTLE)
        try:
            with open(self.path, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        found = []
        for line in text.splitlines():
            match = _LINE.search(line)
            if match:
                found.append(
                    AccessEntry(
                        match["method"], match["target"], int(match["status"]), match["agent"]
                    )
                )
        return found

    def wait_for(
        self,
        predicate: Callable[[list[AccessEntry]], bool],
        *,
        since: int = 0,
        timeout: float = 5.0,
    ) -> list[AccessEntry]:
        """Entries once ``predicate`` holds for them (a server logs a request just after
        answering it, so a client may finish a hair before the line is written)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.entries(since)
            if predicate(found) or time.monotonic() > deadline:
                return found
            time.sleep(0.02)
