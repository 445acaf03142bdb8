"""What the threads that write response bodies straight to a client's socket share
(`splice_relay` for blobs relayed from an object store, `tls_sender` for blob files over
TLS): a bounded set of such threads, the write loop on a non-blocking socket, and how
the client's failures are told apart.

Why threads: the event loop hands over a duplicate of the client socket's descriptor
and waits (`Senders.run`); the bytes go by system calls that release the GIL (splice,
write, OpenSSL's encryption), without the event loop's per-write work, and on another
core than the event loop's. Each thread is bounded in time by the client's idle timeout
and told to stop (`stop`, looked at every `STOP_CHECK`) when its request is cancelled.
"""

from __future__ import annotations

import asyncio
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

#: how often a waiting sender looks at whether it was told to stop
STOP_CHECK = 0.25


class ClientStalled(TimeoutError):
    """The client took no byte for the idle timeout."""


class ClientGone(ConnectionError):
    """The client's connection broke (it went away)."""


class Senders:
    """At most `count` sender threads at once: a request takes a slot before it hands a
    socket to `executor` (and takes the ordinary path when none is free), so one client
    cannot queue work behind another's."""

    def __init__(self, count: int, name: str) -> None:
        self.count = count
        self._slots = threading.BoundedSemaphore(count)
        self.executor = ThreadPoolExecutor(max_workers=count, thread_name_prefix=name)

    def take(self) -> bool:
        """Reserve a slot; False when all are busy."""
        return self._slots.acquire(blocking=False)

    def free(self) -> None:
        self._slots.release()

    async def run(
        self,
        work: Callable[[], None],
        stop: threading.Event,
        release: Callable[[BaseException | None], None],
    ) -> None:
        """Run `work` on one of the threads, in the slot the caller took; raise what it
        raised. `release(error)` runs on the event loop once the thread has ended (error:
        what `work` raised, or None), then the slot is freed: what the thread uses (a
        descriptor, a socket, a TLS connection) stays the thread's until then, however
        the awaiting request ends. Cancelled (a client gone, a server stopping, once or
        more), `stop` is set and the cancellation goes on at once; the thread ends within
        `STOP_CHECK` and `release` follows."""
        job = asyncio.get_running_loop().run_in_executor(self.executor, work)

        def ended(future: asyncio.Future[None]) -> None:
            try:
                release(None if future.cancelled() else future.exception())
            finally:
                self.free()

        job.add_done_callback(ended)
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            stop.set()
            raise


def write_all(data: memoryview, fd: int, idle: float, stop: threading.Event) -> None:
    """Write `data` to the non-blocking socket `fd`, waiting for room. Raises
    ClientStalled when the client takes nothing for `idle` seconds, ClientGone when its
    connection breaks, InterruptedError when `stop` is set while waiting."""
    last = time.monotonic()
    room: select.poll | None = None
    while data:
        try:
            count = os.write(fd, data)
        except BlockingIOError:
            if stop.is_set():
                raise InterruptedError("the sender was told to stop") from None
            if time.monotonic() - last > idle:
                raise ClientStalled(f"the client took nothing for {idle:g} s") from None
            if room is None:
                room = select.poll()
                room.register(fd, select.POLLOUT)
            room.poll(STOP_CHECK * 1000)
            continue
        except OSError as exc:
            raise ClientGone(f"client went away: {exc}") from None
        data = data[count:]
        last = time.monotonic()
