"""Every use of aiohttp beyond its documented API, in one place.

Why: regproxy needs a few things aiohttp does not offer publicly (a deadline for the
first request head, bodies read past its parser, the outcome of a request's task, a short
line for malformed requests). Each one here names, under "Relies on", the internal it
uses and the aiohttp versions it was checked with; `tests/test_aiohttp_adapter.py`
checks each assumption on its own, so an aiohttp upgrade that breaks one fails there,
naming the function to fix, before it shows up as a subtle fault elsewhere. Nothing else
in regproxy is to touch an aiohttp internal.

A leaf: it imports aiohttp and `regproxy.sockbody` only, so the proxy and the server
both use it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from typing import IO, Any, cast

from aiohttp import ClientResponse, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server
from multidict import CIMultiDict, CIMultiDictProxy

from regproxy.sockbody import TakenBody, plain_socket, take_over

#: the aiohttp releases these assumptions were last checked against (by the test module)
CHECKED_WITH = "3.14.5"
#: aiohttp's logger for errors while handling requests (malformed ones included)
SERVER_LOGGER = "aiohttp.server"
#: aiohttp's own access logger (regproxy writes its own access lines)
ACCESS_LOGGER = "aiohttp.access"


# ---- serving: handler arguments and the first-request deadline --------------------------


def request_handler_args(*, max_field_size: int, auto_decompress: bool) -> dict[str, Any]:
    """`web.Application(handler_args=...)`: the longest header field, and whether request
    bodies with a content coding are inflated.

    Relies on: `handler_args` being passed as keywords to `web_protocol.RequestHandler`,
    which takes `max_field_size` and `auto_decompress` (checked with 3.14.x). aiohttp's
    own `Server` drops unknown keywords with a warning; `DeadlineRunner` does not, so a
    renamed one would fail every connection."""
    return {"max_field_size": max_field_size, "auto_decompress": auto_decompress}


class _DeadlineHandler(RequestHandler):
    """A request handler that closes its connection when no request head has arrived
    `header_timeout` seconds after it was made."""

    header_timeout = 30.0
    _guard: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._guard = asyncio.get_running_loop().call_later(self.header_timeout, self._expire)

    def _expire(self) -> None:
        if self._request_count == 0 and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._guard is not None:
            self._guard.cancel()  # else the timer keeps the handler alive until it fires
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp could not parse gets its 4xx with no body: aiohttp's text
        echoes part of the request, and it cannot know whether the request was a HEAD
        (whose answer must have no body, or the client reads garbage as the next answer).

        Relies on (checked with 3.14.x): `RequestHandler.handle_error` logging, closing
        the connection and returning a `web.Response` whose body may be replaced."""
        response = super().handle_error(request, status, exc, message)
        if status < 500 and isinstance(response, web.Response):
            response.body = b""
        return response


class _DeadlineServer(Server):
    header_timeout: Callable[[], float]

    def __call__(self) -> RequestHandler:
        handler = _DeadlineHandler(self, loop=self._loop, **self._kwargs)
        handler.header_timeout = self.header_timeout()
        return handler


class DeadlineRunner(web.AppRunner):
    """An `AppRunner` that closes connections which have not sent a whole request head
    within `header_timeout()` seconds of connecting (slow-loris clients). aiohttp's
    keep-alive timer also runs from the connection's start, but only acts on a handler
    waiting between requests, and it is one timeout for two jobs.

    Relies on (checked with 3.14.x): `AppRunner._make_server` returning the
    `web_server.Server` that is the protocol factory; swapping that instance's class for
    a subclass keeping its state; `Server._loop` and `Server._kwargs` building each
    `RequestHandler(server, loop=..., **kwargs)`; `RequestHandler._request_count`
    counting the request heads parsed on the connection (0 until the first is whole);
    `RequestHandler.transport` None once the connection is closed."""

    def __init__(
        self, app: web.Application, *, header_timeout: Callable[[], float], **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _DeadlineServer  # same state, handlers with a deadline
        guarded = cast(_DeadlineServer, server)
        guarded.header_timeout = self._header_timeout
        guarded.request_factory = functools.partial(_plain_expect, guarded.request_factory)
        return guarded


def _plain_expect(make_request: Callable[..., web.BaseRequest], message: Any, *args: Any) -> Any:
    """Requests whose `Expect` is not `100-continue` are handled as if it were absent.

    RFC 9110 lets a server ignore an expectation it does not know; aiohttp answers one
    with a plain-text 417 before any middleware (so without the OCI error body), on
    unknown paths too. `100-continue`, also in a list or another case, stays as aiohttp
    answers it.

    Relies on (checked with 3.14.x): `Server.request_factory(message, payload, protocol,
    writer, task)` making each request from the parser's `RawRequestMessage`, a named
    tuple whose `headers` is a `CIMultiDictProxy`."""
    expect = message.headers.get("Expect")
    if expect is not None and expect.strip().lower() != "100-continue":
        headers = CIMultiDict(message.headers)
        del headers["Expect"]
        if "100-continue" in expect.lower():
            headers["Expect"] = "100-continue"
        message = message._replace(headers=CIMultiDictProxy(headers))
    return make_request(message, *args)


# ---- bodies read past aiohttp ------------------------------------------------------------


def take_request_body(request: web.BaseRequest, length: int) -> TakenBody | None:
    """`sockbody.take_over` of a request body of `length` bytes, leaving aiohttp's side
    of the connection so that it neither waits for nor reads what the pump reads; None
    when the body cannot be taken. The connection cannot carry another request after it.

    Relies on (checked with 3.14.x): `request.content` (a `StreamReader`) whose
    `read_nowait()` hands over what the parser buffered (re-feeding data it held while
    paused) and whose `total_bytes` counts every body byte fed to it; `request.protocol`
    being the `RequestHandler`, whose `close()` takes no further pipelined request;
    `StreamReader.feed_eof()` ending the body so aiohttp does not spend `lingering_time`
    draining it after the handler, and resuming the transport as it does (hence paused
    again here)."""
    taken = take_over(request.content, request.transport, length)
    if taken is not None and taken.remaining:
        request.protocol.close()
        request.content.feed_eof()
        assert request.transport is not None  # take_over needed it
        request.transport.pause_reading()
    return taken


def take_response_body(resp: ClientResponse, length: int) -> TakenBody | None:
    """`sockbody.take_over` of a client response body of `length` bytes (over TLS too),
    or None. The caller then `close()`s the response: its connection cannot go back to
    the pool.

    Relies on (checked with 3.14.x): `resp.connection.transport` being the socket's
    asyncio transport; `resp.content` as in `take_request_body`; the client protocol
    not resuming a transport paused behind its back while nobody reads `resp.content`."""
    connection = resp.connection
    if connection is None:
        return None
    return take_over(resp.content, connection.transport, length, tls=True)


def body_bytes_received(request: web.BaseRequest) -> int:
    """Request body bytes aiohttp received (read or not; not those a pump read).

    Relies on: `StreamReader.total_bytes`, which is not documented (checked with 3.14.x)."""
    return request.content.total_bytes


# ---- responses -----------------------------------------------------------------------------


async def send_file_range(
    request: web.BaseRequest, handle: IO[bytes], start: int, count: int
) -> None:
    """Send `count` bytes of `handle` from `start` with the event loop's sendfile, as
    (part of) the body of a `web.StreamResponse` already prepared for `request` with a
    Content-Length and no content coding; ConnectionResetError when the client left.

    Relies on (checked with 3.14.x): `StreamResponse.prepare()` writing the status line
    and headers to the transport at once (`web.Response` holds them back for its body),
    so bytes written to `request.transport` follow them, as aiohttp's `FileResponse`
    assumes too; and `write_eof()` afterwards adding nothing for a Content-Length body."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    await asyncio.get_running_loop().sendfile(transport, handle, start, count)


#: how long `direct_socket` waits for a response head to leave the transport's buffer
HEAD_FLUSH_WAIT = 1.0


async def direct_socket(request: web.BaseRequest) -> int | None:
    """A duplicate of the client socket's descriptor, for a thread to write the rest of a
    prepared response's Content-Length body to (`splice_relay`); None when it cannot: TLS
    (the socket carries ciphertext), a closing connection, or a head still waiting in the
    transport's buffer after `HEAD_FLUSH_WAIT` (then aiohttp writes the body as usual).
    A duplicate, so the transport closing its own cannot free the number under a write.

    Relies on (checked with 3.14.x), as `send_file_range` does: `StreamResponse.prepare()`
    handing the head to the transport at once, aiohttp writing nothing more on the
    connection until the handler returns, and `write_eof()` adding nothing for a
    Content-Length body."""
    transport = request.transport
    sock = plain_socket(transport)
    if sock is None or transport is None:
        return None
    loop = asyncio.get_running_loop()
    give_up = loop.time() + HEAD_FLUSH_WAIT
    while transport.get_write_buffer_size():
        if loop.time() > give_up or transport.is_closing():
            return None
        await asyncio.sleep(0.005)
    return os.dup(sock.fileno())


def request_task_outcome(task: asyncio.Task[Any]) -> tuple[web.StreamResponse | None, bool]:
    """The response aiohttp sent for a request whose task ended normally (None when the
    task's result has another shape) and whether the client left before its end.

    Relies on (checked with 3.14.x): each request running in its own task (middlewares,
    handler, then sending the response), the one `asyncio.current_task()` returns in a
    middleware, whose result is `RequestHandler._handle_request`'s `(response, reset)`."""
    result = task.result()
    if not (isinstance(result, tuple) and len(result) == 2):
        return None, False
    response, reset = result
    return (response if isinstance(response, web.StreamResponse) else None), bool(reset)


# ---- logs ----------------------------------------------------------------------------------


def server_logger() -> logging.Logger:
    """aiohttp's logger for errors in request handling (documented name)."""
    return logging.getLogger(SERVER_LOGGER)


def access_logger() -> logging.Logger:
    """aiohttp's access logger (documented name)."""
    return logging.getLogger(ACCESS_LOGGER)


def client_gone(record: logging.LogRecord) -> str | None:
    """The remote address when `record` is aiohttp reporting a handler that ended because
    its client went away mid-request (a `ConnectionResetError`, say while the body was
    read: nothing to answer, nobody to answer to); None for any other record.

    Relies on (checked with 3.14.x): `RequestHandler.handle_error` logging
    "Error handling request from %s" with the remote address as the first argument and
    the handler's exception in `exc_info`."""
    exc = record.exc_info[1] if record.exc_info else None
    if not isinstance(exc, ConnectionResetError):
        return None
    return str(record.args[0]) if isinstance(record.args, tuple) and record.args else "-"


def malformed_request(record: logging.LogRecord) -> tuple[str, str] | None:
    """(remote address, reason) when `record` is aiohttp reporting a request it could not
    parse (a client error, answered 4xx); None for any other record.

    Relies on (checked with 3.14.x): `RequestHandler.handle_error` logging
    "Error handling request from %s" to `SERVER_LOGGER` with the remote address as the
    first argument and `exc_info` holding an `http_exceptions.HttpProcessingError` (with
    `code` and `message`) for a request the parser refused."""
    exc = record.exc_info[1] if record.exc_info else None
    if not isinstance(exc, HttpProcessingError) or (exc.code or 400) >= 500:
        return None
    remote = record.args[0] if isinstance(record.args, tuple) and record.args else "-"
    return str(remote), str(exc.message or type(exc).__name__)
