"""`BlobFlight`'s window: the latest bytes of a fetch kept in memory for readers at its head.

Unit tests of the flight object alone, on the event loop: the writer side is driven by
hand the way the fetch drives it (`arrived` before or after the bytes land, `write_sync`
+ `advance`, `commit`, `fail`), readers run as tasks that collect what `parts()` gives.
`WINDOW` and the shared `WindowBudget` are made small so a few 16-byte pieces move it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from regproxy.digest import of_bytes
from regproxy.proxy import flights
from regproxy.proxy.flights import BlobFlight, FileSpan, FlightFailed, WindowBudget
from regproxy.storage.aio import Offload

pytestmark = pytest.mark.timeout(30)

PIECE = 16
#: the window of the tests: three pieces' worth
WINDOW = 3 * PIECE
MEMORY, FILE = "memory", "file"


@pytest.fixture
def budget(monkeypatch: pytest.MonkeyPatch) -> WindowBudget:
    """A small window per flight, and a fresh budget (roomy unless a test replaces it)."""
    monkeypatch.setattr(flights, "WINDOW", WINDOW)
    fresh = WindowBudget(1024 * PIECE)
    monkeypatch.setattr(flights, "windows", fresh)
    return fresh


def body(count: int) -> list[bytes]:
    """`count` random pieces of `PIECE` bytes."""
    return [os.urandom(PIECE) for _ in range(count)]


def new_flight(tmp_path: Path, pieces: list[bytes]) -> BlobFlight:
    """A streaming flight of the blob made of `pieces`, on a real spool file."""
    spool = tmp_path / "spool"
    fd = os.open(spool, os.O_RDWR | os.O_CREAT, 0o600)
    flight = BlobFlight(of_bytes(b"".join(pieces)), spool, fd)
    flight.start_streaming(sum(len(p) for p in pieces))
    return flight


def land(flight: BlobFlight, piece: bytes) -> None:
    """`piece` written to the spool at its end so far, and readers told."""
    assert flight.write_sync([piece]) == len(piece)
    flight.advance(len(piece))


async def settle() -> None:
    """Let every woken reader run until it waits again."""
    for _ in range(5):
        await asyncio.sleep(0)


def window(flight: BlobFlight) -> bytes:
    """The bytes the flight's window holds now."""
    return b"".join(flight._recent)


class Reader:
    """A reader of a flight, attached at once, collecting `parts()` in a task: the bytes
    and, per part, where they came from and which offsets of the blob they were."""

    def __init__(self, flight: BlobFlight) -> None:
        self.flight = flight
        self.handle: BinaryIO = flight.attach()
        self.data = bytearray()
        self.spans: list[tuple[str, int, int]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for part in self.flight.parts():
                start = len(self.data)
                if isinstance(part, FileSpan):
                    assert part.start == start, "a span that does not follow the last part"
                    self.data += pread_all(self.handle, part.start, part.end)
                    source = FILE
                else:
                    for view in part:
                        self.data += view
                    source = MEMORY
                self.spans.append((source, start, len(self.data)))
        finally:
            self.flight.detach(self.handle)

    def sources(self) -> set[str]:
        return {source for source, _, _ in self.spans}

    def covered(self, source: str) -> Iterator[int]:
        """Every offset of the blob this reader got from `source`."""
        for where, start, end in self.spans:
            if where == source:
                yield from range(start, end)


def pread_all(handle: BinaryIO, start: int, end: int) -> bytes:
    """Bytes `[start, end)` of the spool, as a reader sends a `FileSpan`."""
    out = bytearray()
    while start + len(out) < end:
        got = os.pread(handle.fileno(), end - start - len(out), start + len(out))
        assert got, "the spool is shorter than the span"
        out += got
    return bytes(out)


async def test_a_head_reader_gets_pieces_from_memory_before_they_land(
    tmp_path: Path, budget: WindowBudget
) -> None:
    """Read on the event loop, each piece reaches a reader at the head from the window
    while the spool is still empty of it; the whole blob arrives exactly, all from memory."""
    pieces = body(6)
    data = b"".join(pieces)
    flight = new_flight(tmp_path, pieces)
    reader = Reader(flight)
    for i, piece in enumerate(pieces):
        flight.arrived(piece)
        await settle()
        assert flight.written == i * PIECE  # not on disk yet, and already sent
        assert bytes(reader.data) == data[: (i + 1) * PIECE - 1]
        land(flight, piece)
        await settle()
    flight.commit()
    await reader.task
    assert bytes(reader.data) == data
    assert reader.sources() == {MEMORY}
    assert flight.spool.read_bytes() == data


@pytest.mark.parametrize("limit", [0, 1024 * PIECE], ids=["spool-only", "window"])
async def test_the_last_byte_waits_for_commit(
    tmp_path: Path, budget: WindowBudget, limit: int
) -> None:
    """Every byte arrived and on disk is still one short of the blob until the flight
    commits (the digest verified); commit releases the last byte and ends the reader,
    whether the bytes come from the spool or from the window."""
    budget.limit = limit
    pieces = body(4)
    data = b"".join(pieces)
    flight = new_flight(tmp_path, pieces)
    reader = Reader(flight)
    for piece in pieces:
        flight.arrived(piece)
        land(flight, piece)
        await settle()
    await settle()
    assert flight.written == len(data)
    assert bytes(reader.data) == data[:-1]
    assert not reader.task.done()
    flight.commit()
    await asyncio.wait_for(reader.task, 5)
    assert bytes(reader.data) == data
    assert reader.sources() == ({FILE} if limit == 0 else {MEMORY})


async def test_a_late_reader_reads_the_spool_then_the_window(
    tmp_path: Path, budget: WindowBudget
) -> None:
    """A reader that starts after the window moved on (its start is past the window's)
    gets the bytes before the window as one span of the spool file and the rest from
    memory (the window's bytes on disk too: memory is cheaper than a spool page written
    past the page cache); the blob exactly."""
    pieces = body(8)
    data = b"".join(pieces)
    flight = new_flight(tmp_path, pieces)
    for piece in pieces[:6]:
        flight.arrived(piece)
        land(flight, piece)
    flight.arrived(pieces[6])  # arrived, not landed yet
    assert (flight.written, flight.received) == (6 * PIECE, 7 * PIECE)
    window = flight._recent_start
    assert window == 4 * PIECE  # the window moved on: its three latest pieces
    reader = Reader(flight)
    await settle()
    # off the window, the reader reads the spool up to where the window starts
    assert reader.spans[0] == (FILE, 0, window)
    assert bytes(reader.data) == data[: 7 * PIECE - 1]
    land(flight, pieces[6])
    flight.arrived(pieces[7])
    await settle()
    land(flight, pieces[7])
    flight.commit()
    await reader.task
    assert bytes(reader.data) == data
    assert set(reader.covered(FILE)) == set(range(window))
    assert set(reader.covered(MEMORY)) == set(range(window, len(data)))


async def test_trim_keeps_bytes_not_yet_on_disk(tmp_path: Path, budget: WindowBudget) -> None:
    """Pieces that arrived but have not landed stay in the window however far past `WINDOW`
    it grows; once they land it shrinks back to `WINDOW`, its budget with it."""
    pieces = body(8)
    data = b"".join(pieces)
    flight = new_flight(tmp_path, pieces)
    reader = Reader(flight)
    for piece in pieces:
        flight.arrived(piece)
    assert flight._recent_bytes == len(data) == budget.used
    assert (flight._recent_start, window(flight)) == (0, data)
    flight.write_sync(pieces[:2])
    flight.advance(2 * PIECE)
    # the two landed pieces go; the next is not on disk yet: the window stays past WINDOW
    assert (flight._recent_start, flight._recent_bytes) == (2 * PIECE, 6 * PIECE)
    assert window(flight) == data[2 * PIECE :]
    assert budget.used == flight._recent_bytes
    flight.write_sync(pieces[2:])
    flight.advance(6 * PIECE)
    assert flight._recent_bytes <= WINDOW
    assert budget.used == flight._recent_bytes > 0
    assert flight._recent_start + flight._recent_bytes == len(data)
    assert window(flight) == data[flight._recent_start :]
    await settle()
    flight.commit()
    await reader.task
    assert bytes(reader.data) == data
    assert budget.used == 0


async def test_pieces_past_the_budget_are_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: WindowBudget
) -> None:
    """A piece the budget refuses is not kept, and neither is a later one when the budget
    has room again while the run before the gap is not on disk yet (the window stays one
    unbroken run from the body's start). The head reader gets that run from memory and
    the rest, exactly, from the spool once it landed."""
    small = WindowBudget(3 * PIECE)
    monkeypatch.setattr(flights, "windows", small)
    assert small.take(PIECE)  # another flight's window holds one piece of the budget
    pieces = body(5)
    data = b"".join(pieces)
    flight = new_flight(tmp_path, pieces)
    reader = Reader(flight)
    for piece in pieces[:3]:
        flight.arrived(piece)
        await settle()
    assert (flight._recent_start, flight._recent_bytes, small.used) == (0, 2 * PIECE, 3 * PIECE)
    small.give(PIECE)  # the other flight ended: room for one more piece
    for piece in pieces[3:]:
        flight.arrived(piece)
        await settle()
    assert flight.received == len(data)
    assert (flight._recent_start, flight._recent_bytes) == (0, 2 * PIECE)
    assert window(flight) == data[: 2 * PIECE]  # no gap: exactly the first two pieces
    assert sum(len(p) for p in flight._recent) == flight._recent_bytes == small.used
    # what was not kept is on neither side yet: the reader waits at the end of the run
    assert bytes(reader.data) == data[: 2 * PIECE]
    for piece in pieces:
        land(flight, piece)
        await settle()
    flight.commit()
    await reader.task
    assert bytes(reader.data) == data
    assert set(reader.covered(MEMORY)) == set(range(2 * PIECE))
    assert set(reader.covered(FILE)) == set(range(2 * PIECE, len(data)))
    assert small.used == 0


async def test_a_new_run_starts_once_the_old_one_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: WindowBudget
) -> None:
    """After a refused piece, the window recovers: once the run left behind has landed,
    the next piece to arrive gives that run's budget back and starts a new run at its
    own offset, and a reader at the head is sent it from memory again."""
    small = WindowBudget(2 * PIECE)
    monkeypatch.setattr(flights, "windows", small)
    pieces = body(5)
    data = b"".join(pieces)
    flight = new_flight(tmp_path, pieces)
    reader = Reader(flight)
    for piece in pieces[:3]:  # the third is refused: the budget holds two
        flight.arrived(piece)
        await settle()
    assert (flight._recent_start, flight._recent_bytes) == (0, 2 * PIECE)
    for piece in pieces[:3]:
        land(flight, piece)
        await settle()
    flight.arrived(pieces[3])  # the old run is on disk: a new one starts here
    assert (flight._recent_start, flight._recent_bytes, small.used) == (3 * PIECE, PIECE, PIECE)
    await settle()
    land(flight, pieces[3])
    flight.arrived(pieces[4])
    await settle()
    land(flight, pieces[4])
    flight.commit()
    await reader.task
    assert bytes(reader.data) == data
    assert set(range(3 * PIECE, len(data))) <= set(reader.covered(MEMORY))
    reader_done = flight.readers == 0
    assert reader_done and small.used == 0


async def test_commit_gives_the_budget_back_with_the_last_reader(
    tmp_path: Path, budget: WindowBudget
) -> None:
    """A committed flight keeps its window while a reader is attached, and gives all its
    budget back (and closes its spool) when the last one detaches."""
    pieces = body(3)
    flight = new_flight(tmp_path, pieces)
    reader = Reader(flight)
    idle = flight.attach()  # a second reader that has not read yet
    for piece in pieces:
        flight.arrived(piece)
        land(flight, piece)
    flight.commit()
    await reader.task
    assert bytes(reader.data) == b"".join(pieces)
    assert budget.used == flight._recent_bytes == 3 * PIECE
    flight.detach(idle)
    assert budget.used == 0
    assert flight._recent_bytes == 0 and not flight._recent
    assert flight._fd == -1


async def test_fail_gives_the_budget_back_at_once(tmp_path: Path, budget: WindowBudget) -> None:
    """`fail` empties the window straight away, readers attached or not, and a reader's
    `parts()` raises the failure instead of ending."""
    pieces = body(4)
    flight = new_flight(tmp_path, pieces)
    reader = Reader(flight)
    for piece in pieces[:3]:
        flight.arrived(piece)
    await settle()
    assert budget.used == 3 * PIECE
    assert bytes(reader.data) == b"".join(pieces[:3])[:-1]
    flight.fail(FlightFailed("upstream reset"))
    assert budget.used == 0
    assert flight._recent_bytes == 0 and not flight._recent
    with pytest.raises(FlightFailed, match="upstream reset"):
        await reader.task
    assert flight.readers == 0 and flight._fd == -1
    assert not flight.spool.exists()


@pytest.mark.parametrize("end", ["commit", "fail"])
async def test_pieces_after_the_end_are_ignored(
    tmp_path: Path, budget: WindowBudget, end: str
) -> None:
    """Once the flight committed or failed, `arrived` neither keeps a piece nor counts it."""
    pieces = body(2)
    flight = new_flight(tmp_path, pieces)
    handle = flight.attach()  # keeps a committed flight's window alive
    flight.arrived(pieces[0])
    land(flight, pieces[0])
    if end == "commit":
        flight.commit()
    else:
        flight.fail(FlightFailed("gone"))
    used, received, kept = budget.used, flight.received, window(flight)
    assert used == (PIECE if end == "commit" else 0)
    flight.arrived(pieces[1])
    assert (budget.used, flight.received, window(flight)) == (used, received, kept)
    flight.detach(handle)
    assert budget.used == 0


async def test_thread_fed_blocks_start_the_window_at_their_offset(
    tmp_path: Path, budget: WindowBudget
) -> None:
    """As a pump thread feeds it: a head lands first without the window, then each block
    arrives while every byte before it is on disk and lands after. The window starts at
    the first block's offset, not 0, and a reader gets the head from the spool and the
    blocks from memory, exactly."""
    head, blocks = body(2), body(5)
    pieces = head + blocks
    data = b"".join(pieces)
    flight = new_flight(tmp_path, pieces)
    reader = Reader(flight)
    flight.write_sync(head)
    flight.advance(2 * PIECE)
    await settle()
    assert not flight._recent and flight.received == 0
    offset = 2 * PIECE
    for i, block in enumerate(blocks):
        assert flight.written == offset
        flight.arrived(block)
        if i == 0:
            assert (flight._recent_start, window(flight)) == (offset, block)
        await settle()
        assert bytes(reader.data) == data[: offset + PIECE - 1]
        assert flight.write_sync([block], offset) == PIECE
        flight.advance(PIECE)
        offset += PIECE
        await settle()
    assert flight._recent_start + flight._recent_bytes == len(data)
    assert budget.used == flight._recent_bytes <= WINDOW
    flight.commit()
    await reader.task
    assert bytes(reader.data) == data
    assert set(reader.covered(FILE)) == set(range(2 * PIECE))
    assert set(reader.covered(MEMORY)) == set(range(2 * PIECE, len(data)))


@pytest.mark.parametrize("late", [False, True], ids=["head", "late"])
async def test_read_yields_the_exact_bytes(
    tmp_path: Path, budget: WindowBudget, late: bool
) -> None:
    """`read()` (chunked responses) yields the window's views for a reader at the head,
    and spool reads then views for one that starts late; the bytes are exact either way."""
    pieces = body(8)
    data = b"".join(pieces)
    flight = new_flight(tmp_path, pieces)
    offload = Offload(2)
    if late:
        for piece in pieces[:5]:
            flight.arrived(piece)
            land(flight, piece)
    handle = flight.attach()
    chunks: list[bytes | memoryview] = []

    async def consume() -> bytes:
        try:
            out = bytearray()
            async for chunk in flight.read(handle, offload):
                chunks.append(chunk)
                out += chunk
            return bytes(out)
        finally:
            flight.detach(handle)

    task = asyncio.create_task(consume())
    try:
        for piece in pieces[5 if late else 0 :]:
            flight.arrived(piece)
            await settle()
            land(flight, piece)
            await settle()
        flight.commit()
        assert await asyncio.wait_for(task, 5) == data
    finally:
        offload.close()
    kinds = {type(chunk) for chunk in chunks}
    assert kinds == ({bytes, memoryview} if late else {memoryview})
    assert budget.used == 0
