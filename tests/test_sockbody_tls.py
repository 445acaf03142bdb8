"""`regproxy.sockbody` over TLS: an upstream's response body taken from aiohttp's client
on a TLS connection (`aiohttp_adapter.take_response_body`), decrypted by the pump thread
with the connection's own `SSLObject`.

A real aiohttp server terminates TLS on 127.0.0.1 (certificate from a throw-away CA),
a real aiohttp client reads from it; the server sends, cuts or stalls the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from regproxy import asyncio_tls, sockbody
from regproxy.aiohttp_adapter import take_response_body
from regproxy.sockbody import BodyTruncated, TakenBody, drive, pump
from regproxy.tls_sender import TlsChannel
from tests.support.certs import tls_contexts

pytestmark = pytest.mark.timeout(30)

SIZE = 3 * 1024 * 1024 + 4321
DATA = os.urandom(SIZE)
#: where the "cut" answers stop
CUT = 2 * 1024 * 1024 + 17

Behaviour = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


async def _whole(request: web.Request, response: web.StreamResponse) -> None:
    for start in range(0, SIZE, 256 * 1024):
        await response.write(DATA[start : start + 256 * 1024])


async def _closed_mid_body(request: web.Request, response: web.StreamResponse) -> None:
    await response.write(DATA[:CUT])
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.close()  # a TLS close_notify, then FIN: short of the length


async def _reset_mid_body(request: web.Request, response: web.StreamResponse) -> None:
    await response.write(DATA[:CUT])
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.abort()


#: set when the server closes: what a stalled answer waits for
stalled_until: asyncio.Event | None = None


async def _stalled(request: web.Request, response: web.StreamResponse) -> None:
    await response.write(DATA[:CUT])
    assert stalled_until is not None
    await stalled_until.wait()


BEHAVIOURS: dict[str, Behaviour] = {
    "whole": _whole,
    "closed": _closed_mid_body,
    "reset": _reset_mid_body,
    "stalled": _stalled,
}


class TlsServer:
    """An aiohttp server over TLS answering `/<behaviour>` with a `SIZE`-byte body."""

    def __init__(self, directory: Path) -> None:
        self.server_ctx, self.client_ctx = tls_contexts(directory)
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        global stalled_until
        stalled_until = asyncio.Event()

        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            response.content_length = SIZE
            await response.prepare(request)
            await BEHAVIOURS[request.match_info["how"]](request, response)
            return response

        app = web.Application()
        app.router.add_get("/{how}", handler)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.server_ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        if stalled_until is not None:
            stalled_until.set()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[TlsServer]:
    tls = TlsServer(tmp_path)
    await tls.start()
    try:
        yield tls
    finally:
        await tls.close()


@pytest.fixture
async def session(server: TlsServer) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=server.client_ctx)
    async with aiohttp.ClientSession(connector=connector) as client:
        yield client


async def _get(
    session: aiohttp.ClientSession, server: TlsServer, how: str
) -> aiohttp.ClientResponse:
    resp = await session.get(f"https://127.0.0.1:{server.port}/{how}")
    assert resp.status == 200 and resp.content_length == SIZE
    return resp


async def _pump_all(taken: TakenBody, idle: float = 5.0) -> bytes:
    """The rest of the body as the pump reads it (one consumer collecting)."""
    pieces: list[bytes] = []
    await drive(
        taken,
        lambda: pump(taken, [lambda view: pieces.append(bytes(view))], idle),
        wait_when_cancelled=True,
    )
    return b"".join(pieces)


async def test_a_tls_body_is_decrypted_by_the_pump(
    server: TlsServer, session: aiohttp.ClientSession
) -> None:
    resp = await _get(session, server, "whole")
    taken = take_response_body(resp, SIZE)
    assert taken is not None and taken.tls is not None
    try:
        assert taken.remaining > SIZE // 2, "most of the body is left to the pump"
        rest = await _pump_all(taken)
    finally:
        resp.close()
    body = b"".join(taken.head) + rest
    assert hashlib.sha256(body).digest() == hashlib.sha256(DATA).digest()
    assert taken.fd == -1 and taken.tls is not None  # the loan ended, its descriptor closed
    # the connection was closed with the response, never handed back to the pool
    assert resp.connection is None
    again = await _get(session, server, "whole")  # a new connection works as ever
    assert await again.read() == DATA


@pytest.mark.parametrize(
    ("how", "error"),
    [
        ("closed", (BodyTruncated, ConnectionError)),
        ("reset", (BodyTruncated, ConnectionError)),
        ("stalled", sockbody.BodyTimeout),
    ],
)
async def test_a_broken_tls_body_is_an_error_and_cuts_the_connection(
    server: TlsServer, session: aiohttp.ClientSession, how: str, error: Any
) -> None:
    """close_notify or a reset before the announced length, or a server that stops
    sending: never a complete body, and the connection is cut when the loan ends (no
    close_notify after a failed read: the pump may have stopped inside a record)."""
    resp = await _get(session, server, how)
    assert resp.connection is not None and resp.connection.transport is not None
    transport = resp.connection.transport
    taken = take_response_body(resp, SIZE)
    assert taken is not None
    try:
        with pytest.raises(error):
            await _pump_all(taken, idle=0.5)
        assert taken.fd == -1
        assert transport.is_closing(), "a failed pump leaves the connection open"
    finally:
        resp.close()


async def test_a_cancelled_tls_pump_stops_and_gives_the_connection_back(
    server: TlsServer, session: aiohttp.ClientSession
) -> None:
    resp = await _get(session, server, "stalled")
    taken = take_response_body(resp, SIZE)
    assert taken is not None
    task = asyncio.ensure_future(_pump_all(taken, idle=20.0))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert taken.stop.is_set() and taken.fd == -1
    resp.close()  # the close held during the loan is not needed: it is back, closing works
    assert resp.connection is None


async def test_without_a_loan_nothing_is_taken(
    server: TlsServer, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the connection cannot be lent, aiohttp keeps the whole body: not a byte of
    what it had buffered is consumed, and no pump slot stays taken."""
    monkeypatch.setattr(asyncio_tls, "take", lambda transport: None)
    free = sockbody._slots._value  # type: ignore[attr-defined]
    resp = await _get(session, server, "whole")
    assert take_response_body(resp, SIZE) is None
    assert sockbody._slots._value == free  # type: ignore[attr-defined]
    assert await resp.read() == DATA


class _WantsToWrite:
    """An `SSLObject` stand-in with records to send (a key update's answer) before it can
    read: `read` asks for more ciphertext."""

    def read(self, length: int, buffer: memoryview) -> int:
        raise ssl.SSLWantReadError("want read")


def test_what_openssl_sends_while_reading_goes_out_and_a_gone_peer_is_truncation() -> None:
    """Records OpenSSL queued while reading are written before the next read; a peer that
    is gone meanwhile ends the body as `BodyTruncated`, never as a hang."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    outgoing, incoming = ssl.MemoryBIO(), ssl.MemoryBIO()
    channel = TlsChannel(_WantsToWrite(), outgoing, ours.fileno(), incoming)  # type: ignore[arg-type]
    reader = sockbody._TlsReader(channel)
    pace = sockbody._Pace(2.0, 0.0)
    try:
        outgoing.write(b"a key update's answer")
        theirs.sendall(b"\x17\x03\x03")  # a few bytes of a record, then the peer goes
        with pytest.raises(sockbody.BodyTimeout):  # nothing decrypts: the idle timeout
            reader.fill_from(
                ours.fileno(),
                memoryview(bytearray(16)),
                sockbody._Pace(0.3, 0.0),
                threading.Event(),
            )
        assert theirs.recv(100) == b"a key update's answer"  # it went out first
        assert incoming.pending == 3
        theirs.close()
        outgoing.write(b"more")
        with pytest.raises(BodyTruncated):
            reader.fill_from(ours.fileno(), memoryview(bytearray(16)), pace, threading.Event())
    finally:
        ours.close()
        with contextlib.suppress(OSError):
            theirs.close()
