"""`regproxy.sockwrite`: response bodies written to the client socket by threads.

Real sockets (a connected pair, the writer's side non-blocking as asyncio leaves it):
everything arrives in order, a client that takes nothing is cut off after the idle
timeout, a client that left is an OSError, a cancelled write ends its thread's work
before returning, and clients that stop reading hold no thread: more of them than the
pool has threads do not delay a client that reads.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from regproxy import sockwrite
from regproxy.sockwrite import ClientStalled, SocketWriter, send_some

MIB = 1024 * 1024


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    server.setblocking(False)
    try:
        yield server, client
    finally:
        server.close()
        client.close()


def _read_all(sock: socket.socket, count: int, into: bytearray) -> None:
    while len(into) < count:
        chunk = sock.recv(256 * 1024)
        if not chunk:
            return
        into += chunk


def _writer(sock: socket.socket, idle_timeout: float = 5.0) -> SocketWriter:
    return SocketWriter(os.dup(sock.fileno()), idle_timeout)


async def test_everything_arrives_in_order(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    data = os.urandom(8 * MIB + 3)  # far more than the socket buffers hold
    got = bytearray()
    reader = threading.Thread(target=_read_all, args=(client, len(data), got))
    reader.start()
    writer = _writer(server)
    try:
        for at in range(0, len(data), MIB):
            await writer.write(data[at : at + MIB])
    finally:
        writer.close()
    await asyncio.to_thread(reader.join, 10)
    assert bytes(got) == data


def test_send_some_stops_when_the_socket_is_full(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, _ = pair
    data = memoryview(os.urandom(16 * MIB))
    sent = send_some(server.fileno(), data)
    assert 0 < sent < len(data)  # nobody reads: it returns instead of waiting
    assert send_some(server.fileno(), data[sent:]) == 0


async def test_a_client_taking_nothing_is_cut_off(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, _ = pair
    writer = _writer(server, idle_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(ClientStalled):
        await writer.write(os.urandom(16 * MIB))
    assert time.monotonic() - started < 3
    writer.close()


async def test_a_client_that_left_is_an_oserror(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    client.close()
    writer = _writer(server)
    with pytest.raises(OSError):
        await writer.write(os.urandom(MIB))
    writer.close()


async def test_a_cancelled_write_returns_at_once_and_closes_once(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, _ = pair
    writer = _writer(server, idle_timeout=60.0)
    task = asyncio.ensure_future(writer.write(os.urandom(16 * MIB)))
    await asyncio.sleep(0.2)  # waiting for room: nobody reads
    task.cancel()
    async with asyncio.timeout(2):
        with pytest.raises(asyncio.CancelledError):
            await task
    writer.close()
    assert writer.fd == -1
    writer.close()  # twice is harmless


async def test_stalled_clients_hold_no_thread() -> None:
    """More clients that stop reading than the pool has threads: a client that reads
    still gets its body at once."""
    pairs = [socket.socketpair() for _ in range(sockwrite.MAX_WRITERS * 2 + 1)]
    try:
        for server, _ in pairs:
            server.setblocking(False)
        writers = [_writer(server, idle_timeout=30.0) for server, _ in pairs[:-1]]
        stalled = [asyncio.ensure_future(w.write(os.urandom(8 * MIB))) for w in writers]
        await asyncio.sleep(0.3)  # every stalled write is waiting for room
        assert not any(task.done() for task in stalled)
        server, client = pairs[-1]
        data = os.urandom(4 * MIB)
        got = bytearray()
        reader = threading.Thread(target=_read_all, args=(client, len(data), got))
        reader.start()
        writer = _writer(server)
        async with asyncio.timeout(5):
            await writer.write(data)
        writer.close()
        await asyncio.to_thread(reader.join, 10)
        assert bytes(got) == data
        for task in stalled:
            task.cancel()
        await asyncio.gather(*stalled, return_exceptions=True)
        for w in writers:
            w.close()
    finally:
        for server, client in pairs:
            server.close()
            client.close()
