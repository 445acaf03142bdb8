"""Large response bodies written to the client's socket by worker threads.

Why: a blob relayed from an object store arrives as 1 MiB pieces read on a storage
thread. Handed to aiohttp, each piece went to the transport, which sent what the socket
took at once, copied the rest into its buffer, and then woke the event loop for every
socket buffer's worth, moving the rest of its buffer down each time: the loop took part
in every step of every relay. Here a thread writes each piece straight to the socket (a
duplicate of its descriptor) for as long as the socket takes bytes, while the next piece
is read on another thread; when the socket is full, the event loop waits for room (no
thread waits for a slow client) and hands the rest to a thread again.

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
from concurrent.futures import ThreadPoolExecutor

#: threads copying bytes into sockets at once (own pool, so relays never starve the
#: storage threads); a thread is held only while its socket takes bytes, never while a
#: client is slow, so stalled clients cannot use them up
MAX_WRITERS = 8
_executor = ThreadPoolExecutor(max_workers=MAX_WRITERS, thread_name_prefix="regproxy-send")


class ClientStalled(TimeoutError):
    """The client took no byte for the idle timeout."""


def send_some(fd: int, data: memoryview) -> int:
    """Write `data` to the non-blocking socket `fd` until it is all sent or the socket is
    full; how many bytes went. In a worker thread. Raises `OSError`
    (`BrokenPipeError`, `ConnectionResetError`) when the client is gone."""
    sent = 0
    with contextlib.suppress(BlockingIOError):
        while sent < len(data):
            try:
                sent += os.write(fd, data[sent:])
            except InterruptedError:
                continue
    return sent


class SocketWriter:
    """Writes a response body's pieces, in order, to a duplicate of the client socket."""

    def __init__(self, fd: int, idle_timeout: float) -> None:
        self.fd = fd
        self.idle_timeout = idle_timeout

    async def write(self, data: bytes | memoryview) -> None:
        """Send all of `data`; returns once the socket took it. Raises `ClientStalled`
        when the client takes nothing for `idle_timeout` seconds, `OSError` when it left."""
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            future = loop.run_in_executor(_executor, send_some, self.fd, view[sent:])
            try:
                sent += await asyncio.shield(future)
            except asyncio.CancelledError:
                # the thread may still be writing: let it end before the descriptor can
                # be closed (a number closed under a running write could be reused). It
                # stops by itself once the socket is full.
                with contextlib.suppress(Exception):
                    await future
                raise
            if sent < len(view):
                await self._writable(loop)

    async def _writable(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait, on the event loop, until the socket has room again."""
        room: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not room.done():
                room.set_result(None)

        loop.add_writer(self.fd, ready)
        try:
            async with asyncio.timeout(self.idle_timeout):
                await room
        except TimeoutError:
            raise ClientStalled(f"the client took nothing for {self.idle_timeout:g} s") from None
        finally:
            loop.remove_writer(self.fd)

    def close(self) -> None:
        """Release the duplicate (the transport keeps its own descriptor)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
