"""Large HTTP bodies read straight from the socket by worker threads.

Why: aiohttp hands a body over as many small `bytes` objects, each made by a `recv` on
the event loop and passed through its parser and a `StreamReader`. For a 1 GiB push or
proxy fetch that is thousands of loop iterations and allocations, and it held both to a
few hundred MB/s on one core. For a body of known length on a plain TCP socket (no TLS,
no content coding) `take_over` collects what aiohttp has already buffered, pauses the
transport and duplicates the socket's descriptor; `pump` (in a worker thread) then reads
the rest with `readv` into a few reused buffers while one thread per consumer (say:
write, hash) works through the buffers already filled, in order. The event loop does
nothing meanwhile.

An upstream's response over TLS (`take_over(..., tls=True)`) is read the same way: the
connection is lent to the pump (`asyncio_tls.take`), which reads records from the socket
into the connection's incoming memory BIO and decrypts them with its own `SSLObject`
(OpenSSL decrypts with the GIL released), so the decryption moves off the event loop too.
The loan ends, on the event loop, when the pump has returned (`TakenBody.close`).

The connection cannot carry another message afterwards: aiohttp's parser still counts
the body as pending. Whoever takes a body over closes the connection after answering.

No aiohttp import: the reader and transport are duck-typed (`BufferedBody`, `Transport`).
`regproxy.aiohttp_adapter` hands aiohttp's own to `take_over`, for the server (request
bodies) and the proxy (upstream response bodies), and its test checks they still fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import queue
import select
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

from regproxy import asyncio_tls
from regproxy.direct_send import ClientGone, ClientStalled, write_all
from regproxy.tls_sender import TlsChannel

#: Smaller bodies go through aiohttp: not worth a connection that cannot be reused.
DIRECT_MIN = 1024 * 1024
#: Bytes per buffer handed to the consumers (one write, one hash update).
BLOCK = 1024 * 1024
#: Buffers per body: the reader fills one while the consumers work on the others.
DEPTH = 3
#: How often a blocked reader checks whether it was told to stop.
_POLL_SLICE = 0.25
#: Bodies read by threads at once; more are left to aiohttp. Each holds a reader thread
#: (own pool, so stalled clients never starve the storage pool) and one per consumer.
MAX_BODIES = 32
_slots = threading.BoundedSemaphore(MAX_BODIES)
_executor = ThreadPoolExecutor(max_workers=MAX_BODIES, thread_name_prefix="regproxy-pump")
T = TypeVar("T")

Consumer = Callable[[memoryview], None]


class BufferedBody(Protocol):
    """What `take_over` uses of a body's reader (aiohttp's `StreamReader`)."""

    #: body bytes fed to the reader so far, read or not
    total_bytes: int

    def exception(self) -> BaseException | None: ...

    def read_nowait(self) -> bytes:
        """What is buffered now, b"" when nothing is."""
        ...


class Transport(Protocol):
    """What `take_over` uses of the connection's asyncio transport."""

    def is_closing(self) -> bool: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...

    def pause_reading(self) -> None: ...


class BodyTimeout(Exception):
    """The peer sent nothing for the idle timeout."""


class BodyTooSlow(BodyTimeout):
    """After a grace period, the peer averaged less than the minimum rate (a trickle that
    never stalls long enough for the idle timeout): handled like a stall."""


class BodyTruncated(ConnectionResetError):
    """The peer closed the connection before the announced length."""


class BodyStopped(Exception):
    """The owner asked the pump to stop (server shutdown, the fetch was cancelled)."""


@dataclass
class TakenBody:
    """A body taken from aiohttp: the bytes it had buffered and the socket for the rest."""

    head: list[bytes]
    remaining: int
    fd: int = -1
    stop: threading.Event = field(default_factory=threading.Event)
    #: a TLS connection lent to the pump: the rest is decrypted with its `SSLObject`
    tls: TlsChannel | None = None
    _slot: bool = field(default=False, repr=False)
    _handover: asyncio_tls.Handover | None = field(default=None, repr=False)

    def close(self, failed: bool = False) -> None:
        """Release the duplicated descriptor (the transport keeps its own) and the slot;
        end a TLS connection's loan (on the event loop: `drive` calls it there), cutting
        the connection when the pump `failed` (it may have stopped inside a record).

        Only once nothing reads the descriptor any more: `drive` does it when the pump
        returns, since a number closed under a running `readv` could be reused."""
        if self._handover is not None:
            handover, self._handover = self._handover, None
            self.fd = -1  # the loan's own duplicate, closed by `give_back`
            handover.give_back(BodyStopped("the pump failed") if failed else None)
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self._slot:
            self._slot = False
            _slots.release()


def direct_length(length: int | None, headers: Mapping[str, str]) -> int | None:
    """The body's length when it is worth taking over: large, Content-Length framed, with
    no content coding (aiohttp would decode it); else None."""
    if length is None or length < DIRECT_MIN or "Transfer-Encoding" in headers:
        return None
    if headers.get("Content-Encoding", "identity").lower() != "identity":
        return None
    return length


def plain_socket(transport: Transport | None) -> Any | None:
    """The transport's socket when it can be read directly: TCP without TLS."""
    if transport is None or transport.is_closing():
        return None
    if transport.get_extra_info("sslcontext") is not None:
        return None
    if transport.get_extra_info("ssl_object") is not None:
        return None
    return transport.get_extra_info("socket")


def take_over(
    content: BufferedBody, transport: Transport | None, length: int, *, tls: bool = False
) -> TakenBody | None:
    """Take the rest of a `length`-byte body away from aiohttp, or None if it cannot be.

    `content` is the body's reader, not read from yet. Must be called on the event loop,
    without awaiting in between, so no data callback runs meanwhile. `tls`: a connection
    with asyncio's TLS may be taken too (lent to the pump, see the module's docstring).
    """
    sock = plain_socket(transport)
    if content.exception() is not None:
        return None
    if sock is None:
        return _take_tls(content, transport, length) if tls else None
    if not _slots.acquire(blocking=False):
        return None  # `MAX_BODIES` already being read by threads: aiohttp reads this one
    head: list[bytes] = []
    try:
        while data := content.read_nowait():  # may re-feed data the paused parser held
            head.append(data)
        remaining = length - content.total_bytes
        if remaining <= 0:
            _slots.release()
            return TakenBody(head, 0)
        assert transport is not None  # it gave us its socket
        transport.pause_reading()
        return TakenBody(head, remaining, os.dup(sock.fileno()), _slot=True)
    except BaseException:
        _slots.release()
        raise


def _take_tls(content: BufferedBody, transport: Any, length: int) -> TakenBody | None:
    """`take_over` of a body on a TLS connection: the loan first (nothing has been taken
    when it cannot be had), then what aiohttp buffered."""
    if transport is None or not _slots.acquire(blocking=False):
        return None
    handover = None
    try:
        handover = asyncio_tls.take(transport)
        if handover is None:  # not asyncio's TLS, closing, or something waits to be sent
            _slots.release()
            return None
        head: list[bytes] = []
        while data := content.read_nowait():  # a resume it asks for is held by the loan
            head.append(data)
        remaining = length - content.total_bytes
        if remaining <= 0:
            handover.give_back(None)
            _slots.release()
            return TakenBody(head, 0)
        channel = handover.channel
        return TakenBody(head, remaining, channel.fd, tls=channel, _slot=True, _handover=handover)
    except BaseException:
        if handover is not None:
            handover.give_back(None)
        _slots.release()
        raise


async def drive(body: TakenBody, work: Callable[[], T], *, wait_when_cancelled: bool) -> T:
    """Run `work` (which calls `pump(body, …)`) on a body thread; return its result.

    The body's descriptor and slot are released when `work` returns. Cancelled, the pump
    is told to stop; with `wait_when_cancelled` the caller also waits until it did (when
    a consumer uses something the caller is about to close).
    """
    future = asyncio.get_running_loop().run_in_executor(_executor, work)
    future.add_done_callback(lambda done: body.close(_failed(done)))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        body.stop.set()
        if wait_when_cancelled:
            with contextlib.suppress(Exception):
                await future
        raise


def _failed(future: asyncio.Future[Any]) -> bool:
    return future.cancelled() or future.exception() is not None


class _Consumer(threading.Thread):
    """Runs one consumer over the filled buffers, in order; remembers its first error."""

    def __init__(self, consume: Consumer, release: Callable[[int], None]) -> None:
        super().__init__(name="regproxy-body", daemon=True)
        self.consume = consume
        self.release = release
        self.work: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
        self.error: BaseException | None = None

    def run(self) -> None:
        while (item := self.work.get()) is not None:
            view, index = item
            if self.error is None:
                try:
                    self.consume(view)
                except BaseException as exc:  # handed to the pump's caller
                    self.error = exc
            self.release(index)


class _Pace:
    """When to give up on the peer: silent for `idle_timeout`, or, once `idle_timeout` has
    passed, averaging less than `min_rate` bytes/s (0: no rate rule).

    The rate's clock leaves out time the pump spent waiting for its consumers: a slow disk
    is not the peer's fault."""

    def __init__(self, idle_timeout: float, min_rate: float) -> None:
        self.idle_timeout = idle_timeout
        self.min_rate = min_rate
        self.received = 0
        self.started = self.last = time.monotonic()
        self.paused = 0.0

    def pause(self, seconds: float) -> None:
        """The pump waited `seconds` for a free buffer; the idle clock restarts too."""
        self.paused += seconds
        self.last = time.monotonic()

    def got(self, n: int) -> None:
        self.received += n
        self.last = time.monotonic()

    def left(self) -> float:
        """Seconds until the peer is cut off unless more arrives; raises once it is."""
        now = time.monotonic()
        left = self.idle_timeout - (now - self.last)
        if left <= 0:
            raise BodyTimeout(f"no body data for {self.idle_timeout:g} s")
        if self.min_rate > 0:
            clock = now - self.started - self.paused
            # the average stays above `min_rate` until received / min_rate
            rate_left = max(self.idle_timeout, self.received / self.min_rate) - clock
            if rate_left <= 0:
                raise BodyTooSlow(
                    f"body arriving at {self.received / clock:.0f} bytes/s, "
                    f"below the minimum of {self.min_rate:g}"
                )
            left = min(left, rate_left)
        return left


def _wait_readable(fd: int, pace: _Pace, stop: threading.Event) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR)
    while True:
        if stop.is_set():
            raise BodyStopped("stopped")
        if poller.poll(min(pace.left(), _POLL_SLICE) * 1000):
            return


def _fill(fd: int, view: memoryview, pace: _Pace, stop: threading.Event) -> int:
    """Fill `view` from the socket; return how much arrived. Raises as `pump` says, with
    the bytes that did arrive in the exception's `filled`."""
    filled = 0
    try:
        while filled < len(view):
            try:
                n = os.readv(fd, [view[filled:]])
            except (BlockingIOError, InterruptedError):
                _wait_readable(fd, pace, stop)
                continue
            if n == 0:
                raise BodyTruncated("the connection closed before the end of the body")
            filled += n
            pace.got(n)
    except (BodyTimeout, BodyStopped, OSError) as exc:
        # how far the block got, for the caller to hand on what did arrive
        setattr(exc, "filled", filled)  # noqa: B010 - an attribute the exception types lack
        raise
    return filled


#: ciphertext read from a TLS socket per `recv` (several records)
TLS_READ = 256 * 1024


class _TlsReader:
    """Fills buffers with a lent TLS connection's plaintext: records read from the socket
    into its incoming BIO, decrypted by its `SSLObject` (see the module's docstring)."""

    def __init__(self, channel: TlsChannel) -> None:
        assert channel.incoming is not None
        self.channel = channel
        self.incoming = channel.incoming
        self.cipher = memoryview(bytearray(TLS_READ))

    def fill_from(self, fd: int, view: memoryview, pace: _Pace, stop: threading.Event) -> int:
        """As `_fill` (`fd` is the channel's), decrypting; a TLS failure or the peer's
        close_notify before the end is `BodyTruncated` (never a complete-looking body)."""
        channel, filled = self.channel, 0
        try:
            while filled < len(view):
                try:
                    # with a buffer, read() returns a count (typeshed says bytes)
                    n = cast(int, channel.sslobj.read(len(view) - filled, view[filled:]))
                except ssl.SSLWantReadError:
                    self._receive(pace, stop)
                    continue
                except ssl.SSLZeroReturnError:
                    n = 0
                except ssl.SSLError as exc:
                    raise BodyTruncated(f"TLS failed mid-body: {exc}") from None
                if n == 0:
                    raise BodyTruncated("the connection closed before the end of the body")
                filled += n
                pace.got(n)
        except (BodyTimeout, BodyStopped, OSError) as exc:
            setattr(exc, "filled", filled)  # noqa: B010 - as in `_fill`
            raise
        return filled

    def _receive(self, pace: _Pace, stop: threading.Event) -> None:
        """Records from the socket into the incoming BIO (what OpenSSL wanted to send
        meanwhile, say a key update's answer, goes out first)."""
        fd = self.channel.fd
        if self.channel.outgoing.pending:
            try:
                write_all(memoryview(self.channel.outgoing.read()), fd, pace.idle_timeout, stop)
            except ClientStalled as exc:
                raise BodyTimeout(f"the upstream took nothing: {exc}") from None
            except ClientGone as exc:
                raise BodyTruncated(str(exc)) from None
            except InterruptedError:
                raise BodyStopped("stopped") from None
        while True:
            try:
                n = os.readv(fd, [self.cipher])
            except (BlockingIOError, InterruptedError):
                _wait_readable(fd, pace, stop)
                continue
            if n == 0:
                self.incoming.write_eof()  # the next read says how the connection ended
            else:
                self.incoming.write(self.cipher[:n])
            return


def _dispatch(workers: list[_Consumer], users: list[int], view: memoryview, index: int) -> None:
    users[index] = len(workers)
    for worker in workers:
        worker.work.put((view, index))


def pump(
    body: TakenBody,
    consumers: Sequence[Consumer],
    idle_timeout: float,
    *,
    min_rate: float = 0.0,
    position: int = 0,
    block: int = BLOCK,
    depth: int = DEPTH,
) -> int:
    """Read `body.remaining` bytes from the socket and feed every consumer, in order.

    Runs in a worker thread. Each consumer gets each block once, on its own thread, in
    socket order. Blocks are page-aligned memory and, counting from `position` (where the
    first byte lands in the consumers' file), every block but the first starts at a
    multiple of `block`: a writer can send them past the page cache (`O_DIRECT`).

    The peer is cut off (`BodyTimeout`) when it sends nothing for `idle_timeout`, and
    (`BodyTooSlow`) when, `idle_timeout` after the start, it averages less than
    `min_rate` bytes/s: a byte every few seconds must not hold a reader thread forever.

    Returns the bytes read; raises `BodyTimeout`, `BodyTruncated`, `BodyStopped`, an
    `OSError` from the socket, or the first consumer's error (after every consumer
    finished what it was given, so nothing runs on when this returns).
    """
    if not consumers:
        raise ValueError("pump needs at least one consumer")
    if body.remaining <= 0:
        return 0
    size = min(block, body.remaining)
    # anonymous maps: page-aligned, and unmapped as soon as the last view is dropped
    buffers = [memoryview(mmap.mmap(-1, size)) for _ in range(depth)]
    free: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(depth):
        free.put(index)
    users = [0] * depth
    lock = threading.Lock()

    def release(index: int) -> None:
        with lock:
            users[index] -= 1
            if users[index] == 0:
                free.put(index)

    workers = [_Consumer(consume, release) for consume in consumers]
    for worker in workers:
        worker.start()
    total = 0
    want = block - position % block
    pace = _Pace(idle_timeout, min_rate)
    fill = _fill if body.tls is None else _TlsReader(body.tls).fill_from
    try:
        while total < body.remaining:
            waited = time.monotonic()
            index = free.get()
            pace.pause(time.monotonic() - waited)
            if body.stop.is_set():
                raise BodyStopped("stopped")
            if any(worker.error is not None for worker in workers):
                break
            view = buffers[index][: min(want, size, body.remaining - total)]
            try:
                fill(body.fd, view, pace, body.stop)
            except (BodyTimeout, BodyStopped, OSError) as exc:
                # what did arrive is kept (an upload can resume after it), then the error
                if filled := getattr(exc, "filled", 0):
                    _dispatch(workers, users, view[:filled], index)
                raise
            total += len(view)
            want = block
            _dispatch(workers, users, view, index)
    finally:
        for worker in workers:
            worker.work.put(None)
        for worker in workers:
            worker.join()
    for worker in workers:
        if worker.error is not None:
            raise worker.error
    return total
