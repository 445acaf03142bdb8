"""Large response bodies written to the client's socket by worker threads.

Why: a blob relayed from an object store arrives as 1 MiB pieces read on a storage
thread. Handed to aiohttp, each piece went to the transport, which sent what the socket
took at once, copied the rest into its buffer, and then woke the event loop for every
socket buffer's worth until it was gone: the loop took part in every step of every
relay. Here a thread writes each piece straight to the socket (a duplicate of its
descriptor), waiting for room with `poll`, while the next piece is read on another
thread; the event loop only hands the pieces over.

The caller makes sure nothing else writes to the connection meanwhile: the response's
head has left the transport's buffer, and aiohttp writes nothing until the handler
returns. Unlike `sockbody` (which reads past aiohttp's parser), the connection stays
usable for the next request: the bytes aiohttp did not see are a Content-Length body,
as with the event loop's `sendfile`.

No aiohttp import: `regproxy.aiohttp_adapter.direct_socket` finds the descriptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor

#: bodies written by threads at once; a relay beyond it waits for a thread (one thread
#: per relay, own pool, so stalled clients never starve the storage threads)
MAX_WRITERS = 32
#: how often a blocked writer checks whether it was told to stop
_POLL_SLICE = 0.25
_executor = ThreadPoolExecutor(max_workers=MAX_WRITERS, thread_name_prefix="regproxy-send")


class ClientStalled(TimeoutError):
    """The client took no byte for the idle timeout."""


class WriterStopped(ConnectionResetError):
    """The owner stopped the writer (the request was cancelled)."""


def send_all(fd: int, data: bytes | memoryview, idle_timeout: float, stop: threading.Event) -> None:
    """Write all of `data` to the non-blocking socket `fd`; in a worker thread.

    Raises `ClientStalled` when the socket takes nothing for `idle_timeout` seconds,
    `WriterStopped` once `stop` is set, and `OSError` (`BrokenPipeError`,
    `ConnectionResetError`) when the client is gone."""
    view = memoryview(data)
    sent = 0
    poller: select.poll | None = None
    last = time.monotonic()
    while sent < len(view):
        if stop.is_set():
            raise WriterStopped("stopped")
        try:
            sent += os.write(fd, view[sent:])
            last = time.monotonic()
            continue
        except (BlockingIOError, InterruptedError):
            pass
        if poller is None:
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
        left = idle_timeout - (time.monotonic() - last)
        if left <= 0:
            raise ClientStalled(f"the client took nothing for {idle_timeout:g} s")
        poller.poll(min(left, _POLL_SLICE) * 1000)


class SocketWriter:
    """Writes a response body's pieces, in order, to a duplicate of the client socket."""

    def __init__(self, fd: int, idle_timeout: float) -> None:
        self.fd = fd
        self.idle_timeout = idle_timeout
        self._stop = threading.Event()

    async def write(self, data: bytes | memoryview) -> None:
        """Send `data` from a writer thread; returns once the socket took all of it."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            _executor, send_all, self.fd, data, self.idle_timeout, self._stop
        )
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            # the thread may still be writing: stop it, and let it end before the
            # descriptor is closed (a number closed under a running write could be reused)
            self._stop.set()
            with contextlib.suppress(Exception):
                await future
            raise

    def close(self) -> None:
        """Release the duplicate (the transport keeps its own descriptor)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
