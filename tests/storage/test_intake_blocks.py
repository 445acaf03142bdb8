"""`intake.take_in` past `BLOCKS_AFTER`: a large body that aiohttp reads (TLS, chunked
transfer coding) goes to the sink's block writer in page-aligned `BLOCK`-byte blocks."""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import pytest

from regproxy.storage import intake
from regproxy.storage.aio import Offload
from regproxy.storage.intake import BLOCK, BLOCKS_AFTER, take_in


class BlockSink:
    """Records pieces written with `write` and blocks written with the block writer."""

    def __init__(self, fail_block: int | None = None) -> None:
        self.data = bytearray()
        self.hasher = hashlib.sha256()
        self.pieces = 0
        self.blocks: list[tuple[int, int, bool]] = []  # (offset, length, page-aligned memory)
        self.entered = self.exited = 0
        self.fail_block = fail_block
        self.lock = threading.Lock()
        self.busy = False

    def _enter(self) -> None:
        with self.lock:
            assert not self.busy, "writes overlapped"
            self.busy = True

    def write(self, pieces: Sequence[bytes | memoryview]) -> int:
        self._enter()
        try:
            for piece in pieces:
                self.data += piece
            self.pieces += 1
            return sum(len(p) for p in pieces)
        finally:
            self.busy = False

    def hash(self, pieces: Sequence[bytes | memoryview]) -> None:
        for piece in pieces:
            self.hasher.update(piece)

    def landed(self, count: int) -> None:
        pass

    def block_writer(self) -> contextlib.AbstractContextManager[Callable[[memoryview], None]]:
        @contextlib.contextmanager
        def writer() -> Iterator[Callable[[memoryview], None]]:
            self.entered += 1

            def write(block: memoryview) -> None:
                if self.fail_block is not None and len(self.blocks) == self.fail_block:
                    raise OSError(28, "No space left on device")
                self._enter()
                try:
                    aligned = _address(block) % mmap.PAGESIZE == 0
                    self.blocks.append((len(self.data), len(block), aligned))
                    self.data += block
                finally:
                    self.busy = False

            try:
                yield write
            finally:
                self.exited += 1

        return writer()


def _address(view: memoryview) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view))


async def pieces_of(data: bytes, size: int, fail_at: int | None = None) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        if fail_at is not None and start >= fail_at:
            raise ConnectionResetError("the peer went away")
        yield data[start : start + size]


@pytest.fixture
async def offload() -> AsyncIterator[Offload]:
    pool = Offload(4)
    try:
        yield pool
    finally:
        pool.close()


@pytest.mark.parametrize("piece", [32 * 1024, 100_003, 3 * 1024 * 1024])
async def test_a_large_body_goes_in_aligned_blocks(offload: Offload, piece: int) -> None:
    data = os.urandom(5 * BLOCK + 12_345)
    sink = BlockSink()
    assert await take_in(pieces_of(data, piece), sink, offload) == len(data)
    assert bytes(sink.data) == data
    assert sink.hasher.digest() == hashlib.sha256(data).digest()
    assert sink.entered == sink.exited == 1
    # the first BLOCKS_AFTER bytes as pieces, the rest in full blocks but the last
    assert sink.blocks[0][0] == BLOCKS_AFTER
    assert [length for _, length, _ in sink.blocks[:-1]] == [BLOCK] * (len(sink.blocks) - 1)
    assert all(offset % BLOCK == 0 and aligned for offset, _, aligned in sink.blocks)


async def test_a_small_body_never_uses_blocks(offload: Offload) -> None:
    data = os.urandom(BLOCKS_AFTER)
    sink = BlockSink()
    await take_in(pieces_of(data, 64 * 1024), sink, offload)
    assert bytes(sink.data) == data
    assert sink.entered == 0 and not sink.blocks


async def test_a_source_failing_mid_block_keeps_what_arrived(offload: Offload) -> None:
    data = os.urandom(4 * BLOCK)
    sink = BlockSink()
    cut = 2 * BLOCK + 5 * 32 * 1024
    with pytest.raises(ConnectionResetError):
        await take_in(pieces_of(data, 32 * 1024, fail_at=cut), sink, offload)
    # every byte received was written and hashed, in order: an upload resumes from there
    assert bytes(sink.data) == data[:cut]
    assert sink.hasher.digest() == hashlib.sha256(data[:cut]).digest()
    assert sink.entered == sink.exited == 1


async def test_a_failing_block_write_stops_the_body(offload: Offload) -> None:
    data = os.urandom(6 * BLOCK)
    sink = BlockSink(fail_block=1)
    with pytest.raises(OSError, match="No space"):
        await take_in(pieces_of(data, 64 * 1024), sink, offload)
    assert sink.exited == 1
    # nothing after the failed block was written
    assert len(sink.data) == BLOCKS_AFTER + BLOCK


def test_the_block_depth_bounds_memory() -> None:
    assert intake.BLOCK_DEPTH * BLOCK <= 4 * 1024 * 1024
