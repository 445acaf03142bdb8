"""`regproxy.tls_sender.send_file` on a real TLS connection over loopback: the records it
writes with the connection's own `SSLObject` decrypt, byte for byte, at a real client,
and leave the connection usable both ways afterwards (the record sequence numbers stay in
step with what the client counted); and it stops with the cause named (the file, the
client, the TLS state, a stop request) instead of hanging.

The client is an ordinary `ssl` socket trusting the test CA. The server's end is what
asyncio's SSL transport holds: an `SSLObject` over two memory BIOs, its handshake driven
here by hand over the socket, then the socket non-blocking and a duplicate of its
descriptor handed over in a `TlsChannel`. That the asyncio transport really is built so
is checked in tests/test_asyncio_tls.py.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from regproxy import tls_sender
from regproxy.direct_send import STOP_CHECK
from regproxy.tls_sender import (
    MAX_SENDERS,
    PIECE,
    ClientGone,
    ClientStalled,
    FileEnded,
    TlsChannel,
    TlsFailed,
    send_file,
)
from tests.support.certs import tls_contexts
from tests.support.loopback import tcp_pair

pytestmark = pytest.mark.timeout(30)

#: larger than the loopback socket buffers when they are made small (`small=True`), and
#: not a whole number of `PIECE`s
BODY = os.urandom(3 * 1024 * 1024 + 5)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(the server's context, with a certificate for 127.0.0.1; the client's, trusting
    only the test CA)."""
    return tls_contexts(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def blob(tmp_path: Path) -> Iterator[int]:
    """A descriptor of a file holding BODY."""
    path = tmp_path / "blob"
    path.write_bytes(BODY)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


@dataclass
class Tls:
    """One TLS connection on loopback, its handshake done."""

    client: ssl.SSLSocket  # blocking, with a timeout
    server: socket.socket  # the server's end of the socket, non-blocking
    sslobj: ssl.SSLObject  # the server's TLS state
    incoming: ssl.MemoryBIO  # what `sslobj` decrypts from
    channel: TlsChannel  # `sslobj`, its outgoing BIO, a duplicate of `server`'s descriptor


def _handshake(
    sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, sock: socket.socket
) -> None:
    """The server's side of the handshake, as asyncio's SSL protocol does it: records
    move between the memory BIOs and the socket until `do_handshake` returns."""
    while True:
        try:
            sslobj.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the client left during the handshake") from None
            incoming.write(data)
    sock.sendall(outgoing.read())  # the last flight (TLS 1.3: the session tickets)


@contextmanager
def connected(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], small: bool = False
) -> Iterator[Tls]:
    """A TLS connection on loopback, everything in it closed afterwards. `small`: socket
    buffers of 64 KiB, so a client that reads nothing soon holds the sender up."""
    server_ctx, client_ctx = contexts
    server, raw_client = tcp_pair(small)
    clients: list[ssl.SSLSocket] = []
    failures: list[BaseException] = []

    def client_side() -> None:
        raw_client.settimeout(5)
        try:
            clients.append(client_ctx.wrap_socket(raw_client, server_hostname="127.0.0.1"))
        except BaseException as exc:
            failures.append(exc)

    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = server_ctx.wrap_bio(incoming, outgoing, server_side=True)
    thread = threading.Thread(target=client_side)
    thread.start()
    fd = -1
    try:
        server.settimeout(5)
        try:
            _handshake(sslobj, incoming, outgoing, server)
        finally:
            thread.join(10)
        if failures:
            raise failures[0]
        server.setblocking(False)
        fd = os.dup(server.fileno())  # shares the non-blocking mode: one open file
        yield Tls(clients[0], server, sslobj, incoming, TlsChannel(sslobj, outgoing, fd))
    finally:
        for client in clients:
            client.close()
        raw_client.close()
        server.close()
        if fd >= 0:
            os.close(fd)


@contextmanager
def sending(
    tls: Tls, file_fd: int, start: int, end: int, idle: float = 5.0
) -> Iterator[tuple[Future[None], threading.Event]]:
    """`send_file` of `[start, end)` running on a thread; yields its future and its stop
    event. On leaving, the stop event is set and the thread joined (a sender left waiting
    for a client that reads nothing ends within `STOP_CHECK`), before `connected` closes
    the descriptor under it."""
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-tls-sender") as pool:
        future = pool.submit(send_file, tls.channel, file_fd, start, end, idle, stop)
        try:
            yield future, stop
        finally:
            stop.set()


def receive(sock: ssl.SSLSocket, count: int) -> bytes:
    """Up to `count` decrypted bytes, fewer only when the connection ends first."""
    got = bytearray()
    while len(got) < count:
        more = sock.recv(min(1024 * 1024, count - len(got)))
        if not more:
            break
        got += more
    return bytes(got)


def server_read(tls: Tls, count: int) -> bytes:
    """`count` bytes decrypted by the server's `SSLObject` from what the client sent."""
    got = bytearray()
    while len(got) < count:
        try:
            got += tls.sslobj.read(count - len(got))
        except ssl.SSLWantReadError:
            readable, _, _ = select.select([tls.server], [], [], 5)
            assert readable, "the client's bytes never came"
            data = tls.server.recv(65536)
            assert data, "the client closed"
            tls.incoming.write(data)
    return bytes(got)


def server_write(tls: Tls, data: bytes) -> None:
    """`data` encrypted by the server's `SSLObject` and sent (a few bytes: the socket,
    emptied by the client, takes them at once)."""
    tls.sslobj.write(data)
    tls.server.sendall(tls.channel.outgoing.read())


def assert_in_step(tls: Tls) -> None:
    """The connection still carries data both ways: each side decrypts the other's next
    record, which it cannot if a record was lost, repeated or numbered out of turn."""
    tls.client.sendall(b"ping from the client")
    assert server_read(tls, 20) == b"ping from the client"
    server_write(tls, b"pong from the server")
    assert receive(tls.client, 20) == b"pong from the server"


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, len(BODY)),
        (PIECE - 7, 5 * PIECE + 11),  # from inside the first piece to inside the sixth
        (PIECE + 5, PIECE + 6),  # one byte
    ],
    ids=["whole", "inner", "one-byte"],
)
def test_a_span_arrives_byte_for_byte_and_the_connection_stays_usable(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], blob: int, start: int, end: int
) -> None:
    with connected(contexts) as tls:
        with sending(tls, blob, start, end) as (future, _):
            got = receive(tls.client, end - start)  # meanwhile, the thread sends
            future.result(timeout=10)
        assert got == BODY[start:end]
        assert_in_step(tls)


def test_a_file_shorter_than_the_span_ends_the_send(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], blob: int
) -> None:
    """The file was shortened under the send: what it still had arrives intact, then
    FileEnded (the caller cuts the connection: a short body must not look complete)."""
    start = 100
    with connected(contexts) as tls:
        with sending(tls, blob, start, len(BODY) + 1000) as (future, _):
            got = receive(tls.client, len(BODY) - start)
            with pytest.raises(FileEnded, match="1000 bytes early"):
                future.result(timeout=10)
        assert got == BODY[start:]


def test_a_client_that_reads_nothing_is_stalled(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], blob: int
) -> None:
    with connected(contexts, small=True) as tls, sending(tls, blob, 0, len(BODY), 0.5) as sent:
        future, _ = sent
        started = time.monotonic()
        with pytest.raises(ClientStalled):
            future.result(timeout=10)
        assert 0.5 <= time.monotonic() - started < 2


def test_a_client_that_leaves_mid_body_is_gone(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], blob: int
) -> None:
    with connected(contexts, small=True) as tls, sending(tls, blob, 0, len(BODY)) as sent:
        future, _ = sent
        assert receive(tls.client, 100_000) == BODY[:100_000]
        assert not future.done()  # the body is far from sent: the sender waits for room
        tls.client.close()
        started = time.monotonic()
        with pytest.raises(ClientGone):
            future.result(timeout=10)
        assert time.monotonic() - started < 2  # at once, not after the idle time


def test_a_sender_told_to_stop_stops(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], blob: int
) -> None:
    """The client reads nothing, the idle time is long: only `stop` can end the wait."""
    with connected(contexts, small=True) as tls, sending(tls, blob, 0, len(BODY), 30) as sent:
        future, stop = sent
        time.sleep(0.3)
        assert not future.done()
        stop.set()
        told = time.monotonic()
        with pytest.raises(InterruptedError):
            future.result(timeout=10)
        assert time.monotonic() - told < STOP_CHECK + 0.5


def test_a_connection_before_its_handshake_is_refused(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], blob: int
) -> None:
    """OpenSSL refuses to write application data (here it wants a ClientHello first):
    that is TlsFailed, which the caller maps, not a raw ssl or OS error; and nothing
    reaches the socket."""
    server_ctx, _ = contexts
    outgoing = ssl.MemoryBIO()
    sslobj = server_ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_side=True)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.setblocking(False)
        channel = TlsChannel(sslobj, outgoing, ours.fileno())
        with pytest.raises(TlsFailed):
            send_file(channel, blob, 0, 1000, 1.0, threading.Event())
        with pytest.raises(BlockingIOError):
            theirs.recv(1)


def test_sender_slots_are_bounded() -> None:
    senders = tls_sender.senders
    assert senders.count == MAX_SENDERS
    taken = 0
    try:
        while taken <= MAX_SENDERS and senders.take():
            taken += 1
        assert taken == MAX_SENDERS
        assert not senders.take()
    finally:
        for _ in range(taken):
            senders.free()
    # all were freed: every slot can be taken again
    again = 0
    try:
        while again <= MAX_SENDERS and senders.take():
            again += 1
        assert again == MAX_SENDERS
    finally:
        for _ in range(again):
            senders.free()
