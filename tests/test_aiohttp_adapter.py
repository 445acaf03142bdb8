"""What `regproxy.aiohttp_adapter` assumes of aiohttp's internals, checked one by one.

After an aiohttp upgrade run this first: each failure says which assumption broke and
which adapter function to fix, before the fault shows up elsewhere as a slow-loris
connection kept open, a body read twice or a wrong access line. The checks run against
real aiohttp servers and clients on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import inspect
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import aiohttp.log
import pytest
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from regproxy import aiohttp_adapter as adapter
from regproxy.server.logs import MalformedRequestLine
from regproxy.sockbody import DIRECT_MIN, TakenBody, drive, pump

#: every exchange here ends well within this
WAIT = 5.0
BODY = DIRECT_MIN * 3 + 12345


def fix(function: str, what: str) -> str:
    """The failure message: what no longer holds, and where to fix it."""
    return (
        f"aiohttp {aiohttp.__version__} (the adapter was checked with "
        f"{adapter.CHECKED_WITH}): {what}; fix regproxy.aiohttp_adapter.{function}"
    )


@contextlib.asynccontextmanager
async def serving(
    app: web.Application, runner: web.AppRunner | None = None
) -> AsyncIterator[tuple[web.AppRunner, int]]:
    """`app` on 127.0.0.1:<ephemeral> (on `runner` when given); yields runner and port."""
    runner = runner or web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield runner, runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def exchange(port: int, raw: bytes, blame: str = "") -> bytes:
    """Send `raw` on a new connection and read until the server closes it; if it does
    not, the failure blames adapter function `blame`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), WAIT)
        except asyncio.TimeoutError:
            if not blame:
                raise
        pytest.fail(fix(blame, f"the server kept the connection open for {WAIT:g} s"))
    finally:
        writer.close()


async def eventually(check: Callable[[], bool], what: str) -> None:
    for _ in range(int(WAIT / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    pytest.fail(what)


# ---- request_handler_args ------------------------------------------------------------------


def test_request_handler_takes_the_handler_args() -> None:
    parameters = inspect.signature(RequestHandler.__init__).parameters
    for name in adapter.request_handler_args(max_field_size=1, auto_decompress=False):
        assert name in parameters, fix(
            "request_handler_args", f"RequestHandler takes no keyword {name!r}"
        )


async def test_handler_args_reach_the_parser() -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    app = web.Application(
        handler_args=adapter.request_handler_args(max_field_size=16384, auto_decompress=False)
    )
    app.router.add_post("/", echo)
    squeezed = gzip.compress(b"a" * 1000)
    async with serving(app) as (_, port), aiohttp.ClientSession() as session:
        resp = await session.post(
            f"http://127.0.0.1:{port}/",
            data=squeezed,
            headers={"Content-Encoding": "gzip", "X-Long": "x" * 12000},
            auto_decompress=False,
        )
        body = await resp.read()
    assert resp.status == 200, fix(
        "request_handler_args", f"a 12000-byte header field got {resp.status}"
    )
    assert body == squeezed, fix(
        "request_handler_args", "auto_decompress=False still inflated the body"
    )


# ---- DeadlineRunner ------------------------------------------------------------------------


def test_the_runner_internals_exist() -> None:
    assert inspect.iscoroutinefunction(getattr(web.AppRunner, "_make_server", None)), fix(
        "DeadlineRunner", "AppRunner has no coroutine _make_server to extend"
    )
    assert "__slots__" not in vars(Server) or "__dict__" in Server.__slots__, fix(
        "DeadlineRunner", "Server got __slots__: its class cannot be swapped with state added"
    )
    assert "_request_count" in getattr(RequestHandler, "__slots__", ()), fix(
        "DeadlineRunner", "RequestHandler has no _request_count slot"
    )


async def test_the_server_builds_request_handlers_from_loop_and_kwargs() -> None:
    app = web.Application()
    runner = adapter.DeadlineRunner(app, header_timeout=lambda: 7.0, keepalive_timeout=5)
    await runner.setup()
    try:
        server = runner.server
        assert isinstance(server, Server), fix(
            "DeadlineRunner", "AppRunner._make_server no longer returns a web_server.Server"
        )
        assert isinstance(getattr(server, "_loop", None), asyncio.AbstractEventLoop), fix(
            "DeadlineRunner", "Server._loop is gone"
        )
        kwargs = getattr(server, "_kwargs", None)
        assert isinstance(kwargs, dict) and kwargs.get("keepalive_timeout") == 5, fix(
            "DeadlineRunner", "Server._kwargs no longer holds the RequestHandler keywords"
        )
        handler = server()
        assert isinstance(handler, RequestHandler), fix(
            "DeadlineRunner", "calling the Server no longer makes a RequestHandler"
        )
        assert handler.keepalive_timeout == 5, fix(
            "DeadlineRunner", "the runner's keywords did not reach the RequestHandler"
        )
        assert getattr(handler, "header_timeout", None) == 7.0
    finally:
        await runner.cleanup()


async def test_request_count_is_zero_until_a_whole_request_head() -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = adapter.DeadlineRunner(
        app, header_timeout=lambda: 60.0, handle_signals=False, shutdown_timeout=1.0
    )
    async with serving(app, runner) as (runner, port):
        server = runner.server
        assert server is not None

        def counts() -> list[int]:
            return [handler._request_count for handler in server.connections]

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await eventually(lambda: len(server.connections) == 1, "no connection seen")
            assert counts() == [0], fix("DeadlineRunner", f"_request_count {counts()} on connect")
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Part: ")
            await writer.drain()
            await asyncio.sleep(0.1)
            assert counts() == [0], fix("DeadlineRunner", "_request_count moved on a partial head")
            writer.write(b"1\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"hi"), WAIT)
            assert head.startswith(b"HTTP/1.1 200")
            assert counts() == [1], fix("DeadlineRunner", f"_request_count {counts()} after one")
        finally:
            writer.close()


async def test_the_deadline_closes_only_connections_without_a_request() -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = adapter.DeadlineRunner(
        app, header_timeout=lambda: 0.3, handle_signals=False, shutdown_timeout=1.0
    )
    async with serving(app, runner) as (runner, port):
        assert type(runner.server).__name__ == "_DeadlineServer"
        # silent, and a partial head: both cut off after the deadline
        for first in (b"", b"GET / HTTP/1.1\r\nHost: x\r\n"):
            started = asyncio.get_running_loop().time()
            assert await exchange(port, first, "DeadlineRunner") == b""
            elapsed = asyncio.get_running_loop().time() - started
            assert 0.25 <= elapsed < WAIT, fix("DeadlineRunner", f"closed after {elapsed:.2f} s")
        # a served keep-alive connection outlives the deadline
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(2):
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                await writer.drain()
                answer = await asyncio.wait_for(reader.readuntil(b"hi"), WAIT)
                assert answer.startswith(b"HTTP/1.1 200"), fix(
                    "DeadlineRunner", "a connection that sent a request was closed"
                )
                await asyncio.sleep(0.5)
        finally:
            writer.close()


async def test_the_runner_answers_malformed_requests_without_a_body() -> None:
    app = web.Application()
    app.router.add_get("/", lambda request: web.Response(text="hi"))  # type: ignore[arg-type,return-value]
    runner = adapter.DeadlineRunner(
        app, header_timeout=lambda: 5.0, handle_signals=False, shutdown_timeout=1.0
    )
    async with serving(app, runner) as (runner, port):
        answer = await exchange(port, b"HEAD /?q=\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b" 400 " in head.split(b"\r\n")[0], fix("_DeadlineHandler.handle_error", str(head))
        assert body == b"", fix("_DeadlineHandler.handle_error", f"a body came: {body[:80]!r}")
        assert b"Content-Length: 0" in head


async def test_the_runner_ignores_expectations_other_than_100_continue() -> None:
    async def put(request: web.Request) -> web.Response:
        return web.Response(text=f"got {len(await request.read())}")

    app = web.Application()
    app.router.add_put("/", put)
    runner = adapter.DeadlineRunner(
        app, header_timeout=lambda: 5.0, handle_signals=False, shutdown_timeout=1.0
    )
    async with serving(app, runner) as (runner, port):
        for expect in ("fuzz", "100-CONTINUE, x"):
            raw = f"PUT / HTTP/1.1\r\nHost: x\r\nExpect: {expect}\r\nContent-Length: 2\r\n"
            raw += "Connection: close\r\n\r\nab"
            answer = await exchange(port, raw.encode())
            assert b"417" not in answer.split(b"\r\n", 1)[0], fix("_plain_expect", expect)
            assert answer.endswith(b"got 2"), fix("_plain_expect", answer.decode()[-80:])


# ---- take_request_body, take_response_body, body_bytes_received ----------------------------


def test_the_stream_reader_has_what_take_over_uses() -> None:
    for name in ("read_nowait", "exception", "feed_eof"):
        assert callable(getattr(StreamReader, name, None)), fix(
            "take_request_body", f"StreamReader.{name} is gone"
        )
    assert "total_bytes" in StreamReader.__slots__, fix(
        "body_bytes_received", "StreamReader.total_bytes is gone"
    )
    assert isinstance(getattr(web.BaseRequest, "protocol", None), property), fix(
        "take_request_body", "BaseRequest.protocol is gone"
    )
    assert callable(getattr(RequestHandler, "close", None)), fix(
        "take_request_body", "RequestHandler.close is gone"
    )


async def test_body_bytes_received_counts_the_body() -> None:
    async def count(request: web.Request) -> web.Response:
        data = await request.read()
        return web.json_response([len(data), adapter.body_bytes_received(request)])

    app = web.Application()
    app.router.add_post("/", count)
    async with serving(app) as (_, port), aiohttp.ClientSession() as session:
        resp = await session.post(f"http://127.0.0.1:{port}/", data=b"z" * 70000)
        read, counted = await resp.json()
    assert read == counted == 70000, fix("body_bytes_received", f"counted {counted} of {read}")


async def _finish(taken: TakenBody) -> tuple[int, str]:
    """Bytes and sha256 of a taken body: its head, then the rest pumped off the socket."""
    hasher = hashlib.sha256()
    for piece in taken.head:
        hasher.update(piece)
    got = sum(len(piece) for piece in taken.head)
    if taken.remaining:
        got += await drive(
            taken, lambda: pump(taken, [hasher.update], WAIT), wait_when_cancelled=True
        )
    return got, hasher.hexdigest()


async def test_take_request_body_leaves_aiohttp_out_of_the_way() -> None:
    seen: dict[str, Any] = {}

    async def take(request: web.Request) -> web.Response:
        assert request.content_length is not None
        taken = adapter.take_request_body(request, request.content_length)
        assert taken is not None, fix("take_request_body", "a plain TCP body was refused")
        seen["remaining"] = taken.remaining
        await asyncio.sleep(0.05)  # the loop runs: aiohttp must not resume reading
        transport = request.transport
        seen["reading"] = transport is not None and transport.is_reading()
        seen["size"], seen["sha256"] = await _finish(taken)
        return web.Response(text="ok")  # no force_close: protocol.close() must do it

    app = web.Application()
    app.router.add_put("/", take)
    data = os.urandom(BODY)
    head = f"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
    async with serving(app) as (_, port):
        answer = await exchange(port, head + data, "take_request_body")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok"), fix(
        "take_request_body",
        f"the connection was not closed after the answer (lingering?): {answer[:80]!r}",
    )
    assert seen["remaining"] > 0, "the body arrived whole before the handler: make it larger"
    assert not seen["reading"], fix("take_request_body", "aiohttp resumed the paused transport")
    assert (seen["size"], seen["sha256"]) == (len(data), hashlib.sha256(data).hexdigest()), fix(
        "take_request_body", "head and pumped rest are not the body (read twice or lost?)"
    )


async def test_take_response_body_from_a_client_connection() -> None:
    data = os.urandom(BODY)

    async def blob(request: web.Request) -> web.Response:
        return web.Response(body=data)

    app = web.Application()
    app.router.add_get("/", blob)
    async with serving(app) as (_, port), aiohttp.ClientSession() as session:
        resp = await session.get(f"http://127.0.0.1:{port}/", auto_decompress=False)
        try:
            assert resp.content_length == len(data)
            assert resp.connection is not None, fix(
                "take_response_body", "an unread response has no connection"
            )
            transport = resp.connection.transport
            taken = adapter.take_response_body(resp, len(data))
            assert taken is not None, fix("take_response_body", "a plain TCP body was refused")
            await asyncio.sleep(0.05)
            assert transport is not None and not transport.is_reading(), fix(
                "take_response_body", "the client resumed the paused transport"
            )
            got = await _finish(taken)
        finally:
            resp.close()
    assert got == (len(data), hashlib.sha256(data).hexdigest()), fix(
        "take_response_body", "head and pumped rest are not the body"
    )


# ---- send_file_range -----------------------------------------------------------------------


async def test_send_file_range_follows_the_prepared_headers() -> None:
    data = os.urandom(300000)
    with tempfile.TemporaryFile() as handle:
        handle.write(data)
        handle.flush()

        async def part(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"X-Part": "yes"})
            response.content_length = 200000
            await response.prepare(request)
            await adapter.send_file_range(request, handle, 50000, 200000)
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_get("/", part)
        async with serving(app) as (_, port), aiohttp.ClientSession() as session:
            for _ in range(2):  # the second on the same connection: nothing trailed the body
                unreadable = None
                try:
                    resp = await session.get(f"http://127.0.0.1:{port}/")
                    body = await resp.read()
                except aiohttp.ClientError as exc:
                    unreadable = str(exc)[:200]  # the body taken for a status line: long
                if unreadable is not None:
                    pytest.fail(fix("send_file_range", f"unreadable answer: {unreadable!r}"))
                assert resp.headers.get("X-Part") == "yes", fix(
                    "send_file_range", "the headers were not sent first"
                )
                assert body == data[50000:250000], fix(
                    "send_file_range", "the body is not the file range"
                )


# ---- request_task_outcome ------------------------------------------------------------------


async def test_the_request_task_returns_response_and_reset() -> None:
    outcomes: dict[str, tuple[Any, ...]] = {}
    returned: dict[str, web.StreamResponse] = {}

    @web.middleware
    async def watch(request: web.Request, handler: Any) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None

        def done(task: asyncio.Task[Any]) -> None:
            raw = task.result()
            outcomes[request.path] = (raw, adapter.request_task_outcome(task))

        task.add_done_callback(done)
        response = await handler(request)
        returned[request.path] = response
        return response

    async def quick(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.sleep(0.3)  # the client leaves meanwhile
        return web.Response(body=b"x" * 100)

    app = web.Application(middlewares=[watch])
    app.router.add_get("/quick", quick)
    app.router.add_get("/slow", slow)
    async with serving(app) as (_, port):
        answer = await exchange(
            port, b"GET /quick HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert answer.endswith(b"hi")
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(arrived.wait(), WAIT)
        writer.close()  # before the handler answers
        await eventually(lambda: len(outcomes) == 2, "a request task never ended")
    raw, outcome = outcomes["/quick"]
    assert isinstance(raw, tuple) and len(raw) == 2, fix(
        "request_task_outcome", f"the request task returned {raw!r}, not (response, reset)"
    )
    assert raw[0] is returned["/quick"] and raw[1] is False, fix(
        "request_task_outcome", f"a served request's task returned {raw!r}"
    )
    assert outcome == (returned["/quick"], False)
    raw, outcome = outcomes["/slow"]
    assert outcome == (returned["/slow"], True), fix(
        "request_task_outcome", f"a request whose client left returned {raw!r}"
    )


# ---- server_logger, access_logger, malformed_request ---------------------------------------


def test_the_logger_names() -> None:
    assert aiohttp.log.server_logger.name == adapter.SERVER_LOGGER, fix(
        "server_logger", f"aiohttp's server logger is {aiohttp.log.server_logger.name!r}"
    )
    assert aiohttp.log.access_logger.name == adapter.ACCESS_LOGGER, fix(
        "access_logger", f"aiohttp's access logger is {aiohttp.log.access_logger.name!r}"
    )
    default = inspect.signature(RequestHandler.__init__).parameters["logger"].default
    assert default is aiohttp.log.server_logger, fix(
        "server_logger", "RequestHandler logs elsewhere"
    )


async def test_malformed_requests_are_logged_as_assumed(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `logs.setup` may have put regproxy's filter on aiohttp's logger in this process:
    # the records are to be seen as aiohttp makes them
    monkeypatch.setattr(adapter.server_logger(), "filters", [])
    caplog.set_level(logging.DEBUG, logger=adapter.SERVER_LOGGER)

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app = web.Application()
    app.router.add_get("/broken", broken)
    async with serving(app) as (_, port):
        bad_header = b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n"
        assert (await exchange(port, bad_header)).startswith(b"HTTP/1.0 400")
        bad_line = b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n"
        assert (await exchange(port, bad_line)).startswith(b"HTTP/1.0 400")
        assert (await exchange(port, b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(
            b"HTTP/1.1 500"
        )
    records = [r for r in caplog.records if r.name == adapter.SERVER_LOGGER]
    reports = [r for r in records if r.msg == "Error handling request from %s"]
    assert len(reports) == 3, fix(
        "malformed_request", f"aiohttp.server logged {[r.getMessage() for r in records]}"
    )
    client_errors = [adapter.malformed_request(r) for r in reports[:2]]
    for found in client_errors:
        assert found is not None and found[0] == "127.0.0.1" and found[1], fix(
            "malformed_request", f"a malformed request's record was read as {found!r}"
        )
    assert adapter.malformed_request(reports[2]) is None, fix(
        "malformed_request", "a server error was taken for a malformed request"
    )


async def test_a_client_gone_mid_body_is_logged_as_assumed(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler reading a body whose client leaves: aiohttp reports it as
    `client_gone` reads it; regproxy's filter makes it one INFO line, no traceback."""
    monkeypatch.setattr(adapter.server_logger(), "filters", [])
    caplog.set_level(logging.DEBUG, logger=adapter.SERVER_LOGGER)
    finished = asyncio.Event()

    async def upload(request: web.Request) -> web.Response:
        try:
            await request.read()
        finally:
            finished.set()
        return web.Response()

    app = web.Application()
    app.router.add_put("/up", upload)
    async with serving(app) as (_, port):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()  # gone, mid-body
        await asyncio.wait_for(finished.wait(), WAIT)
        await asyncio.sleep(0.1)  # aiohttp reports after the handler
    reports = [
        r for r in caplog.records
        if r.name == adapter.SERVER_LOGGER and r.msg == "Error handling request from %s"
    ]  # fmt: skip
    assert len(reports) == 1, fix("client_gone", "aiohttp did not report the handler's end")
    assert adapter.client_gone(reports[0]) == "127.0.0.1", fix(
        "client_gone", f"the record was read as {adapter.client_gone(reports[0])!r}"
    )
    assert adapter.malformed_request(reports[0]) is None
    record = reports[0]
    MalformedRequestLine().filter(record)
    assert record.levelno == logging.INFO and record.exc_info is None
    assert record.getMessage().startswith("client 127.0.0.1 went away mid-request")
    bug = logging.LogRecord(
        adapter.SERVER_LOGGER, logging.ERROR, __file__, 1, "Error handling request from %s",
        ("127.0.0.1",), (RuntimeError, RuntimeError("a bug"), None),
    )  # fmt: skip
    assert adapter.client_gone(bug) is None
