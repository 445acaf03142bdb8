"""Bytes arriving from the network into a file that becomes a blob: written once, hashed
once, in order, with the network read overlapping the disk and the hash.

Two things receive blob bytes: an upload session (a push) and a proxy spool (a pull
through the cache). Each is a `Sink`: where a list of pieces is written, how it is
hashed, what happens when bytes land. Two sources feed a sink:

- a body aiohttp reads (small, chunked, TLS): `take_in`, on the event loop, gathers
  pieces while the previous batch is written and hashed on two storage threads;
- a body taken off the socket (`sockbody`): `pump_in`, on a pump thread, hands the
  same sink page-aligned blocks from the pump's reader thread.

So following an upload's bytes to disk is: the handler picks a source, this module
runs it, the sink (`Uploads.sink`, `BlobFlight.sink`) writes and hashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterable, Callable, Sequence
from typing import Protocol

from regproxy.digest import Hasher
from regproxy.sockbody import TakenBody, drive, pump
from regproxy.storage.aio import Offload

#: bytes gathered at most before they are handed to the threads, however busy they are
BATCH_BYTES = 1024 * 1024

Buffer = bytes | memoryview


class Sink(Protocol):
    """Where received bytes go. `write` and `hash` run on threads, each called in order
    and one call at a time; `landed` runs on the event loop after each write."""

    def write(self, pieces: Sequence[Buffer]) -> int:
        """Append `pieces`; return the bytes written."""

    def hash(self, pieces: Sequence[Buffer]) -> None: ...

    def landed(self, count: int) -> None:
        """`count` more bytes are on disk (readers of a spool may send them)."""

    def block_writer(self) -> contextlib.AbstractContextManager[Callable[[memoryview], None]]:
        """A writer for the pump's blocks, used from one thread (may write past the
        page cache: the blocks are page-aligned); it calls `landed` itself as it needs."""


def update_all(hasher: Hasher | None, pieces: Sequence[Buffer]) -> None:
    """Feed `pieces` to `hasher` in order (None: the hash is recomputed later)."""
    if hasher is not None:
        for piece in pieces:
            hasher.update(piece)


async def take_in(
    source: AsyncIterable[bytes],
    sink: Sink,
    offload: Offload,
    on_data: Callable[[int], None] | None = None,
) -> int:
    """Receive `source` into `sink`; return the bytes received.

    A batch is handed to the threads as soon as they are idle, or when it reaches
    `BATCH_BYTES`: a slow source is written as it trickles in, a fast one in large
    writes. `on_data` sees each piece's size as it arrives (accounting, limits) and may
    raise. Whatever happens, work already on a thread finishes before this returns, so
    the sink's file, offset and hash always agree.
    """
    writing: asyncio.Future[int] | None = None
    hashing: asyncio.Future[None] | None = None
    batch: list[bytes] = []
    batched = received = 0

    async def hand_over() -> None:
        nonlocal writing, hashing, batch, batched
        if writing is not None:
            sink.landed(await writing)
            writing = None
        if hashing is not None:
            await hashing
            hashing = None
        if batch:
            writing = asyncio.ensure_future(offload.run(sink.write, batch))
            hashing = asyncio.ensure_future(offload.run(sink.hash, batch))
            batch, batched = [], 0

    try:
        async for data in source:
            if on_data is not None:
                on_data(len(data))
            batch.append(data)
            batched += len(data)
            received += len(data)
            idle = (writing is None or writing.done()) and (hashing is None or hashing.done())
            if batched >= BATCH_BYTES or idle:
                await hand_over()
        await hand_over()
        await hand_over()
    finally:
        # never leave a write running under a caller that is about to drop the file
        for work in (writing, hashing):
            if work is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(work)
    return received


def pump_in(taken: TakenBody, sink: Sink, timeout: float, min_rate: float, position: int) -> int:
    """In a worker thread: the socket's remaining bytes written to and hashed into `sink`.
    `position` is where the first block lands in the sink's file (block alignment)."""
    with sink.block_writer() as write:
        hash_block: Callable[[memoryview], None] = lambda block: sink.hash([block])  # noqa: E731
        return pump(taken, [write, hash_block], timeout, min_rate=min_rate, position=position)


async def take_in_direct(
    taken: TakenBody,
    sink: Sink,
    offload: Offload,
    *,
    timeout: float,
    min_rate: float,
    position: int,
    wait_when_cancelled: bool,
) -> int:
    """A body taken off the socket into `sink`: what aiohttp had buffered (`taken.head`)
    through the storage threads, the rest by `pump_in`; returns the bytes received.

    Raises what `sockbody.pump` raises (`BodyTimeout`, `BodyTruncated`, …)."""
    head = sum(len(piece) for piece in taken.head)
    try:
        if taken.head:
            written = await offload.run(sink.write, taken.head)
            await offload.run(sink.hash, taken.head)
            sink.landed(written)
    except BaseException:
        taken.close()
        raise
    if not taken.remaining:
        return head
    work = functools.partial(pump_in, taken, sink, timeout, min_rate, position + head)
    await drive(taken, work, wait_when_cancelled=wait_when_cancelled)
    return head + taken.remaining
