"""Terminal output shared by the operator commands, and their one-line error handling.

Tables and progress bars go through rich and only to a terminal; `--json`
prints one JSON document on stdout and nothing else, so scripts can parse it.
Sizes are human-readable in tables (binary units, as `du -h`) and plain byte
counts in JSON; times are relative in tables and ISO 8601 UTC in JSON.

Errors are one line on stderr (`regproxy: …`) and an exit code, never a
traceback: `cli_errors()` turns the `OSError`s storage code raises (permission
denied, disk full, read-only file system) into that line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from regproxy.cli import EXIT_USAGE, fail
from regproxy.config import S3Config, StorageLocation
from regproxy.storage.store import Store

if TYPE_CHECKING:
    from rich.console import JustifyMethod

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document for scripts, nothing else."
)


def human_size(n: int | None) -> str:
    """`1536` → `1.5 KiB`; None → `-`."""
    if n is None:
        return "-"
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def human_age(timestamp: float | None, now: float | None = None) -> str:
    """A past time as `42s ago`, `5m ago`, `3h ago`, `12d ago`; None → `-`."""
    if timestamp is None:
        return "-"
    seconds = max(0.0, (time.time() if now is None else now) - timestamp)
    for limit, div, unit in ((120, 1, "s"), (7200, 60, "m"), (172800, 3600, "h")):
        if seconds < limit:
            return f"{int(seconds // div)}{unit} ago"
    return f"{int(seconds // 86400)}d ago"


def human_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def iso(timestamp: float | None) -> str | None:
    """ISO 8601 UTC (`2024-05-01T12:00:00Z`) for JSON; None stays None."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def short_digest(digest: str | None, length: int = 12) -> str:
    if not digest:
        return "-"
    algorithm, _, hex_ = digest.partition(":")
    return f"{algorithm}:{hex_[:length]}"


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


#: width of tables written to a pipe or file (cron mail, logs): wide rather than truncated
PIPE_WIDTH = 160


def console() -> Console:
    """stdout; colour only on a terminal, and no 80-column squeeze when piped."""
    out = Console(highlight=False)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = Console(highlight=False, width=PIPE_WIDTH)
    return out


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def table(title: str | None, columns: Sequence[str | tuple[str, str]]) -> Table:
    """A table whose column specs are `name` or `(name, justify)`."""
    out = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for i, column in enumerate(columns):
        name, justify = (column, "left") if isinstance(column, str) else column
        # the first column names the row: never squeeze it away
        align = cast("JustifyMethod", justify)  # "left" or "right", as the callers write them
        out.add_column(name, justify=align, no_wrap=i == 0 or justify == "right")
    return out


def add_row(t: Table, *cells: str | Text | None) -> None:
    """Add a row; plain strings are shown as they are (never parsed as rich markup)."""
    t.add_row(*(c if isinstance(c, Text) else Text("" if c is None else str(c)) for c in cells))


def byte_progress(out: Console, enabled: bool, transient: bool = False) -> Progress:
    """Bars with bytes done/total and speed; `enabled=False` renders nothing at all."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=out,
        disable=not enabled,
        transient=transient,
    )


def describe_os_error(exc: OSError, with_path: bool = True) -> str:
    """`permission denied: /srv/registry/blobs`: what went wrong and where, in one line."""
    names = {
        errno.ENOSPC: "disk full",
        errno.EDQUOT: "disk quota exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "read-only file system",
        errno.ENOENT: "no such file or directory",
        errno.ENOTDIR: "not a directory",
    }
    what = names.get(exc.errno or 0, exc.strerror or str(exc))
    return f"{what}: {exc.filename}" if exc.filename and with_path else what


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Storage failures become one line on stderr and exit 2, never a traceback."""
    try:
        yield
    except OSError as exc:
        fail(describe_os_error(exc), EXIT_USAGE)
    except Exception as exc:
        if not type(exc).__module__.startswith(("botocore", "boto3", "urllib3")):
            raise
        fail(f"S3 request failed: {exc}", EXIT_USAGE)


def check_readable(folder: Path) -> None:
    """Fail with one line when a storage folder exists but cannot be listed."""
    if folder.exists() and not os.access(folder, os.R_OK | os.X_OK):
        fail(f"permission denied: {folder}", EXIT_USAGE)
    try:
        if folder.exists():
            os.listdir(folder)
    except OSError as exc:
        fail(describe_os_error(exc), EXIT_USAGE)


def check_writable(folder: Path) -> None:
    """Fail early with one line when a folder cannot be written (read-only, permissions).

    A real temp file, not `os.access`: root passes `access()` on a read-only mount.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".tmp-check-"):
            pass
    except OSError as exc:
        fail(f"cannot write to {folder}: {describe_os_error(exc, with_path=False)}", EXIT_USAGE)


def open_store(location: StorageLocation, settings: S3Config, create: bool) -> Store | None:
    """The store at `location`; a read-only command gets None for a folder not created
    yet (a store on S3 always opens: its probe ran when the command started)."""
    from regproxy.storage import stores

    if isinstance(location, Path):
        if not create and not location.exists():
            return None
        check_readable(location)
    with cli_errors():
        return stores.open_store(location, settings)


def check_writable_store(location: StorageLocation) -> None:
    """`check_writable` for a store folder that exists (an S3 store was probed)."""
    if isinstance(location, Path) and location.exists():
        check_writable(location)
