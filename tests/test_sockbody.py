"""`regproxy.sockbody`: bodies taken away from aiohttp and read from the socket by threads.

`pump` is driven over `socket.socketpair()` (the reading end non-blocking, as asyncio
leaves it), with a `TakenBody` built by hand; `take_over` with duck-typed stand-ins for
aiohttp's reader and transport, and once inside a real aiohttp handler on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from regproxy import sockbody
from regproxy.sockbody import (
    DIRECT_MIN,
    BodyStopped,
    BodyTimeout,
    BodyTooSlow,
    BodyTruncated,
    TakenBody,
    direct_length,
    drive,
    pump,
    take_over,
)

PAGE = 4096
#: every pump run here must end well within this (a hang fails the test, not the session)
LIVENESS = 10.0


class Pair:
    """A socket pair: `peer` plays the client, `taken` the server side that `pump` reads."""

    def __init__(self) -> None:
        self.peer, self.server = socket.socketpair()
        self.server.setblocking(False)
        self.bodies: list[TakenBody] = []
        self.senders: list[threading.Thread] = []

    def body(self, remaining: int) -> TakenBody:
        taken = TakenBody(head=[], remaining=remaining, fd=os.dup(self.server.fileno()))
        self.bodies.append(taken)
        return taken

    def send(self, data: bytes, *, then_close: bool = False, pace: float = 0.0) -> None:
        """Send from a thread (the socket buffer is smaller than the bodies)."""

        def run() -> None:
            try:
                if pace:
                    for start in range(0, len(data), 100):
                        self.peer.sendall(data[start : start + 100])
                        time.sleep(pace)
                else:
                    self.peer.sendall(data)
                if then_close:
                    self.peer.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the reading side went away first (a test that stops early)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.senders.append(thread)

    def close(self) -> None:
        for taken in self.bodies:
            taken.close()
        self.peer.close()
        self.server.close()
        for thread in self.senders:
            thread.join(LIVENESS)


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    try:
        yield p
    finally:
        p.close()


class Collector:
    """A consumer keeping a copy of every block (the pump reuses its buffers)."""

    def __init__(self) -> None:
        self.blocks: list[bytes] = []
        self.threads: set[int] = set()
        self.addresses: list[int] = []

    def __call__(self, view: memoryview) -> None:
        self.threads.add(threading.get_ident())
        self.blocks.append(bytes(view))
        if view.nbytes and not view.readonly:
            holder = ctypes.c_char.from_buffer(view)
            self.addresses.append(ctypes.addressof(holder))
            del holder

    @property
    def data(self) -> bytes:
        return b"".join(self.blocks)

    @property
    def sizes(self) -> list[int]:
        return [len(block) for block in self.blocks]


def run_pump(*args: Any, **kwargs: Any) -> int:
    """`pump` in a worker thread, as the server runs it; fails instead of hanging."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(pump, *args, **kwargs)
        return future.result(timeout=LIVENESS)


def body_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "regproxy-body" and t.is_alive()]


def expected_sizes(total: int, block: int, position: int = 0) -> list[int]:
    sizes = []
    want = block - position % block
    while total > 0:
        size = min(want, total)
        sizes.append(size)
        total -= size
        want = block
    return sizes


# ---- pump: the bytes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "block", "depth"),
    [
        (3 * 1024 * 1024, sockbody.BLOCK, sockbody.DEPTH),  # whole default blocks
        (3 * 1024 * 1024 + 12345, sockbody.BLOCK, sockbody.DEPTH),  # odd tail
        (200_000 + 7, 8192, 2),  # many small blocks, few buffers
        (5000, 65536, 3),  # a body smaller than one block
        (1, 4096, 1),  # one byte, one buffer
    ],
)
def test_bytes_arrive_intact_and_in_order(pair: Pair, size: int, block: int, depth: int) -> None:
    data = os.urandom(size)
    hasher = hashlib.sha256()
    collector = Collector()
    taken = pair.body(size)
    pair.send(data)
    got = run_pump(taken, [hasher.update, collector], 5.0, block=block, depth=depth)
    assert got == size
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    assert collector.data == data
    assert collector.sizes == expected_sizes(size, block)
    assert body_threads() == []


def test_reads_exactly_the_announced_length(pair: Pair) -> None:
    """Bytes after the body (a pipelined request) stay in the socket."""
    data = os.urandom(50_000)
    collector = Collector()
    taken = pair.body(len(data))
    pair.send(data + b"NEXT REQUEST")
    assert run_pump(taken, [collector], 5.0, block=16384) == len(data)
    assert collector.data == data
    pair.server.setblocking(True)
    pair.server.settimeout(5)
    assert pair.server.recv(100) == b"NEXT REQUEST"


def test_every_consumer_gets_every_block_on_its_own_thread(pair: Pair) -> None:
    data = os.urandom(300_000)
    consumers = [Collector() for _ in range(3)]
    taken = pair.body(len(data))
    pair.send(data)
    run_pump(taken, consumers, 5.0, block=32768)
    for consumer in consumers:
        assert consumer.data == data
        assert consumer.sizes == expected_sizes(len(data), 32768)
        assert len(consumer.threads) == 1
    threads = [next(iter(c.threads)) for c in consumers]
    assert len(set(threads)) == 3, "one thread per consumer"
    assert threading.get_ident() not in threads


def test_a_slow_consumer_still_sees_every_block_in_order(pair: Pair) -> None:
    """With only two buffers and a slow consumer, the reader waits; nothing is overwritten."""
    data = os.urandom(100_000)
    fast, slow = Collector(), Collector()

    def sluggish(view: memoryview) -> None:
        time.sleep(0.01)
        slow(view)

    taken = pair.body(len(data))
    pair.send(data)
    run_pump(taken, [fast, sluggish], 5.0, block=4096, depth=2)
    assert fast.data == data
    assert slow.data == data


def test_blocks_are_page_aligned_memory(pair: Pair) -> None:
    """O_DIRECT writes need aligned buffers: every block starts on a page."""
    data = os.urandom(10 * PAGE + 100)
    collector = Collector()
    taken = pair.body(len(data))
    pair.send(data)
    run_pump(taken, [collector], 5.0, block=2 * PAGE, position=PAGE + 5)
    assert collector.data == data
    assert collector.addresses, "the pump hands out writable views of its buffers"
    assert all(address % PAGE == 0 for address in collector.addresses)


@pytest.mark.parametrize(
    ("position", "size", "block"),
    [
        (1000, 20_000, 4096),  # first block 3096, then whole blocks, then a tail
        (8192, 20_000, 4096),  # already aligned: the first block is whole
        (4095, 10_000, 4096),  # first block of one byte
        (3 * 1024 * 1024 + 37, 3 * 1024 * 1024, sockbody.BLOCK),  # upload at an odd offset
        (100, 50, 4096),  # the body ends inside the first, shortened block
    ],
)
def test_position_shortens_the_first_block(
    pair: Pair, position: int, size: int, block: int
) -> None:
    data = os.urandom(size)
    collector = Collector()
    taken = pair.body(size)
    pair.send(data)
    assert run_pump(taken, [collector], 5.0, position=position, block=block) == size
    assert collector.data == data
    assert collector.sizes == expected_sizes(size, block, position)
    # every block after the first starts at a multiple of `block` in the consumers' file
    starts = [position + sum(collector.sizes[:i]) for i in range(len(collector.sizes))]
    assert all(start % block == 0 for start in starts[1:])


def test_head_is_not_read_by_pump(pair: Pair) -> None:
    """`head` (what aiohttp buffered) is the caller's: pump reads only `remaining`."""
    data = os.urandom(9000)
    collector = Collector()
    taken = TakenBody(
        head=[b"already buffered"], remaining=len(data), fd=os.dup(pair.server.fileno())
    )
    pair.bodies.append(taken)
    pair.send(data)
    assert run_pump(taken, [collector], 5.0, block=4096) == len(data)
    assert collector.data == data


# ---- pump: how it ends early ---------------------------------------------------------------


def test_peer_closing_early_is_body_truncated(pair: Pair) -> None:
    data = os.urandom(10_000)
    first, second = Collector(), Collector()
    taken = pair.body(len(data) + 5000)
    pair.send(data, then_close=True)
    started = time.monotonic()
    with pytest.raises(BodyTruncated) as caught:
        run_pump(taken, [first, second], 30.0, block=4096)
    assert time.monotonic() - started < 5, "EOF ends the pump at once, not at the idle timeout"
    assert isinstance(caught.value, ConnectionResetError)
    # every byte that arrived is handed on (an upload can resume after it), to both
    # consumers: whole blocks, then what there was of the last one
    assert first.data == second.data == data
    assert all(size == 4096 for size in first.sizes[:-1])
    assert first.sizes[-1] == len(data) % 4096
    assert body_threads() == []


def test_peer_closing_before_sending_anything(pair: Pair) -> None:
    collector = Collector()
    taken = pair.body(1000)
    pair.peer.shutdown(socket.SHUT_WR)
    with pytest.raises(BodyTruncated):
        run_pump(taken, [collector], 30.0)
    assert collector.blocks == []


def test_a_stalled_peer_is_body_timeout(pair: Pair) -> None:
    data = os.urandom(6000)
    collector = Collector()
    taken = pair.body(100_000)
    pair.send(data)  # and then nothing, with the connection still open
    started = time.monotonic()
    with pytest.raises(BodyTimeout):
        run_pump(taken, [collector], 0.3, block=4096)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 5
    assert data.startswith(collector.data)
    assert body_threads() == []


def test_the_idle_timeout_counts_from_the_last_data(pair: Pair) -> None:
    """A slow but steady peer (well within the idle timeout per piece) is not cut off."""
    data = os.urandom(1500)
    collector = Collector()
    taken = pair.body(len(data))
    pair.send(data, pace=0.04)  # 15 pieces over ~0.6 s, more than the 0.4 s timeout
    assert run_pump(taken, [collector], 0.4, block=65536) == len(data)
    assert collector.data == data


def test_a_peer_below_the_minimum_rate_is_cut_after_the_grace_period(pair: Pair) -> None:
    """100 bytes every 0.1 s never trips the 0.3 s idle timeout, but averages 1000 bytes/s
    against a minimum of 5000: cut off once the grace period (the idle timeout) is over."""
    data = os.urandom(3000)
    collector = Collector()
    taken = pair.body(len(data))
    pair.send(data, pace=0.1)
    started = time.monotonic()
    with pytest.raises(BodyTooSlow):
        run_pump(taken, [collector], 0.3, min_rate=5000, block=65536)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 1.5, elapsed
    assert collector.data and data.startswith(collector.data), "what arrived is handed on"
    assert body_threads() == []


def test_a_peer_above_the_minimum_rate_is_not_cut(pair: Pair) -> None:
    data = os.urandom(1500)
    collector = Collector()
    taken = pair.body(len(data))
    pair.send(data, pace=0.1)  # 1000 bytes/s for ~1.5 s, five times the grace period
    assert run_pump(taken, [collector], 0.3, min_rate=500, block=65536) == len(data)
    assert collector.data == data


def test_time_spent_waiting_for_consumers_is_not_held_against_the_peer(pair: Pair) -> None:
    """A slow disk (here: a consumer taking 0.3 s a block) does not make a fast peer slow.

    Five blocks arrive at once, the sixth after 1.4 s; the pump, held up by its consumer
    until about 1.2 s, then waits for the peer with 20 KiB received: 17 KB/s over the
    wall clock, below the 50 KB/s minimum, yet the peer was waited for only 0.2 s."""
    block = 4096
    data = os.urandom(6 * block)
    collector = Collector()

    def sluggish(view: memoryview) -> None:
        time.sleep(0.3)
        collector(view)

    taken = pair.body(len(data))
    pair.send(data[: 5 * block])
    late = threading.Timer(1.4, pair.peer.sendall, [data[5 * block :]])
    late.start()
    try:
        got = run_pump(taken, [sluggish], 0.5, min_rate=50_000, block=block, depth=2)
    finally:
        late.join()
    assert got == len(data)
    assert collector.data == data


def test_stop_ends_a_waiting_pump_promptly(pair: Pair) -> None:
    collector = Collector()
    taken = pair.body(100_000)
    pair.send(os.urandom(5000))  # some data, then a stall
    timer = threading.Timer(0.2, taken.stop.set)
    timer.start()
    started = time.monotonic()
    with pytest.raises(BodyStopped):
        run_pump(taken, [collector], 60.0, block=4096)
    assert time.monotonic() - started < 1.5, "stop is noticed within a poll slice"
    timer.join()
    assert body_threads() == []


def test_stop_set_before_the_pump_starts(pair: Pair) -> None:
    collector = Collector()
    taken = pair.body(100_000)
    taken.stop.set()
    pair.send(os.urandom(100_000))
    with pytest.raises(BodyStopped):
        run_pump(taken, [collector], 60.0)
    assert collector.blocks == []


class Boom(Exception):
    pass


def test_a_failing_consumer_ends_the_pump_with_its_error(pair: Pair) -> None:
    data = os.urandom(64 * 4096)
    collector = Collector()
    calls = []

    def failing(view: memoryview) -> None:
        calls.append(len(view))
        if len(calls) == 2:
            raise Boom("disk on fire")

    taken = pair.body(len(data))
    pair.send(data)
    with pytest.raises(Boom, match="disk on fire"):
        run_pump(taken, [collector, failing], 30.0, block=4096, depth=2)
    assert len(calls) == 2, "a failed consumer is not called again"
    assert len(collector.blocks) < 64, "the pump stops reading soon after the error"
    assert data.startswith(collector.data)
    assert body_threads() == []


def test_a_consumer_failing_on_the_last_block_is_reported(pair: Pair) -> None:
    data = os.urandom(3 * 4096)
    seen = []

    def failing(view: memoryview) -> None:
        seen.append(len(view))
        if sum(seen) == len(data):
            raise Boom("last")

    taken = pair.body(len(data))
    pair.send(data)
    with pytest.raises(Boom, match="last"):
        run_pump(taken, [failing], 5.0, block=4096)
    assert body_threads() == []


def test_pump_needs_a_consumer(pair: Pair) -> None:
    taken = pair.body(10)
    with pytest.raises(ValueError):
        pump(taken, [], 1.0)
    assert body_threads() == []


# ---- direct_length -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "headers", "expected"),
    [
        (DIRECT_MIN, {}, DIRECT_MIN),
        (5 * DIRECT_MIN, {"Content-Encoding": "identity"}, 5 * DIRECT_MIN),
        (5 * DIRECT_MIN, {"Content-Encoding": "IDENTITY"}, 5 * DIRECT_MIN),
        (DIRECT_MIN - 1, {}, None),
        (None, {}, None),
        (5 * DIRECT_MIN, {"Transfer-Encoding": "chunked"}, None),
        (5 * DIRECT_MIN, {"Content-Encoding": "gzip"}, None),
    ],
)
def test_direct_length(length: int | None, headers: dict[str, str], expected: int | None) -> None:
    assert direct_length(length, headers) == expected


# ---- take_over with stand-ins --------------------------------------------------------------


class FakeContent:
    """The parts of aiohttp's StreamReader that `take_over` uses."""

    def __init__(self, buffered: list[bytes], error: BaseException | None = None) -> None:
        self.buffered = list(buffered)
        self.total_bytes = sum(len(piece) for piece in buffered)
        self.error = error

    def exception(self) -> BaseException | None:
        return self.error

    def read_nowait(self) -> bytes:
        return self.buffered.pop(0) if self.buffered else b""


class FakeTransport:
    def __init__(self, sock: socket.socket | None, **extra: Any) -> None:
        self.extra = {"socket": sock, **extra}
        self.closing = False
        self.paused = 0

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def pause_reading(self) -> None:
        self.paused += 1


def test_take_over_drains_the_buffer_pauses_and_dups(pair: Pair) -> None:
    transport = FakeTransport(pair.server)
    content = FakeContent([b"abc", b"defg"])
    taken = take_over(content, transport, 100)
    assert taken is not None
    pair.bodies.append(taken)
    assert taken.head == [b"abc", b"defg"]
    assert taken.remaining == 93
    assert transport.paused == 1
    assert taken.fd >= 0 and taken.fd != pair.server.fileno()
    assert os.fstat(taken.fd).st_ino == os.fstat(pair.server.fileno()).st_ino
    # the rest of the body is read through the duplicate
    rest = os.urandom(93)
    pair.send(rest)
    collector = Collector()
    assert run_pump(taken, [collector], 5.0) == 93
    assert collector.data == rest
    taken.close()
    assert taken.fd == -1
    taken.close()  # twice is harmless
    pair.server.getsockname()  # the transport's own socket is still open


def test_take_over_of_a_fully_buffered_body(pair: Pair) -> None:
    transport = FakeTransport(pair.server)
    taken = take_over(FakeContent([b"x" * 60, b"y" * 40]), transport, 100)
    assert taken is not None
    assert taken.head == [b"x" * 60, b"y" * 40]
    assert taken.remaining == 0
    assert taken.fd == -1, "nothing left to read: no descriptor"
    assert transport.paused == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda sock: None,
        lambda sock: FakeTransport(None),
        lambda sock: FakeTransport(sock, sslcontext=object()),
        lambda sock: FakeTransport(sock, ssl_object=object()),
    ],
)
def test_take_over_refuses_tls_and_missing_sockets(
    pair: Pair, make: Callable[[socket.socket], FakeTransport | None]
) -> None:
    transport = make(pair.server)
    content = FakeContent([b"abc"])
    assert take_over(content, transport, 100) is None
    assert content.buffered == [b"abc"], "a refused body is left to aiohttp untouched"
    if transport is not None:
        assert transport.paused == 0


def test_take_over_refuses_a_closing_transport_or_failed_reader(pair: Pair) -> None:
    closing = FakeTransport(pair.server)
    closing.closing = True
    assert take_over(FakeContent([]), closing, 100) is None
    failed = FakeContent([b"abc"], error=ConnectionResetError())
    transport = FakeTransport(pair.server)
    assert take_over(failed, transport, 100) is None
    assert transport.paused == 0


# ---- take_over inside a real aiohttp server ------------------------------------------------


async def test_take_over_in_an_aiohttp_handler() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        length = request.content_length
        assert length is not None
        taken = take_over(request.content, request.transport, length)
        assert taken is not None
        try:
            hasher = hashlib.sha256()
            for piece in taken.head:
                hasher.update(piece)
            got = sum(len(piece) for piece in taken.head)
            if taken.remaining:
                # as `server.bodies.take_body` does: aiohttp must not wait for the body
                request.protocol.close()
                request.content.feed_eof()
                request.transport.pause_reading()
                got += await asyncio.to_thread(pump, taken, [hasher.update], 10.0)
        finally:
            taken.close()
        response = web.json_response(
            {"size": got, "sha256": hasher.hexdigest(), "remaining": taken.remaining}
        )
        response.force_close()
        return response

    app = web.Application()
    app.router.add_put("/body", handler)
    client = TestClient(TestServer(app, host="127.0.0.1", port=0))
    await client.start_server()
    try:
        for size in (3 * 1024 * 1024 + 5, DIRECT_MIN):
            data = os.urandom(size)
            resp = await client.put("/body", data=data)
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
            assert answer["size"] == size
            assert answer["sha256"] == hashlib.sha256(data).hexdigest()
            assert answer["remaining"] > 0, "most of the body was read by the pump"
            assert resp.headers.get("Connection", "").lower() == "close"
    finally:
        await client.close()


# ---- the cap on bodies read by threads, and drive ------------------------------------------


def test_at_most_max_bodies_are_taken_over_at_once(pair: Pair) -> None:
    """Past `MAX_BODIES` bodies in flight, the next one is left to aiohttp; closing one
    frees its slot."""
    taken = []
    try:
        for _ in range(sockbody.MAX_BODIES):
            body = take_over(FakeContent([]), FakeTransport(pair.server), 10)
            assert body is not None
            taken.append(body)
        transport = FakeTransport(pair.server)
        assert take_over(FakeContent([b"abc"]), transport, 10) is None
        assert transport.paused == 0, "a body left to aiohttp is not touched"
        taken.pop().close()
        body = take_over(FakeContent([]), FakeTransport(pair.server), 10)
        assert body is not None
        taken.append(body)
    finally:
        for body in taken:
            body.close()
    # a body with nothing left to read never holds a slot
    for _ in range(sockbody.MAX_BODIES + 1):
        assert take_over(FakeContent([b"x" * 10]), FakeTransport(pair.server), 10) is not None


async def test_drive_closes_the_descriptor_when_the_pump_returns(pair: Pair) -> None:
    taken = take_over(FakeContent([]), FakeTransport(pair.server), 1000)
    assert taken is not None
    data = os.urandom(1000)
    pair.send(data)
    collector = Collector()
    read = await drive(taken, lambda: pump(taken, [collector], 5.0), wait_when_cancelled=False)
    assert read == 1000 and collector.data == data
    await asyncio.sleep(0)  # the done callback runs on the loop
    assert taken.fd == -1


@pytest.mark.parametrize("wait", [True, False])
async def test_drive_cancelled_stops_the_pump(pair: Pair, wait: bool) -> None:
    """Cancelling the awaiting task stops a pump stalled on a silent peer; the descriptor
    is closed only once the pump has returned."""
    taken = take_over(FakeContent([]), FakeTransport(pair.server), 1000)
    assert taken is not None
    task = asyncio.ensure_future(
        drive(taken, lambda: pump(taken, [Collector()], 60.0), wait_when_cancelled=wait)
    )
    await asyncio.sleep(0.2)
    task.cancel()
    started = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert taken.stop.is_set()
    if wait:
        assert taken.fd == -1, "waited for the pump: its descriptor is closed"
    else:
        assert time.monotonic() - started < 0.2, "did not wait for the pump"
    deadline = time.monotonic() + 5
    while taken.fd != -1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert taken.fd == -1, "the pump stopped within its poll slice and let go"
