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
import mmap
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
    writes. Past the first `BLOCKS_AFTER` bytes the rest goes in `BLOCK`-byte blocks
    (`_Blocks`). `on_data` sees each piece's size as it arrives (accounting, limits) and
    may raise. Whatever happens, work already on a thread finishes before this returns, so
    the sink's file, offset and hash always agree.
    """
    writing: asyncio.Future[int] | None = None
    hashing: asyncio.Future[None] | None = None
    batch: list[bytes] = []
    batched = received = 0
    blocks: _Blocks | None = None

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
        iterator = aiter(source)
        rest = b""
        async for data in iterator:
            if on_data is not None:
                on_data(len(data))
            if received + len(data) > BLOCKS_AFTER:
                # the blocks start exactly BLOCKS_AFTER bytes into the body: aligned in
                # the file when the body starts aligned (O_DIRECT needs it)
                data, rest = data[: BLOCKS_AFTER - received], data[BLOCKS_AFTER - received :]
            batch.append(data)
            batched += len(data)
            received += len(data)
            idle = (writing is None or writing.done()) and (hashing is None or hashing.done())
            if batched >= BATCH_BYTES or idle:
                await hand_over()
            if rest:
                break
        await hand_over()
        await hand_over()
        if rest:
            blocks = _Blocks(sink, offload)
            await blocks.open()
            received += len(rest)
            await blocks.add(rest)
            del rest
            try:
                async for data in iterator:
                    if on_data is not None:
                        on_data(len(data))
                    received += len(data)
                    await blocks.add(data)
            except Exception:
                # the source failed (the peer left, stalled): what did arrive is stored
                # as before, so an upload can resume from it
                with contextlib.suppress(Exception):
                    await blocks.finish()
                raise
            await blocks.finish()
    finally:
        # never leave a write running under a caller that is about to drop the file
        for work in (writing, hashing):
            if work is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(work)
        if blocks is not None:
            await blocks.close()
    return received


#: bytes `take_in` hands over as they come before it gathers the rest into blocks (a
#: small body, a manifest-sized PATCH, stays as it was)
BLOCKS_AFTER = 1024 * 1024
#: bytes per block `take_in` hands to the sink's block writer and hasher
BLOCK = 1024 * 1024
#: blocks per body: one filled on the event loop while the threads write and hash the
#: others; the body's memory is `BLOCK_DEPTH * BLOCK`, however large it is
BLOCK_DEPTH = 3


class _Blocks:
    """The rest of a large body that aiohttp reads (TLS, chunked transfer coding) copied
    into page-aligned blocks of `BLOCK` bytes, each written with the sink's block writer
    (`O_DIRECT` past the page cache where it may, as the pump's blocks are) and hashed,
    on two storage threads, while the event loop fills the next block.

    Why: handed over as it arrives, such a body cost two thread hops per piece aiohttp
    yields (16-256 KiB: a TLS read, a 32 KiB HTTP chunk), and buffered appends; a large
    TLS push ran at ~130 MB/s using ~6 CPU-seconds per GiB. A block costs one copy of
    its bytes on the event loop and two hops per MiB."""

    def __init__(self, sink: Sink, offload: Offload) -> None:
        self.sink = sink
        self.offload = offload
        # anonymous maps: page-aligned, as O_DIRECT wants
        self.buffers = [mmap.mmap(-1, BLOCK) for _ in range(BLOCK_DEPTH)]
        self.busy: list[asyncio.Future[None] | None] = [None] * BLOCK_DEPTH
        self.last: asyncio.Future[None] | None = None
        self.current = 0
        self.filled = 0
        self.manager: contextlib.AbstractContextManager[Callable[[memoryview], None]] | None
        self.manager = None
        self.write: Callable[[memoryview], None] | None = None

    async def open(self) -> None:
        """Enter the sink's block writer on a thread (it opens files)."""
        manager = self.sink.block_writer()
        self.write = await self.offload.run(manager.__enter__)
        self.manager = manager

    async def add(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            buffer = self.buffers[self.current]
            n = min(len(view), BLOCK - self.filled)
            buffer[self.filled : self.filled + n] = view[:n]
            self.filled += n
            view = view[n:]
            if self.filled == BLOCK:
                await self._dispatch()

    async def _dispatch(self) -> None:
        """Hand the current block to the threads; wait until the next buffer is free."""
        if self.filled:
            block = memoryview(self.buffers[self.current])[: self.filled]
            self.last = asyncio.ensure_future(self._store(block, self.last))
            self.busy[self.current] = self.last
            self.current = (self.current + 1) % BLOCK_DEPTH
            self.filled = 0
        pending, self.busy[self.current] = self.busy[self.current], None
        if pending is not None:
            await pending

    async def _store(self, block: memoryview, previous: asyncio.Future[None] | None) -> None:
        """Write and hash one block, the two on two threads, after the block before it (the
        writer and the hasher take blocks in order, one call at a time)."""
        if previous is not None:
            await previous
        assert self.write is not None
        writing = asyncio.ensure_future(self.offload.run(self.write, block))
        try:
            await self.offload.run(self.sink.hash, [block])
        finally:
            await asyncio.shield(writing)  # never left running, even when cancelled
        writing.result()

    async def finish(self) -> None:
        """The last, partial block; then every block stored (errors raised)."""
        await self._dispatch()
        if self.last is not None:
            await self.last

    async def close(self) -> None:
        """Wait for every block still on a thread, leave the block writer, free the maps."""
        for pending in [*self.busy, self.last]:
            if pending is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.shield(pending)
        self.busy = [None] * BLOCK_DEPTH
        if self.manager is not None:
            manager, self.manager = self.manager, None
            await self.offload.run(manager.__exit__, None, None, None)
        for buffer in self.buffers:
            with contextlib.suppress(BufferError):
                buffer.close()


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
