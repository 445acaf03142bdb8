"""The one write-and-hash pipeline (`storage.intake`): order, overlap, and no work left
running when the source fails."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import pytest

from regproxy.storage.aio import Offload
from regproxy.storage.intake import BATCH_BYTES, take_in


class RecordingSink:
    """Writes into memory, slowly, and records what ran where."""

    def __init__(self, write_delay: float = 0.0) -> None:
        self.data = bytearray()
        self.hasher = hashlib.sha256()
        self.landed_total = 0
        self.write_delay = write_delay
        self.writing = False
        self.overlapped = False
        self.lock = threading.Lock()

    def write(self, pieces: Sequence[bytes | memoryview]) -> int:
        with self.lock:
            assert not self.writing, "writes must not overlap"
            self.writing = True
        time.sleep(self.write_delay)
        for piece in pieces:
            self.data += piece
        self.writing = False
        return sum(len(p) for p in pieces)

    def hash(self, pieces: Sequence[bytes | memoryview]) -> None:
        if self.writing:
            self.overlapped = True
        for piece in pieces:
            self.hasher.update(piece)

    def landed(self, count: int) -> None:
        self.landed_total += count
        assert self.landed_total <= len(self.data)

    def block_writer(self) -> contextlib.AbstractContextManager[Callable[[memoryview], None]]:
        @contextlib.contextmanager
        def writer() -> Iterator[Callable[[memoryview], None]]:
            def write(block: memoryview) -> None:
                self.write([bytes(block)])
                self.landed(len(block))  # a block writer reports what landed itself

            yield write

        return writer()


async def pieces_of(data: bytes, size: int, fail_after: int | None = None) -> AsyncIterator[bytes]:
    for n, start in enumerate(range(0, len(data), size)):
        if fail_after is not None and n == fail_after:
            raise ConnectionResetError("the peer went away")
        yield data[start : start + size]


async def test_bytes_arrive_in_order_hashed_once() -> None:
    offload = Offload(4)
    try:
        data = bytes(range(256)) * 20_000  # 5 MB
        sink = RecordingSink(write_delay=0.01)
        received = await take_in(pieces_of(data, 64 * 1024), sink, offload)
        assert received == len(data)
        assert bytes(sink.data) == data
        assert sink.hasher.digest() == hashlib.sha256(data).digest()
        assert sink.landed_total == len(data)
    finally:
        offload.close()


async def test_on_data_can_refuse_and_nothing_keeps_running() -> None:
    offload = Offload(4)
    try:
        data = b"x" * (3 * BATCH_BYTES)
        sink = RecordingSink(write_delay=0.05)
        seen = 0

        def limit(size: int) -> None:
            nonlocal seen
            seen += size
            if seen > 2 * BATCH_BYTES:
                raise ValueError("more than announced")

        with pytest.raises(ValueError):
            await take_in(pieces_of(data, 256 * 1024), sink, offload, limit)
        assert not sink.writing  # the write in flight finished before take_in returned
        with pytest.raises(ConnectionResetError):
            await take_in(pieces_of(data, 256 * 1024, fail_after=5), RecordingSink(), offload)
    finally:
        offload.close()
