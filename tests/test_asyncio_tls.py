"""`regproxy.asyncio_tls` against this Python's own asyncio SSL transport: every private
detail its module docstring says it relies on ("Relies on") is checked here on a real
TLS server and client over loopback, so a Python release that changes one fails here
rather than corrupting a connection in production.

Checked: the transport's parts (`_ssl_protocol`, its `_sslobj`, `_outgoing`,
`_incoming`, `_transport`, `_state`, `_app_reading_paused`) are there and behave as
relied on; `take` lends nothing it cannot (no TLS, no transport, a closing connection,
bytes still unsent: `flushed` gives up after `FLUSH_WAIT`); a loan works end to end: a
thread's `send_file` reaches the client intact, the client's bytes wait while the thread
owns the connection and reach the protocol after, the transport's own writes still
decrypt afterwards (the record sequence numbers stayed in step), and reading is resumed
only when the loan paused it; and what is asked of the transport during a loan (close,
abort, write, a change of reading) waits for `give_back`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from regproxy import asyncio_tls
from regproxy.asyncio_tls import Handover, _parts, flushed, take
from regproxy.tls_sender import send_file
from tests.support.certs import tls_contexts

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(the server's context, with a certificate for 127.0.0.1; the client's, trusting
    only the test CA)."""
    return tls_contexts(tmp_path_factory.mktemp("tls"))


class Recorder(asyncio.Protocol):
    """A server protocol that keeps what it is sent and the transport it is given."""

    def __init__(self) -> None:
        self.made: asyncio.Future[asyncio.Transport] = asyncio.get_running_loop().create_future()
        self.received = bytearray()
        self.arrived = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.made.set_result(transport)

    def data_received(self, data: bytes) -> None:
        self.received += data
        self.arrived.set()

    async def wait_for(self, count: int) -> bytes:
        """The first `count` bytes received (waits at most 5 s)."""
        async with asyncio.timeout(5):
            while len(self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return bytes(self.received)


@dataclass
class Connection:
    """One connection to a `Recorder` server: the server's transport and protocol, the
    client's stream reader and writer."""

    transport: asyncio.Transport
    protocol: Recorder
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    raw: asyncio.Transport | None = field(default=None)  # the socket transport under TLS


@contextlib.asynccontextmanager
async def connection(
    ssl_contexts: tuple[ssl.SSLContext, ssl.SSLContext] | None,
) -> AsyncIterator[Connection]:
    """A server on 127.0.0.1 and one client connected to it, over TLS unless
    `ssl_contexts` is None; every transport and the server are closed afterwards."""
    server_ctx, client_ctx = ssl_contexts if ssl_contexts is not None else (None, None)
    protocols: list[Recorder] = []

    def make() -> Recorder:
        protocols.append(Recorder())
        return protocols[-1]

    loop = asyncio.get_running_loop()
    server = await loop.create_server(make, "127.0.0.1", 0, ssl=server_ctx)
    writer: asyncio.StreamWriter | None = None
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=client_ctx,
            server_hostname="127.0.0.1" if client_ctx is not None else None,
        )
        async with asyncio.timeout(5):
            while not protocols:
                await asyncio.sleep(0.005)
            transport = await protocols[0].made
        ssl_protocol = getattr(transport, "_ssl_protocol", None)
        raw = getattr(ssl_protocol, "_transport", None)
        yield Connection(transport, protocols[0], reader, writer, raw)
    finally:
        # aborts, not closes: a TLS close waits for the peer's close_notify
        for protocol in protocols:
            if protocol.made.done():
                protocol.made.result().abort()
        if writer is not None:
            writer.transport.abort()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        server.close()
        await server.wait_closed()


@pytest.fixture
def blob(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    """A file of a few MiB (not a whole number of pieces): its descriptor and bytes."""
    body = os.urandom(2 * 1024 * 1024 + 777)
    path = tmp_path / "blob"
    path.write_bytes(body)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd, body
    finally:
        os.close(fd)


def kernel_has_bytes_for(fd: int) -> bool:
    """Whether the socket `fd` has bytes received and not yet read."""
    readable, _, _ = select.select([fd], [], [], 0.5)
    return bool(readable)


async def test_the_tls_transport_has_the_parts_relied_on(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    async with connection(contexts) as conn:
        ssl_protocol = getattr(conn.transport, "_ssl_protocol", None)
        assert isinstance(ssl_protocol, asyncio.sslproto.SSLProtocol)
        protocol: Any = ssl_protocol  # its private attributes are not in typeshed
        assert isinstance(protocol._sslobj, ssl.SSLObject)
        assert isinstance(protocol._outgoing, ssl.MemoryBIO)
        # where records read from the socket wait to be decrypted (a pump reads a body
        # on through it: tests/test_sockbody_tls.py)
        assert isinstance(protocol._incoming, ssl.MemoryBIO)
        assert isinstance(protocol._transport, asyncio.Transport)
        assert protocol._transport.get_extra_info("socket") is not None
        assert protocol._state is asyncio.sslproto.SSLProtocolState.WRAPPED
        # the object the transport exposes is the one that encrypts for it
        assert conn.transport.get_extra_info("ssl_object") is protocol._sslobj
        assert _parts(conn.transport) == (protocol, protocol._transport)


async def lend(transport: asyncio.BaseTransport | None) -> Handover | None:
    """As the server lends a connection: once its buffers are empty."""
    return take(transport) if await flushed(transport) else None


async def test_no_loan_without_tls_or_a_transport() -> None:
    async with connection(None) as conn:
        assert _parts(conn.transport) is None
        assert await lend(conn.transport) is None
        assert conn.transport.is_reading()
    assert await lend(None) is None


async def test_no_loan_of_a_closing_connection(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    async with connection(contexts) as conn:
        conn.transport.close()
        assert conn.transport.is_closing()
        assert await lend(conn.transport) is None


async def test_a_thread_sends_over_the_connection_and_hands_it_back(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], blob: tuple[int, bytes]
) -> None:
    file_fd, body = blob
    loop = asyncio.get_running_loop()
    async with connection(contexts) as conn:
        assert conn.raw is not None and conn.raw.is_reading()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-tls-sender") as pool:
            handover = await lend(conn.transport)
            assert handover is not None
            channel = handover.channel
            protocol: Any = getattr(conn.transport, "_ssl_protocol", None)
            assert channel.sslobj is protocol._sslobj
            assert channel.outgoing is protocol._outgoing
            assert channel.incoming is protocol._incoming
            assert not conn.raw.is_reading()  # paused for the thread
            # a pipelined request: it must wait in the kernel, not reach the SSLObject
            conn.writer.write(b"the next request")
            await conn.writer.drain()
            job = loop.run_in_executor(
                pool, send_file, channel, file_fd, 0, len(body), 5.0, threading.Event()
            )
            try:
                got = await asyncio.wait_for(conn.reader.readexactly(len(body)), 10)
            finally:
                await job
            assert got == body
            assert kernel_has_bytes_for(channel.fd)
            await asyncio.sleep(0.1)  # the event loop had its chance to read
            assert conn.protocol.received == b""
            handover.give_back(None)
            assert conn.raw.is_reading()  # resumed: the waiting bytes are read and decrypted
            assert await conn.protocol.wait_for(16) == b"the next request"
        # the transport writes again with the same SSLObject: the client decrypts it
        conn.transport.write(b"after the thread")
        assert await asyncio.wait_for(conn.reader.readexactly(16), 5) == b"after the thread"


async def test_bytes_still_unsent_give_no_loan(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread's records must not overtake what the transport still holds: with the
    client reading nothing, `flushed` waits `FLUSH_WAIT` and gives up, `take` refuses,
    and reading is left as it was."""
    monkeypatch.setattr(asyncio_tls, "FLUSH_WAIT", 0.3)
    async with connection(contexts) as conn:
        assert conn.raw is not None
        conn.transport.write(os.urandom(32 * 1024 * 1024))  # far more than the socket buffers
        await asyncio.sleep(0.05)
        assert conn.transport.get_write_buffer_size() + conn.raw.get_write_buffer_size() > 0
        started = time.monotonic()
        assert not await flushed(conn.transport)
        waited = time.monotonic() - started
        assert take(conn.transport) is None
        assert conn.raw.is_reading()
        assert 0.3 <= waited < 1.5
        # and reading really went on: the client's bytes reach the protocol
        conn.writer.write(b"still read")
        assert await conn.protocol.wait_for(10) == b"still read"


async def test_reading_paused_by_another_stays_paused(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """A loan resumes only what it paused: flow control paused elsewhere (for instance
    by the SSL protocol, its incoming buffer full) is not undone."""
    async with connection(contexts) as conn:
        assert conn.raw is not None
        conn.raw.pause_reading()
        handover = await lend(conn.transport)
        assert handover is not None
        assert not conn.raw.is_reading()
        handover.give_back(None)
        assert not conn.raw.is_reading()
        conn.writer.write(b"held")
        await conn.writer.drain()
        await asyncio.sleep(0.1)
        assert conn.protocol.received == b""
        conn.raw.resume_reading()
        assert await conn.protocol.wait_for(4) == b"held"


async def test_the_protocols_app_reading_flag_holds_reads_back(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """`_app_reading_paused` set: data that arrives (or a read already scheduled) gives
    the application nothing and leaves the outgoing BIO alone; the transport's
    `resume_reading` clears it and serves what waited."""
    async with connection(contexts) as conn:
        protocol: Any = getattr(conn.transport, "_ssl_protocol")  # noqa: B009
        protocol._app_reading_paused = True
        conn.writer.write(b"waiting")
        await conn.writer.drain()
        await asyncio.sleep(0.1)
        protocol._do_read()  # as a read scheduled before the flag was set would
        assert conn.protocol.received == b""
        assert protocol._outgoing.pending == 0
        conn.transport.resume_reading()
        assert not protocol._app_reading_paused
        assert await conn.protocol.wait_for(7) == b"waiting"


@pytest.mark.parametrize("asked", ["close", "abort", "write"])
async def test_what_is_asked_during_a_loan_waits_for_its_end(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], asked: str
) -> None:
    """aiohttp may close (or abort) a connection whose request it cancelled before the
    thread has stopped: nothing reaches the SSLObject until `give_back`, which then
    closes, aborts, or (a write: it could not follow a body cut short) aborts."""
    async with connection(contexts) as conn:
        handover = await lend(conn.transport)
        assert handover is not None
        protocol: Any = getattr(conn.transport, "_ssl_protocol")  # noqa: B009
        if asked == "write":
            conn.transport.write(b"must never be sent")
        else:
            getattr(conn.transport, asked)()
        assert not conn.transport.is_closing()
        assert protocol._state is asyncio.sslproto.SSLProtocolState.WRAPPED
        assert protocol._outgoing.pending == 0
        handover.give_back(None)
        assert conn.transport.is_closing()
        got = b""
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            got = await asyncio.wait_for(conn.reader.read(), 5)
        assert got == b""


async def test_a_failed_thread_cuts_the_connection(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """A thread that raised may have stopped inside a TLS record: no close_notify may be
    appended to it, so `give_back` aborts."""
    async with connection(contexts) as conn:
        handover = await lend(conn.transport)
        assert handover is not None
        handover.give_back(InterruptedError("told to stop"))
        assert conn.transport.is_closing()
        protocol: Any = getattr(conn.transport, "_ssl_protocol")  # noqa: B009
        assert protocol._state is not asyncio.sslproto.SSLProtocolState.FLUSHING


async def test_reading_asked_during_a_loan_applies_after_it(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """The application pausing reading during a loan (aiohttp's flow control) is kept:
    after `give_back` the protocol still reads nothing for it until it resumes."""
    async with connection(contexts) as conn:
        handover = await lend(conn.transport)
        assert handover is not None
        conn.transport.pause_reading()
        handover.give_back(None)
        conn.writer.write(b"later")
        await conn.writer.drain()
        await asyncio.sleep(0.1)
        assert conn.protocol.received == b""
        conn.transport.resume_reading()
        assert await conn.protocol.wait_for(5) == b"later"


async def test_out_of_descriptors_lends_nothing_and_changes_nothing(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No descriptor left for the duplicate (EMFILE): `take` returns None before pausing
    anything or holding any method back, so the event loop sends the body as usual."""
    async with connection(contexts) as conn:
        assert conn.raw is not None

        def no_descriptor(fd: int) -> int:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(asyncio_tls.os, "dup", no_descriptor)
        assert await flushed(conn.transport)
        assert take(conn.transport) is None
        monkeypatch.undo()
        assert conn.raw.is_reading()
        assert not any(name in vars(conn.transport) for name in Handover.HELD)
        conn.transport.write(b"as usual")
        assert await asyncio.wait_for(conn.reader.readexactly(8), 5) == b"as usual"
