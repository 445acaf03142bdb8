"""Logs: one access line per request, request ids, text or JSON lines.

`access_middleware` (outermost) takes the request id from `X-Request-ID` or
makes one, and accounts for every request once: metrics and the access line.
A plain `web.Response` (manifests, errors, JSON) is accounted as soon as the
handler returns it: its status and size are final. A file or a stream is sent
by aiohttp after the middlewares return, in the same task, so it is accounted
when that task ends: duration and bytes then cover the whole body, and a
`FileResponse` that turned into a 304 or 404 on the way is counted as such.
aiohttp's own access logger is switched off by `serve` (`access_log=None`).

Text access line (the quoted part and what follows it is the combined log
format, so existing log tooling and the client tests keep reading it):

    127.0.0.1 "GET /v2/app/manifests/1 HTTP/1.1" 200 1234 "-" "skopeo/1.13" 0.002000s \
user=- cache=HIT id=4f2c9a1b00000001

JSON access line (`[log] format = "json"`): time, level, logger, message
(`GET /v2/app/manifests/1 200`) and the fields method, path, query, route,
status, bytes, bytes_in, duration, user, cache, request_id, remote, user_agent
(and aborted: true when the client went away). Application records carry the
request id of the request they were logged in (`request_id` in JSON,
` [id=…]` in text).

Cost: the access log is on by default, so its line is made without the logging
machinery when `serve`'s `LineWriter` is the only handler it would reach: the
middleware gathers the values (`AccessEntry`), and the writer makes them, a batch at a
time, into the bytes the formatters would write (what repeats from one request to the
next is made once and kept), and writes each batch with one write (see `LineWriter`).
With another handler in the way (pytest's caplog, a program embedding the app) the
record is logged as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import itertools
import json
import logging
import os
import re
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from select import PIPE_BUF
from typing import IO, TYPE_CHECKING, Any

from aiohttp import HttpVersion, HttpVersion11, hdrs, web

from regproxy import aiohttp_adapter
from regproxy.config import LogConfig
from regproxy.server.keys import USER
from regproxy.server.metrics import METRICS, Handler, RequestMetrics, route_of

if TYPE_CHECKING:
    from yarl import URL  # aiohttp's, as `request.rel_url`

REQUEST_ID_HEADER = "X-Request-ID"
CACHE_STATUS_HEADER = "X-Cache-Status"
#: an incoming id is kept when it looks like one (bounded, printable, no spaces or quotes)
_VALID_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
#: the request id of the request being handled, for application log records
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "regproxy_request_id", default=None
)

access_log = logging.getLogger("regproxy.access")
#: the longest path (and query) and header field an access line carries; longer ones are cut
MAX_PATH = 512
MAX_FIELD = 256
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_ACCESS_TEXT = '%s "%s %s HTTP/%d.%d" %d %d "%s" "%s" %.6fs user=%s cache=%s id=%s%s'
#: the request id in the request's dict (set for every request by the middleware)
REQUEST_ID_KEY = web.RequestKey("request_id", str)


_ID_PREFIX = os.urandom(4).hex()  # per process: ids stay unique across restarts and replicas
_id_numbers = itertools.count(1)


def new_request_id() -> str:
    """16 hex digits: a random per-process prefix and a counter (cheaper than a uuid)."""
    return f"{_ID_PREFIX}{next(_id_numbers):08x}"


# ---- the middleware ---------------------------------------------------------------------


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    rid = request.headers.get(REQUEST_ID_HEADER)
    if rid is None or _VALID_ID.fullmatch(rid) is None:
        rid = new_request_id()
    request[REQUEST_ID_KEY] = rid
    request[USER] = None  # until auth knows better (a missing key is slow to look up)
    # each request runs in its own task (a copy of the context): nothing leaks to the next
    request_id.set(rid)
    metrics = request.app.get(METRICS)
    counters = metrics.requests if metrics is not None else None
    if counters is not None:
        counters.in_flight += 1
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # aiohttp renders it after us
        _Pending(request, started, rid, counters, None, exc.status).wait()
        raise
    except BaseException:
        _Pending(request, started, rid, counters, None, 500).wait()
        raise
    if type(response) is web.Response and not response.prepared:
        # the fast path (manifests, errors, JSON): the whole body is in memory, status and
        # size are final, and aiohttp only hands it to the transport after us
        _account(request, response, response.status, started, rid, counters, False)
    else:
        # a file or a stream: aiohttp sends it after the middlewares return, in this same
        # task (sendfile, a FileResponse may still turn into 304/404): account when done
        _Pending(request, started, rid, counters, response, response.status).wait()
    return response


class _Pending:
    """A request whose answer is still being sent: accounted when its task ends."""

    __slots__ = ("counters", "request", "response", "rid", "started", "status")

    def __init__(
        self,
        request: web.Request,
        started: float,
        rid: str,
        counters: RequestMetrics | None,
        response: web.StreamResponse | None,
        status: int,
    ) -> None:
        self.request = request
        self.started = started
        self.rid = rid
        self.counters = counters
        self.response = response
        self.status = status

    def wait(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(self.done)
        else:  # pragma: no cover - handlers always run in a task
            self.done(None)

    def done(self, task: asyncio.Task[Any] | None) -> None:
        response, aborted = self.response, False
        if task is None or task.cancelled() or task.exception() is not None:
            aborted = True  # the connection broke while sending, or the client left
        else:
            sent_response, aborted = aiohttp_adapter.request_task_outcome(task)
            if sent_response is not None:
                response = sent_response
        status = response.status if response is not None else self.status
        if aborted and response is None:
            status = 499  # the client went away before any answer
        _account(self.request, response, status, self.started, self.rid, self.counters, aborted)


def _account(
    request: web.Request,
    response: web.StreamResponse | None,
    status: int,
    started: float,
    rid: str,
    counters: RequestMetrics | None,
    aborted: bool,
) -> None:
    """Feed the request metrics and write the access line."""
    duration = time.perf_counter() - started
    sent = _body_bytes(request, response, aborted)
    received = aiohttp_adapter.body_bytes_received(request)
    route = route_of(request)
    if counters is not None:
        counters.in_flight -= 1
        counters.observe(request.method, route, status, duration, received, sent)
    if access_log.isEnabledFor(logging.INFO):
        _log_access(request, response, route, status, sent, received, duration, rid, aborted)


def _body_bytes(request: web.Request, response: web.StreamResponse | None, aborted: bool) -> int:
    """Response body bytes: the announced length of a complete answer (sendfile bypasses
    aiohttp's byte counter), else what the writer counted (headers included)."""
    if response is None or request.method == "HEAD":
        return 0
    length = response.content_length
    if length is not None and not aborted:
        return length
    return response.body_length


def _log_access(
    request: web.Request,
    response: web.StreamResponse | None,
    route: str,
    status: int,
    sent: int,
    received: int,
    duration: float,
    rid: str,
    aborted: bool,
) -> None:
    finished: FinishedRequest = (
        request, response, route, status, sent, received, duration, rid, aborted
    )  # fmt: skip
    writer = _direct_writer()
    if writer is not None:
        writer.put_finished(time.time_ns(), finished)  # its values are read with its batch
    else:
        entry = access_entry(finished)
        access_log.info(_ACCESS_TEXT, *access_args(entry), extra={"access": access_fields(entry)})


#: a request done, as the middleware hands it to the writer: request, response (None: no
#: answer), route, status, bytes sent, bytes received, duration, request id, aborted
FinishedRequest = tuple[
    web.Request, web.StreamResponse | None, str, int, int, int, float, str, bool
]


def access_entry(finished: FinishedRequest) -> AccessEntry:
    """The values of a finished request's access line. Read when its batch is made, not
    as the request ends: what it reads (the peer's address, the URL, headers, the user)
    no longer changes, and a batch reads them while the code is in the CPU's caches."""
    request, response, route, status, sent, received, duration, rid, aborted = finished
    headers = request.headers
    return (
        request.remote or "-",
        request.method,
        request.rel_url,
        request.version,
        status,
        sent,
        received,
        headers.get(hdrs.REFERER),
        headers.get(hdrs.USER_AGENT),
        duration,
        request[USER],
        response.headers.get(CACHE_STATUS_HEADER) if response is not None else None,
        rid,
        route,
        aborted,
    )


#: what the middleware gathers for an access line, formatted later (`access_args` for
#: text, `access_fields` for JSON): remote, method, URL (path and query: made into text
#: only when the line is, `LineWriter`), HTTP version, status, bytes sent, bytes
#: received, Referer, User-Agent, duration, user, cache status, request id, route, aborted
AccessEntry = tuple[
    str,
    str,
    "URL",
    HttpVersion,
    int,
    int,
    int,
    str | None,
    str | None,
    float,
    str | None,
    str | None,
    str,
    str,
    bool,
]


def access_args(entry: AccessEntry) -> tuple[Any, ...]:
    """The arguments of `_ACCESS_TEXT` (the text line's message)."""
    (remote, method, url, version, status, sent, _, referer, user_agent,
     duration, user, cache, rid, _, aborted) = entry  # fmt: skip
    return (
        remote,
        method,
        cut(str(url), MAX_PATH),  # the request's path_qs
        version.major,
        version.minor,
        status,
        sent,
        cut(referer, MAX_FIELD) if referer is not None else "-",
        cut(user_agent, MAX_FIELD) if user_agent else "-",
        duration,
        user or "-",
        cache or "-",
        rid,
        " aborted" if aborted else "",
    )


def access_fields(entry: AccessEntry) -> dict[str, Any]:
    """The fields of a JSON access line, in their order."""
    (remote, method, url, _, status, sent, received, _, user_agent,
     duration, user, cache, rid, route, aborted) = entry  # fmt: skip
    fields = {
        "method": method,
        "path": cut(url.path, MAX_PATH),
        "query": cut(url.query_string, MAX_PATH) or None,
        "route": route,
        "status": status,
        "bytes": sent,
        "bytes_in": received,
        "duration": round(duration, 6),
        "user": user,
        "cache": cache,
        "request_id": rid,
        "remote": remote,
        "user_agent": cut(user_agent, MAX_FIELD) if user_agent is not None else None,
    }
    if aborted:
        fields["aborted"] = True
    return fields


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: every answer carries its request id (streamed ones too)."""
    rid = request.get(REQUEST_ID_KEY)
    if rid is not None:
        response.headers[REQUEST_ID_HEADER] = rid


def setup(app: web.Application) -> None:
    """The request id header on every response (the middleware is in `create_app`'s list),
    and aiohttp's reports of malformed requests cut down to one short line."""
    app.on_response_prepare.append(add_request_id)
    server_log = aiohttp_adapter.server_logger()
    if not any(isinstance(f, MalformedRequestLine) for f in server_log.filters):
        server_log.addFilter(MalformedRequestLine())


class MalformedRequestLine(logging.Filter):
    """aiohttp logs every request it cannot parse (a bad request line, header or chunk)
    with a full traceback at ERROR: a few bytes from anybody would write kilobytes to the
    log. Those are the client's errors, answered 400: one short INFO line says enough. So
    is a client that went away mid-request (a push cancelled while its body was sent).
    Anything else aiohttp reports (a real error in the server) keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        malformed = aiohttp_adapter.malformed_request(record)
        if malformed is not None:
            remote, reason = malformed
            _one_info_line(record, "malformed request from %s: %s", remote, reason)
            return True
        gone = aiohttp_adapter.client_gone(record)
        if gone is not None:
            exc = record.exc_info[1] if record.exc_info else None
            _one_info_line(record, "client %s went away mid-request: %s", gone, str(exc))
        return True


def _one_info_line(record: logging.LogRecord, message: str, remote: str, reason: str) -> None:
    record.msg = message
    record.args = (remote, cut(reason.replace("\n", " "), 200))
    record.exc_info = None
    record.exc_text = None
    record.levelno, record.levelname = logging.INFO, "INFO"


def cut(text: str, limit: int) -> str:
    """`text` of at most `limit` characters, marked when cut (long fields cost log space)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- formatting -------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "access", None)
        if fields is not None:
            # the fields say it all: a short message instead of the combined-format line
            entry["message"] = f"{fields['method']} {fields['path']} {fields['status']}"
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
            rid = request_id.get()
            if rid is not None:
                entry["request_id"] = rid
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`, plus ` [id=…]` on application records logged inside a request."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not hasattr(record, "access"):
            rid = request_id.get()
            if rid is not None:
                text += f" [id={rid}]"
        return text


#: an access line waiting in `LineWriter`'s queue: `(time_ns, entry)` from `put_access`,
#: `(time_ns, finished, True)` from `put_finished`
_QueuedAccess = tuple[int, AccessEntry] | tuple[int, FinishedRequest, bool]


class LineWriter(logging.Handler):
    """The handler `serve` logs through: lines to a stream (stderr), access lines made and
    written in batches.

    Why: logged as a record per request (a `LogRecord`, the formatter, a write and a
    flush under the logging lock), the access log cost up to half of small-request
    throughput. The middleware instead hands this writer the request's values
    (`put_access`), which only queues them. Every `BATCH_LINES` of them the caller makes
    their lines in one go (`format_access`: one f-string each from parts kept of earlier
    lines, the same bytes the formatters make of an access record), and the lines still
    queued are made `BATCH_WINDOW` after the first of them. Measured in the server (CPU
    time of the event loop per request, GET /v2/ under wrk), a line made as its request
    ended cost about twice as much as one made in a batch: by the next request, the code and data
    it needs have left the CPU's caches. Made by a thread, a line cost 3-4 µs of that
    thread's time (it reads each value from the other core), so a thread only writes.

    Who writes: to a regular file (a log file, the benchmarks), the event loop writes each
    batch at once, as a `StreamHandler` would: the page cache takes it in microseconds,
    where the thread cost about 1 µs a line (its wake-ups and GIL hand-overs, and
    reading the text from the other core). A write slower than `SLOW_WRITE` (a busy
    disk, a network file system) hands writing to the thread until one is fast again.
    Anything else (a pipe, a socket, a terminal: journald, docker) can stall when its
    reader does, so the thread writes to it every `BATCH_WINDOW`, outside the GIL.

    Nothing is lost or reordered: application records are formatted and written at once
    in the logging thread (as a `StreamHandler` does), after the access lines queued
    before them; `flush()` and `close()` (`logging.shutdown` at exit, so after SIGTERM)
    write whatever is queued. Past `MAX_QUEUED` waiting lines (a stderr nobody reads)
    the caller writes them itself, blocking as a `StreamHandler` would. A crash
    (SIGKILL) loses at most the last `BATCH_WINDOW` of access lines.

    Each write holds whole lines and at most `PIPE_BUF` bytes (or one longer line): the
    kernel writes it in one piece to a pipe, so the lines of several processes sharing
    stderr (`[server] workers`) never interleave mid-line, as with a write per line.
    """

    #: how long access lines wait at most to be written
    BATCH_WINDOW = 0.05
    #: access lines the caller lets gather before it makes them
    BATCH_LINES = 32
    #: access lines waiting at most; beyond, `put_access` writes them in the caller
    MAX_QUEUED = 20_000
    #: a write to a regular file that took longer hands writing to the thread
    SLOW_WRITE = 0.005
    #: the made parts of at most so many different access lines are kept (`format_access`)
    MAX_PARTS = 256

    def __init__(self, stream: IO[str], json_lines: bool = False) -> None:
        super().__init__()
        self.stream = stream
        self.json_lines = json_lines
        self.setFormatter(JsonFormatter() if json_lines else TextFormatter())
        #: in order: access lines still to make, `(time_ns, entry)`, and formatted records
        self._queue: deque[_QueuedAccess | str] = deque()
        #: lines made but not written, in order: pieces of text (whole lines)
        self._made: deque[str] = deque()
        self._make_lock = threading.Lock()  # `_queue`'s order is kept in what is made
        self._write_lock = threading.Lock()  # one writer of the stream at a time
        #: when the lines queued now will have been written (`time.time_ns`), 0: unplanned
        self._due = 0
        self._inline = False  # the caller may write (`_write_timed`)
        self._woken = False  # the thread was told there is work (or is at it)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        # the time stamp of the current second, formatted once per second
        self._stamp: tuple[int, str] = (-1, "")
        # what the access lines of the current millisecond start with (`_format_head`)
        self._head: tuple[int, str] = (-1, "")
        #: what access lines are made of, but their time, duration and request id, by
        #: the values they are made from (`format_access`; used under `_make_lock`)
        self._parts: dict[tuple[Any, ...], tuple[str, str, str]] = {}
        self._fd: int | bool | None = False  # False: not looked up yet (`_fileno`)
        self._regular = False

    # -- producers ------------------------------------------------------------------------

    def put_access(self, time_ns: int, entry: AccessEntry) -> None:
        """Queue the access line of `entry`: made with the next `BATCH_LINES` or within
        `BATCH_WINDOW`, whichever comes first."""
        self._put(time_ns, (time_ns, entry))

    def put_finished(self, time_ns: int, finished: FinishedRequest) -> None:
        """Queue the access line of a finished request, whose values are read (with
        `access_entry`) when its line is made."""
        self._put(time_ns, (time_ns, finished, True))

    def _put(self, time_ns: int, item: _QueuedAccess) -> None:
        queue = self._queue
        queue.append(item)
        if time_ns > self._due:
            self._plan(time_ns)
        if len(queue) >= self.BATCH_LINES:
            self._make()
            if len(self._made) * self.BATCH_LINES > self.MAX_QUEUED:
                self.flush()  # the stream does not keep up: wait for it, as a write would

    def emit(self, record: logging.LogRecord) -> None:
        """Any other record: formatted here (its request id is this context's), written at
        once after the lines queued before it."""
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._queue.append(line)
        self.flush()

    def queued(self) -> int:
        """Lines waiting to be written, made or not."""
        return len(self._queue) + sum(piece.count("\n") for piece in list(self._made))

    # -- making lines ---------------------------------------------------------------------

    def _plan(self, time_ns: int) -> None:
        """See that the lines queued now are made and written within `BATCH_WINDOW`: by a
        timer of the caller's event loop when it may write them, else by the thread."""
        self._due = time_ns + int(2e9 * self.BATCH_WINDOW)  # then planned again
        self._fileno()  # looked up once: sets `_inline` for a regular file
        if self._inline:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                pass
            else:
                loop.call_later(self.BATCH_WINDOW, self._make_due)
                return
        self._wake_thread()

    def _make_due(self) -> None:
        """The event loop's timer: make (and write) the lines still queued."""
        self._due = 0
        self._make()
        if self._made:  # not written here: the stream turned slow, or another was at it
            self._wake_thread()

    def _make(self) -> None:
        """Make the queued lines into one piece of text, then write it at once when the
        caller may and nothing made before waits, else leave it to the thread."""
        with self._make_lock:
            queue = self._queue
            if not queue:
                return
            # popleft, not a swap of the deque: a producer may hold the old one
            items = [queue.popleft() for _ in range(len(queue))]
            lines: list[str] = []
            append = lines.append
            format_access = self.format_access
            for item in items:
                if isinstance(item, str):
                    append(item)
                    continue
                try:
                    if len(item) == 2:
                        append(format_access(*item))
                    else:
                        append(format_access(item[0], access_entry(item[1])))
                except Exception as exc:  # a bug here must not cost the request or the log
                    append(f"access line could not be formatted: {exc!r} ({item!r})")
            append("")
            text = "\n".join(lines)
            if self._inline and not self._made and self._write_lock.acquire(blocking=False):
                try:
                    self._write_timed(text)
                finally:
                    self._write_lock.release()
            else:
                self._made.append(text)

    # -- writing --------------------------------------------------------------------------

    def _wake_thread(self) -> None:
        if not self._woken:
            self._woken = True
            if self._thread is None:
                self._start()
            self._wake.set()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="regproxy-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait()
            time.sleep(self.BATCH_WINDOW)  # let a batch gather
            self._wake.clear()
            self._woken = False  # lines queued from here on wake us again
            self._due = 0
            self.flush()

    def flush(self) -> None:
        """Make and write every queued line now (in the calling thread)."""
        self._make()
        with self._write_lock:
            made = self._made
            while made:
                self._write_timed("".join([made.popleft() for _ in range(len(made))]))

    def _write_timed(self, text: str) -> None:
        """`_write`, holding `_write_lock`; whether the next write may be the caller's
        (`_inline`): a regular file that took this one in under `SLOW_WRITE`."""
        started = time.perf_counter()
        # stderr is gone (closed, broken pipe): nowhere to say so either
        with contextlib.suppress(OSError, ValueError):
            self._write(text)
        self._inline = self._regular and time.perf_counter() - started < self.SLOW_WRITE

    def _write(self, text: str) -> None:
        """Write whole lines: to a regular file in one write (appends are atomic there);
        to anything else (a pipe, a socket, a terminal) in writes of at most `PIPE_BUF`
        bytes each (or one longer line), which a pipe takes in one piece, so the lines of
        several processes sharing it never mix.

        Why few, large writes: the thread must take the GIL back after every write, and
        while the event loop is busy that can wait for the interpreter's switch interval
        (5 ms). Written a `PIPE_BUF` at a time, line by line in Python, the thread fell
        behind at ~10,000 requests/s (py-spy, `tests/benchmarks/access_log.py --profile`):
        the queue reached `MAX_QUEUED` and the event loop wrote the lines itself."""
        fd = self._fileno()
        if fd is None:  # a stream without a descriptor (tests): as it was
            self.stream.write(text)
            self.stream.flush()
            return
        self.stream.flush()  # whatever was written to the stream itself goes first
        encoding = getattr(self.stream, "encoding", None) or "utf-8"
        raw = text.encode(encoding, getattr(self.stream, "errors", None) or "backslashreplace")
        view = memoryview(raw)
        limit = len(raw) if self._regular else PIPE_BUF
        start, end = 0, len(raw)
        while start < end:
            stop = end
            if end - start > limit:
                stop = raw.rfind(b"\n", start, start + limit) + 1
                if stop <= start:  # one line longer than the limit: on its own
                    stop = raw.find(b"\n", start + limit) + 1 or end
            while start < stop:
                start += os.write(fd, view[start:stop])

    def _fileno(self) -> int | None:
        """The stream's descriptor (None: it has none); `_regular` tells whether it is a
        regular file (which the caller may write to: `_inline`). Looked up once."""
        if self._fd is False:
            fd: int | None = None
            with contextlib.suppress(AttributeError, OSError, ValueError, io.UnsupportedOperation):
                fd = self.stream.fileno()
                self._regular = self._inline = stat.S_ISREG(os.fstat(fd).st_mode)
            self._fd = fd
        return self._fd

    def close(self) -> None:
        self.flush()
        self._closed = True
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)
        super().close()

    # -- formatting -----------------------------------------------------------------------

    def format_access(self, time_ns: int, entry: AccessEntry) -> str:
        """An access line, byte for byte what this handler's formatter makes of the record
        `_log_access` logs for `entry` at `time_ns` (tests/ops/test_access_log_cost.py).

        Only the time, the duration and the request id change from one request to the
        next of a client (a CI fleet polls the same tags, a pull asks for the same
        paths): the rest of the line is made once and kept (`_parts`, `MAX_PARTS`)."""
        millisecond = time_ns // 1_000_000
        made_for, head = self._head
        if millisecond != made_for:
            head = self._format_head(millisecond)
        (remote, method, url, version, status, sent, received, referer, user_agent,
         duration, user, cache, rid, route, aborted) = entry  # fmt: skip
        key = (remote, method, url, version, status, sent, received, referer, user_agent,
               user, cache, route, aborted)  # fmt: skip
        parts = self._parts.get(key)
        if parts is None:
            parts = self._line_parts(entry)
            if len(self._parts) >= self.MAX_PARTS:
                self._parts.clear()  # many different requests: start again
            self._parts[key] = parts
        before, after_duration, after_id = parts
        if self.json_lines:
            return f"{head}{before}{round(duration, 6)!r}{after_duration}{_json_str(rid)}{after_id}"
        return f"{head}{before}{duration:.6f}{after_duration}{rid}{after_id}"

    def _line_parts(self, entry: AccessEntry) -> tuple[str, str, str]:
        """An access line without its head (`_format_head`), in three parts: what comes
        before the duration, between it and the request id, and after the id."""
        (remote, method, url, version, status, sent, received, referer, user_agent,
         _, user, cache, _, route, aborted) = entry  # fmt: skip
        if user_agent is not None and len(user_agent) > MAX_FIELD:
            user_agent = cut(user_agent, MAX_FIELD)
        if not self.json_lines:  # `_ACCESS_TEXT % access_args(entry)`, spelt out
            path_qs = cut(str(url), MAX_PATH)
            referer = "-" if referer is None else cut(referer, MAX_FIELD)
            http = _HTTP11 if version is HttpVersion11 else _http_version(version)
            return (
                f'{remote} "{method} {path_qs} {http}" {status} {sent} '
                f'"{referer}" "{user_agent or "-"}" ',
                f"s user={user or '-'} cache={cache or '-'} id=",
                " aborted" if aborted else "",
            )
        path, query = cut(url.path, MAX_PATH), url.query_string
        j = _json_str
        return (
            f"{j(f'{method} {path} {status}')}, "
            f'"method": {j(method)}, "path": {j(path)}, '
            f'"query": {j(cut(query, MAX_PATH)) if query else "null"}, "route": {j(route)}, '
            f'"status": {status}, "bytes": {sent}, "bytes_in": {received}, "duration": ',
            f', "user": {"null" if user is None else j(user)}, '
            f'"cache": {"null" if cache is None else j(cache)}, "request_id": ',
            f', "remote": {j(remote)}, '
            f'"user_agent": {"null" if user_agent is None else j(user_agent)}'
            f"{_ABORTED_JSON if aborted else ''}}}",
        )

    def _format_head(self, millisecond: int) -> str:
        """What access lines of `millisecond` start with (up to the message), kept."""
        second, millis = divmod(millisecond, 1000)
        stamped, stamp = self._stamp
        if second != stamped:
            stamp = self._format_second(second)
            self._stamp = (second, stamp)
        if self.json_lines:
            head = (
                f'{{"time": "{stamp}.{millis:03d}+00:00", "level": "info", '
                f'"logger": "regproxy.access", "message": '
            )
        else:
            head = f"{stamp},{millis:03d} INFO regproxy.access: "
        self._head = (millisecond, head)
        return head

    def _format_second(self, second: int) -> str:
        if self.json_lines:  # JsonFormatter's time, without its milliseconds
            return datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        formatter = self.formatter or TextFormatter()
        return time.strftime(formatter.default_time_format, formatter.converter(second))


#: `json.dumps(..., ensure_ascii=False)` of a string
_json_str: Callable[[str], str] = json.encoder.encode_basestring


_ABORTED_JSON = ', "aborted": true'
_HTTP11 = "HTTP/1.1"


def _http_version(version: HttpVersion) -> str:
    return f"HTTP/{version.major}.{version.minor}"


_app_log = logging.getLogger("regproxy")
#: the writer `configure_logging` installed (None: records go through logging as usual)
_writer: LineWriter | None = None


def _direct_writer() -> LineWriter | None:
    """The `LineWriter` to hand access lines to directly, when it is the only place the
    access record would go: the root's one handler, nothing added on the way (a test's
    handler, pytest's caplog) and no filter. Otherwise None: log a record.

    Asked for every request: one expression of attribute tests, no loop or call."""
    writer = _writer
    if writer is None:
        return None
    root = logging.root
    handlers = root.handlers
    if (
        len(handlers) == 1
        and handlers[0] is writer
        and writer.level <= logging.INFO
        and not (writer.filters or root.filters)
        and not (access_log.handlers or access_log.filters or _app_log.handlers)
        and not _app_log.filters
        and access_log.propagate
        and _app_log.propagate
    ):
        return writer
    return None


def configure_logging(config: LogConfig, level: str | None = None) -> None:
    """Send every record to stderr (journald, docker logs) as text or JSON lines.

    `level` (the command line's `--log-level`) wins over `[log] level`.
    """
    global _writer
    handler = LineWriter(sys.stderr, json_lines=config.format == "json")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, LineWriter):
            old.close()
    root.addHandler(handler)
    _writer = handler
    root.setLevel(getattr(logging, (level or config.level).upper()))
    # the access log can be switched off on its own (it is one line per request)
    access_log.disabled = not config.access
    # aiohttp's access logger is replaced by ours; its other loggers stay
    aiohttp_adapter.access_logger().disabled = True
