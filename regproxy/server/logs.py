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
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import logging
import os
import re
import sys
import time
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from regproxy import aiohttp_adapter
from regproxy.config import LogConfig
from regproxy.server.keys import USER
from regproxy.server.metrics import METRICS, Handler, RequestMetrics, route_of

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
    headers = request.headers
    cache = response.headers.get(CACHE_STATUS_HEADER) if response is not None else None
    user = request.get(USER)
    remote = request.remote or "-"
    version = request.version
    user_agent = headers.get("User-Agent")
    if user_agent is not None:
        user_agent = cut(user_agent, MAX_FIELD)
    access_log.info(
        _ACCESS_TEXT,
        remote,
        request.method,
        cut(request.path_qs, MAX_PATH),
        version.major,
        version.minor,
        status,
        sent,
        cut(headers.get("Referer", "-"), MAX_FIELD),
        user_agent or "-",
        duration,
        user or "-",
        cache or "-",
        rid,
        " aborted" if aborted else "",
        extra={
            "access": {
                "method": request.method,
                "path": cut(request.path, MAX_PATH),
                "query": cut(request.query_string, MAX_PATH) or None,
                "route": route,
                "status": status,
                "bytes": sent,
                "bytes_in": received,
                "duration": round(duration, 6),
                "user": user,
                "cache": cache,
                "request_id": rid,
                "remote": remote,
                "user_agent": user_agent,
                **({"aborted": True} if aborted else {}),
            }
        },
    )


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
    log. Those are the client's errors, answered 400: one short INFO line says enough.
    Anything else aiohttp reports (a real error in the server) keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        malformed = aiohttp_adapter.malformed_request(record)
        if malformed is not None:
            remote, reason = malformed
            record.msg = "malformed request from %s: %s"
            record.args = (remote, cut(reason.replace("\n", " "), 200))
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


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


def configure_logging(config: LogConfig, level: str | None = None) -> None:
    """Send every record to stderr (journald, docker logs) as text or JSON lines.

    `level` (the command line's `--log-level`) wins over `[log] level`.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, (level or config.level).upper()))
    # the access log can be switched off on its own (it is one line per request)
    access_log.disabled = not config.access
    # aiohttp's access logger is replaced by ours; its other loggers stay
    aiohttp_adapter.access_logger().disabled = True
