"""What the fuzz test checks on every answer, and how it reports what it found.

Problems are grouped by kind and cause (the request's case label, or the exception a
log record carries), so one report lists each distinct defect once with an example
request per case.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

#: a log line longer than this is a field that was not cut (issue 11)
MAX_LOG_LINE = 2048
#: how much of a path or body a failure report shows
PATH_CUT = 260
#: the loggers whose records are checked
LOGGERS = ("regproxy", "aiohttp")
#: aiohttp's own access log: `regproxy serve` turns it off (`access_log=None`), the shared
#: test runner (`tests.support.served`) does not
TEST_ONLY_LOGGERS = ("aiohttp.access",)


def is_envelope(body: bytes) -> bool:
    """`{"errors": [{"code": str, "message": str, ...}, ...]}` and nothing else at the top."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    if not isinstance(doc, dict) or not isinstance(doc.get("errors"), list) or not doc["errors"]:
        return False
    return all(
        isinstance(entry, dict)
        and isinstance(entry.get("code"), str)
        and isinstance(entry.get("message"), str)
        for entry in doc["errors"]
    )


def cut(text: str | bytes, limit: int) -> str:
    """A printable prefix of `text` for a report line."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + f"…(+{len(text) - limit})"


@dataclass(frozen=True)
class Problem:
    """One thing the server got wrong; the report groups by `kind` and `cause`."""

    kind: str  # "5xx", "not-envelope", "traceback", "long-log-line", "hang", ...
    case: str  # the generator's label of the request that caused it
    request: str  # "METHOD path" cut to PATH_CUT
    detail: str
    #: what the problems of one group share (the case, or the logged exception)
    cause: str = ""

    def line(self) -> str:
        return f"{self.case}: {self.request} -> {self.detail}"


@dataclass
class Findings:
    """Every problem of one run, and counts for the summary line."""

    seed: int
    mode: str
    problems: list[Problem] = field(default_factory=list)
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    #: requests the client library itself refused to send (not the server's fault)
    unsendable: int = 0
    #: connections the server closed without an answer (allowed; listed in the report)
    dropped: int = 0
    drops: list[str] = field(default_factory=list)
    #: 4xx answered by aiohttp's HTTP parser before any route (plain text, no envelope)
    parser_4xx: int = 0

    def add(self, kind: str, case: str, request: str, detail: str, cause: str = "") -> None:
        problem = Problem(kind, case, cut(request, PATH_CUT), detail, cause or case)
        self.problems.append(problem)

    def drop(self, case: str, request: str, why: str) -> None:
        self.dropped += 1
        self.drops.append(f"{case}: {cut(request, 100)} ({why})")

    def count(self, status: int) -> None:
        self.sent += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def report(self) -> str:
        """The assertion message: seed (to replay), counts, and problems grouped by kind."""
        lines = [
            f"fuzz mode={self.mode} seed={self.seed}: "
            f"{len(self.problems)} problem(s) in {self.sent} answered requests; "
            f"statuses {dict(sorted(self.statuses.items()))}; "
            f"dropped {self.dropped}; unsendable {self.unsendable}; "
            f"parser-level 4xx {self.parser_4xx}",
            f"replay: FUZZ_SEED={self.seed} python -m pytest tests/fuzz -k {self.mode}",
        ]
        groups: dict[tuple[str, str], list[Problem]] = {}
        for problem in self.problems:
            groups.setdefault((problem.kind, problem.cause), []).append(problem)
        for (kind, cause), members in sorted(groups.items()):
            cases = sorted({member.case for member in members})
            lines.append(f"== [{kind}] {cause}: {len(members)} (cases: {', '.join(cases)[:300]})")
            shown: set[str] = set()
            for member in members:  # one example per case, at most six
                if member.case not in shown and len(shown) < 6:
                    shown.add(member.case)
                    lines.append("   " + member.line())
        if self.drops:
            lines.append(f"-- closed without an answer (allowed): {len(self.drops)}, e.g.")
            lines.extend("   " + drop for drop in self.drops[:8])
        return "\n".join(lines)


def check_records(
    records: list[logging.LogRecord], findings: Findings, case: str, request: str
) -> None:
    """No traceback for anything the fuzzer sends, and no log line beyond `MAX_LOG_LINE`."""
    for record in records:
        if not record.name.startswith(LOGGERS) or record.name in TEST_ONLY_LOGGERS:
            continue
        if record.exc_info or record.exc_text:
            exc = record.exc_info[1] if record.exc_info else None
            what = f"{type(exc).__name__}: {exception_gist(exc)}" if exc else "exc_text"
            findings.add(
                "traceback",
                case,
                request,
                f"{record.levelname} {cut(record.getMessage(), 60)} | {cut(str(exc), 120)}",
                cause=f"{record.name} logs {what}",
            )
        message = record.getMessage()
        if len(message) > MAX_LOG_LINE:
            findings.add(
                "long-log-line",
                case,
                request,
                f"{len(message)} chars: {cut(message, 80)}",
                cause=f"{record.name} line over {MAX_LOG_LINE} chars",
            )


def exception_gist(exc: BaseException) -> str:
    """The stable part of an exception's message (aiohttp's parser errors span lines and
    quote the offending bytes, which differ per request)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return ""
    gist = lines[1] if lines[0].endswith("message:") and len(lines) > 1 else lines[0]
    for marker in (" b'", "bytearray(", ' b"'):
        gist = gist.split(marker)[0]
    return gist.rstrip(":")[:70]
