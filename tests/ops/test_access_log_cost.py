"""The access log stays on by default, so it must be cheap and must not lose lines.

`serve` logs through `logs.LineWriter`: the middleware hands it a tuple per request, and
the writer makes and writes them in batches (the event loop to a regular file, a thread
to anything else). These tests pin what that must not change:
the lines are byte for byte what the text and JSON formatters make of the access record
(tests/ops/test_logs.py checks those), no line is lost when SIGTERM comes right after
the requests, and application records keep their place among access lines. What a line
costs is measured by tests/benchmarks/access_log.py (on against off, text and JSON), not
here: speed belongs in the benchmark, not in a test that a busy machine can fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import HttpVersion, HttpVersion11
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from regproxy.config import LogConfig
from regproxy.server import logs
from tests.support.access_log import AccessLog
from tests.support.inprocess import make_config, start_client
from tests.support.processes import RegproxyProcess

pytestmark = pytest.mark.timeout(120)

_text = st.text(max_size=40)
#: request URLs as aiohttp's parser makes them (encoded) and as a caller may (quoted by yarl)
URLS = st.one_of(
    st.builds(
        lambda path, query: URL.build(path="/" + path, query_string=query, encoded=True),
        st.text(max_size=600),
        st.text(max_size=600),
    ),
    st.builds(
        lambda path, query: URL.build(path="/" + path, query_string=query),
        st.text(max_size=600),
        st.text(max_size=600),
    ),
)
_field = st.one_of(st.none(), st.text(max_size=300))
ENTRIES = st.tuples(
    st.sampled_from(["127.0.0.1", "::1", "-"]),
    st.sampled_from(["GET", "HEAD", "PUT", "PATCH"]),
    URLS,
    st.sampled_from([HttpVersion11, HttpVersion(1, 1), HttpVersion(1, 0)]),
    st.integers(100, 599),
    st.integers(0, 2**40),
    st.integers(0, 2**40),
    _field,
    _field,
    st.floats(0, 10_000, allow_nan=False),
    st.one_of(st.none(), _text),
    st.one_of(st.none(), st.sampled_from(["HIT", "MISS", "STALE", "REVALIDATED"])),
    st.text(alphabet="0123456789abcdef", min_size=16, max_size=16),
    st.sampled_from(["/v2/", "/v2/{name}/manifests/{reference}", "(unmatched)"]),
    st.booleans(),
)
#: a time in ns whose sub-millisecond part cannot round up to the next millisecond (the
#: formatters take float seconds; a line's time may differ by that rounding, not its form)
TIMES = st.tuples(st.integers(0, 2**32), st.integers(0, 999)).map(
    lambda t: t[0] * 1_000_000_000 + t[1] * 1_000_000 + 123_000
)


def _record(time_ns: int, entry: logs.AccessEntry) -> logging.LogRecord:
    """The record the middleware logs for `entry` when no `LineWriter` takes it directly."""
    record = logs.access_log.makeRecord(
        logs.access_log.name,
        logging.INFO,
        "logs.py",
        1,
        logs._ACCESS_TEXT,
        logs.access_args(entry),
        None,
        extra={"access": logs.access_fields(entry)},
    )
    record.created = time_ns / 1e9
    record.msecs = (time_ns // 1_000_000) % 1000
    return record


#: one writer per format for every example: the parts a writer keeps of earlier lines
#: (`LineWriter._parts`) must never leak into a line they are not made of
_WRITERS = {json_lines: logs.LineWriter(io.StringIO(), json_lines) for json_lines in (False, True)}


@settings(max_examples=300, deadline=None)
@given(
    time_ns=TIMES,
    entry=ENTRIES,
    later=st.floats(0, 10_000, allow_nan=False),
    next_id=st.text(alphabet="0123456789abcdef", min_size=16, max_size=16),
)
def test_direct_lines_are_what_the_formatters_write(
    time_ns: int, entry: Any, later: float, next_id: str
) -> None:
    # the same request again with another duration and id: made from the kept parts
    again = (*entry[:9], later, *entry[10:12], next_id, *entry[13:])
    for each in (entry, again):
        record = _record(time_ns, each)
        text = _WRITERS[False].format_access(time_ns, each)
        assert text == logs.TextFormatter().format(record)
        line = _WRITERS[True].format_access(time_ns, each)
        assert line == logs.JsonFormatter().format(record)
        assert json.loads(line)["logger"] == "regproxy.access"


def test_the_parts_kept_of_lines_are_bounded() -> None:
    """A client asking for a new path every time (a scan) cannot grow the kept parts."""
    writer = logs.LineWriter(io.StringIO(), json_lines=True)
    for i in range(3 * writer.MAX_PARTS):
        entry = (*ENTRY[:2], URL.build(path=f"/v2/scan/{i}"), *ENTRY[3:])
        assert f'"path": "/v2/scan/{i}"' in writer.format_access(0, entry)
        assert len(writer._parts) <= writer.MAX_PARTS


@contextlib.contextmanager
def served_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """`configure_logging` as `serve` calls it, into a buffer instead of stderr; the root
    logger as it was afterwards. Used inside a test (pytest's own handlers on the root
    logger change between a test's setup, call and teardown)."""
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logs.access_log.disabled, logs._writer)
    logs.configure_logging(LogConfig())
    try:
        yield stream
    finally:
        writer = logs._writer
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        logs.access_log.disabled = saved[2]
        logs._writer = saved[3]
        logging.getLogger("aiohttp.access").disabled = False
        if writer is not None:
            writer.close()


async def test_requests_take_the_direct_path_and_read_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with served_logs(monkeypatch):
        queued, lines = await _requests(tmp_path)
    assert len(queued) == 4
    assert [line for line in lines if "regproxy.access" in line] == [
        logs.TextFormatter().format(_record(*item)) for item in queued
    ]
    # the application record sits where it was logged, among the access lines
    order = [("app" if "an application record" in line else "access") for line in lines]
    assert order == ["access", "access", "access", "app", "access"], lines
    (entry,) = AccessLog(_write(tmp_path / "one.log", lines[0])).entries()
    assert (entry.method, entry.target, entry.status) == ("GET", "/v2/", 200)


async def _requests(tmp_path: Path) -> tuple[list[tuple[int, Any]], list[str]]:
    """A few requests and an application record, through the writer `configure_logging`
    installed: what it was handed, and the lines it wrote."""
    writer = logs._writer
    assert writer is not None and logs._direct_writer() is writer
    queued: list[tuple[int, Any]] = []
    put = writer.put_finished

    def spy(time_ns: int, finished: Any) -> None:
        queued.append((time_ns, logs.access_entry(finished)))
        put(time_ns, finished)

    writer.put_finished = spy  # type: ignore[method-assign]
    client = await start_client(make_config(tmp_path))
    try:
        agent = {"User-Agent": 'odd "agent" \\ ünï'}
        assert (await client.get("/v2/", headers=agent)).status == 200
        assert (await client.head("/v2/x/blobs/sha256:" + "0" * 64)).status == 404
        resp = await client.get("/v2/nothing/tags/list?n=1&last=a%20b", headers={"Referer": ""})
        assert resp.status == 404
        logging.getLogger("regproxy.test").warning("an application record")
        assert (await client.get("/v2/_catalog")).status == 200
    finally:
        await client.close()
    writer.flush()
    assert isinstance(writer.stream, io.StringIO)
    return queued, writer.stream.getvalue().splitlines()


def _write(path: Path, line: str) -> Path:
    path.write_text(line + "\n")
    return path


async def test_an_added_handler_gets_access_records_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler besides the writer (pytest's caplog, an embedding program's) turns the
    direct path off: the access record is logged and reaches both."""
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    with served_logs(monkeypatch) as stream:
        logging.getLogger("regproxy").addHandler(keep)
        try:
            assert logs._direct_writer() is None
            client = await start_client(make_config(tmp_path))
            try:
                assert (await client.get("/v2/")).status == 200
            finally:
                await client.close()
        finally:
            logging.getLogger("regproxy").removeHandler(keep)
    assert [r.access["path"] for r in seen if r.name == "regproxy.access"] == ["/v2/"]
    assert sum("regproxy.access" in line for line in stream.getvalue().splitlines()) == 1


def test_writer_batches_in_order_and_flushes_on_close() -> None:
    stream = io.StringIO()
    writer = logs.LineWriter(stream)
    writer.BATCH_WINDOW = 0.01
    entry: logs.AccessEntry = (
        "127.0.0.1", "GET", URL("/v2/"), HttpVersion(1, 1), 200, 2, 0,
        None, "t", 0.001, None, None, "0" * 16, "/v2/", False,
    )  # fmt: skip
    for i in range(1000):
        writer.put_access(i * 1_000_000, entry)
    deadline = time.monotonic() + 10
    while stream.getvalue().count("\n") < 1000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.getvalue().count("\n") == 1000  # the thread wrote them, unasked
    assert writer._thread is not None and writer._thread.name == "regproxy-log"
    for _ in range(5):
        writer.put_access(0, entry)
    writer.close()  # before the batch window is over
    assert stream.getvalue().count("\n") == 1005
    assert writer._thread is None


ENTRY: logs.AccessEntry = (
    "127.0.0.1", "GET", URL("/v2/"), HttpVersion11, 200, 2, 0,
    None, "t", 0.001, None, None, "0" * 16, "/v2/", False,
)  # fmt: skip


async def test_the_event_loop_writes_a_regular_file_itself(tmp_path: Path) -> None:
    """To a regular file, a batch is written as soon as it is made, and the lines of a
    batch not yet full within `BATCH_WINDOW`, by the event loop: no thread."""
    path = tmp_path / "log"
    with open(path, "a") as stream:
        writer = logs.LineWriter(stream)
        writer.BATCH_WINDOW = 0.01
        for i in range(writer.BATCH_LINES):
            writer.put_access(i * 1_000_000, ENTRY)
        assert path.read_text().count("\n") == writer.BATCH_LINES  # written at once
        writer.put_access(time.time_ns(), ENTRY)  # one more: made by the loop's timer
        assert path.read_text().count("\n") == writer.BATCH_LINES
        await asyncio.sleep(0.1)
        assert path.read_text().count("\n") == writer.BATCH_LINES + 1
        assert writer._thread is None
        writer.close()


async def test_a_slow_regular_file_is_written_by_the_thread(tmp_path: Path) -> None:
    """A write to a regular file slower than `SLOW_WRITE` hands writing to the thread."""
    path = tmp_path / "log"
    with open(path, "a") as stream:
        writer = logs.LineWriter(stream)
        writer.BATCH_WINDOW = 0.01
        writer.SLOW_WRITE = 0.0  # every write is slow
        for i in range(writer.BATCH_LINES):
            writer.put_access(i * 1_000_000, ENTRY)
        assert path.read_text().count("\n") == writer.BATCH_LINES  # the first, at once
        for _ in range(writer.BATCH_LINES + 1):
            writer.put_access(time.time_ns(), ENTRY)
        assert path.read_text().count("\n") == writer.BATCH_LINES  # left to the thread
        deadline = time.monotonic() + 10
        while path.read_text().count("\n") < 2 * writer.BATCH_LINES + 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert writer._thread is not None
        writer.close()


def test_a_stalled_stream_holds_the_caller_instead_of_growing_without_bound() -> None:
    release = threading.Event()

    class Stalled(io.StringIO):
        def write(self, text: str) -> int:
            release.wait(10)
            return super().write(text)

    stream = Stalled()
    writer = logs.LineWriter(stream)
    writer.MAX_QUEUED = 100
    entry: logs.AccessEntry = (
        "127.0.0.1", "GET", URL("/v2/"), HttpVersion(1, 1), 200, 2, 0,
        None, "t", 0.001, None, None, "0" * 16, "/v2/", False,
    )  # fmt: skip
    done = threading.Event()

    def produce() -> None:
        for _ in range(1000):
            writer.put_access(0, entry)
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(0.3)
    assert not done.is_set()  # held: the stream takes nothing
    assert writer.queued() <= writer.MAX_QUEUED + writer.BATCH_LINES
    release.set()
    producer.join(10)
    writer.close()
    assert stream.getvalue().count("\n") == 1000


@pytest.mark.parametrize(("fmt", "workers"), [("text", 1), ("json", 1), ("text", 2)])
def test_sigterm_right_after_the_requests_loses_no_line(
    tmp_path: Path, fmt: str, workers: int
) -> None:
    """N requests, SIGTERM as soon as the last answer is read: N access lines, in order,
    and "stopped" after them; with several workers too (each writes its own queue)."""
    config = f'[server]\nworkers = {workers}\nshutdown_timeout = 0\n[log]\nformat = "{fmt}"\n'
    server = RegproxyProcess(tmp_path, extra_config=config)
    server.start()
    assert server.process is not None and server.port is not None
    count = 400
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        for i in range(count):
            conn.request("GET", "/v2/", headers={"X-Request-ID": f"sigterm-{i}"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
        conn.close()
    finally:
        assert server.process.stop() == 0  # SIGTERM
    lines = server.process.log_text(current_run_only=True).splitlines()
    ids = [
        line.split("sigterm-")[1].split('"')[0].split()[0] for line in lines if "sigterm-" in line
    ]
    assert ids == [str(i) for i in range(count)]
    last = lines[-1]
    assert (json.loads(last)["message"] if fmt == "json" else last).endswith("stopped")
