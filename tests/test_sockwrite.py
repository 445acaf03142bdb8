"""`regproxy.sockwrite`: response bodies written to the client socket by threads.

Real sockets (a connected pair, the writer's side non-blocking as asyncio leaves it):
everything arrives in order, a client that takes nothing is cut off after the idle
timeout, a client that left is an OSError, and a cancelled write stops its thread before
the descriptor can be closed under it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from regproxy import sockwrite
from regproxy.sockwrite import ClientStalled, SocketWriter, WriterStopped, send_all

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


def test_everything_arrives_in_order(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    data = os.urandom(8 * MIB + 3)  # far more than the socket buffers hold
    got = bytearray()
    reader = threading.Thread(target=_read_all, args=(client, len(data), got))
    reader.start()
    send_all(server.fileno(), data, 5.0, threading.Event())
    reader.join(10)
    assert bytes(got) == data


def test_a_client_taking_nothing_is_cut_off(pair: tuple[socket.socket, socket.socket]) -> None:
    server, _ = pair
    started = time.monotonic()
    with pytest.raises(ClientStalled):
        send_all(server.fileno(), os.urandom(16 * MIB), 0.3, threading.Event())
    assert time.monotonic() - started < 3


def test_a_client_that_left_is_an_oserror(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.close()
    with pytest.raises(OSError):
        send_all(server.fileno(), os.urandom(MIB), 5.0, threading.Event())


def test_stop_ends_a_blocked_write(pair: tuple[socket.socket, socket.socket]) -> None:
    server, _ = pair
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    with pytest.raises(WriterStopped):
        send_all(server.fileno(), os.urandom(16 * MIB), 60.0, stop)


async def test_a_cancelled_write_stops_its_thread_before_returning(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, _ = pair
    writer = SocketWriter(os.dup(server.fileno()), idle_timeout=60.0)
    task = asyncio.ensure_future(writer.write(os.urandom(16 * MIB)))
    await asyncio.sleep(0.2)  # blocked: nobody reads
    task.cancel()
    async with asyncio.timeout(2):
        with pytest.raises(asyncio.CancelledError):
            await task
    busy = [t for t in threading.enumerate() if t.name.startswith("regproxy-send")]
    assert all(_idle(t) for t in busy)
    writer.close()
    assert writer.fd == -1
    writer.close()  # twice is harmless


def _idle(thread: threading.Thread) -> bool:
    """A pool thread that is not inside `send_all` (waiting for work, or gone)."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == "send_all":
            return False
        frame = frame.f_back
    return True


def test_the_pool_is_bounded() -> None:
    assert sockwrite._executor._max_workers == sockwrite.MAX_WRITERS
