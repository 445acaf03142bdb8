"""Single-flight: one upstream fetch however many requests ask at once.

`SingleFlight` shares the result of a small coroutine (a manifest revalidation).
`BlobFlight` is one blob being streamed from upstream into a spool file: every
requester, the first included, reads it at its own pace; the last byte is only
released once the digest has been verified and the blob committed, so a failed
fetch can never look like a complete body.

The bytes that just arrived are also kept in memory for a moment (the flight's
window, at most `WINDOW` bytes, `WINDOWS_TOTAL` for all flights): readers at the
head are sent them from there, not from pages of the spool written a moment
before, and the bulk of a large spool is written past the page cache
(`DirectWriter`). Why: on virtual machines such as the benchmarks' 2-core VM, a
page-cache page the guest has not used lately costs ~17 µs to fill (a 512 MiB
spool: ~2.2 CPU-seconds, bounding a cold pull at ~230 MB/s), while `O_DIRECT`
writes from reused buffers cost almost nothing. Readers behind the window read
the spool file, as every reader did before.

`Claim` extends both across processes that share a temp folder (`[server] workers`):
one of them fetches, the others follow its spool file or wait for its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple, TypeVar

from regproxy.digest import Digest, Hasher
from regproxy.storage.aio import Offload
from regproxy.storage.fs import DirectWriter
from regproxy.storage.intake import update_all

T = TypeVar("T")
READ_CHUNK = 1024 * 1024
#: the latest bytes of a fetch each flight keeps in memory for readers at its head
WINDOW = 8 * 1024 * 1024
#: …and all flights together (past it, new bytes reach readers through the spool only)
WINDOWS_TOTAL = 64 * 1024 * 1024


class WindowBudget:
    """The bytes all flights' windows hold, bounded: however many blobs are fetched at
    once, their windows never take more than `limit` bytes of memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, count: int) -> bool:
        if self.used + count > self.limit:
            return False
        self.used += count
        return True

    def give(self, count: int) -> None:
        self.used -= count


#: the budget of this process's flights
windows = WindowBudget(WINDOWS_TOTAL)


class FileSpan(NamedTuple):
    """Bytes `[start, end)` of the spool file, ready to send."""

    start: int
    end: int


class SingleFlight:
    """Concurrent callers with the same key share one running coroutine."""

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future] = {}

    async def run(self, key: Hashable, factory: Callable[[], Awaitable[T]]) -> T:
        future = self._running.get(key)
        if future is None:
            future = asyncio.ensure_future(factory())
            self._running[key] = future
            future.add_done_callback(lambda _f: self._running.pop(key, None))
        # shield: a caller that goes away must not cancel the work others wait for
        return await asyncio.shield(future)

    def joined(self, key: Hashable) -> bool:
        return key in self._running


class FlightFailed(Exception):
    """The upstream fetch failed; `status` is the upstream HTTP status when there was one;
    `stored`: the cache's object store failed, not the upstream."""

    def __init__(self, reason: str, status: int | None = None, *, stored: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.stored = stored


class BlobFlight:
    """One blob streaming from upstream into a spool file, readable while it grows."""

    CONNECTING, STREAMING, COMMITTED, FAILED = "connecting", "streaming", "committed", "failed"

    def __init__(self, digest: Digest, spool: Path, fd: int) -> None:
        self.digest = digest
        self.spool = spool
        self._fd = fd
        self.written = 0
        self.total: int | None = None
        self.state = self.CONNECTING
        self.error: FlightFailed | None = None
        self.readers = 0
        self._event = asyncio.Event()
        #: the cross-process claim this process holds on the fetch (several workers)
        self.claim: Claim | None = None
        #: the spool is this flight's own (False: another process's, followed: never removed)
        self.owns_spool = True
        #: bytes of the body seen on the event loop (`arrived`), on disk yet or not; stays
        #: 0 for a body read off the socket by a thread, or another process's spool
        self.received = 0
        #: the window: the latest arrived pieces, from offset `_recent_start` on
        self._recent: deque[bytes] = deque()
        self._recent_start = 0
        self._recent_bytes = 0
        #: spool bytes past this offset are written past the page cache (None: never)
        self.direct_from: int | None = None

    # ---- writer side (the app-owned fetch task) ----------------------------------------

    def _notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def start_streaming(self, total: int | None) -> None:
        self.total = total
        self.state = self.STREAMING
        self._notify()

    def sink(
        self, hasher: Hasher, on_landed: Callable[[int], None], *, to_window: bool = False
    ) -> SpoolSink:
        """Where the upstream body goes (`intake.take_in` / `take_in_direct`).
        `to_window`: blocks written past the page cache are also put in the window (a
        body read by a thread; one read on the event loop puts its pieces there itself)."""
        return SpoolSink(self, hasher, on_landed, asyncio.get_running_loop(), to_window)

    def write_sync(self, pieces: Sequence[bytes | memoryview], at: int | None = None) -> int:
        """Write `pieces` to the spool at `at` (default: its end so far), in a worker
        thread; returns the bytes written. Hashing runs beside it on another thread."""
        start = self.written if at is None else at
        n = 0
        for piece in pieces:
            view = memoryview(piece)
            while view:
                done = os.pwrite(self._fd, view, start + n)
                view = view[done:]
                n += done
        return n

    def arrived(self, data: bytes) -> None:
        """`data` arrived from upstream: the next bytes of the body, on disk or not yet
        (a body read on the event loop is put here before it is written; a thread's
        blocks as they are written, when every byte before them is on disk). Readers may
        be sent it from memory at once. Kept while the window and the budget have room;
        the window is one unbroken run of the body, ending at the newest byte kept."""
        count = len(data)
        if not count or self.state != self.STREAMING:
            return
        start = max(self.received, self.written)
        recent_end = self._recent_start + self._recent_bytes
        if self._recent and recent_end != start and recent_end <= self.written:
            self._release_window()  # a run left behind (the budget refused a piece), on disk
        contiguous = not self._recent or recent_end == start
        if contiguous and windows.take(count):
            if not self._recent:
                self._recent_start = start
            self._recent.append(data)
            self._recent_bytes += count
        self.received = start + count
        self._trim()
        self._notify()

    def _trim(self) -> None:
        """Drop the oldest pieces past `WINDOW`, but only once they are on disk: a reader
        always finds every byte it may send in the window or in the spool."""
        recent = self._recent
        while recent and self._recent_bytes > WINDOW:
            size = len(recent[0])
            if self._recent_start + size > self.written:
                break
            recent.popleft()
            self._recent_start += size
            self._recent_bytes -= size
            windows.give(size)

    def _release_window(self) -> None:
        windows.give(self._recent_bytes)
        self._recent.clear()
        self._recent_start += self._recent_bytes
        self._recent_bytes = 0

    def advance(self, n: int) -> None:
        self.written += n
        self._trim()
        self._notify()

    def commit(self) -> None:
        self.state = self.COMMITTED
        self._notify()
        self._maybe_close()

    def fail(self, error: FlightFailed) -> None:
        self.state = self.FAILED
        self.error = error
        self._release_window()
        if self.owns_spool:
            with contextlib.suppress(OSError):
                os.unlink(self.spool)
        self._notify()
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.readers == 0 and self.state in (self.COMMITTED, self.FAILED) and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._release_window()

    # ---- reader side --------------------------------------------------------------------

    async def wait_ready(self) -> None:
        """Until the upstream answered with a body (or failed: then raise)."""
        while self.state == self.CONNECTING:
            await self._event.wait()
        if self.state == self.FAILED:
            assert self.error is not None
            raise self.error

    async def wait_done(self) -> None:
        while self.state in (self.CONNECTING, self.STREAMING):
            await self._event.wait()
        if self.state == self.FAILED:
            assert self.error is not None
            raise self.error

    def attach(self) -> BinaryIO:
        """Become a reader: a private handle on the spool that outlives the flight's own.

        Call it right after finding the flight (before any await), so the flight cannot
        finish and close its file in between; `detach` when done.
        """
        self.readers += 1
        return os.fdopen(os.dup(self._fd), "rb", buffering=0)

    def detach(self, handle: BinaryIO) -> None:
        handle.close()
        self.readers -= 1
        self._maybe_close()

    async def parts(self) -> AsyncGenerator[FileSpan | list[memoryview], None]:
        """The whole blob as it becomes ready to send, in order: pieces from the window
        (views of the bytes that just arrived) or spans of the spool file. Raises
        `FlightFailed` on failure. The final byte is never handed out before the digest
        is verified, so a failed fetch never looks like a complete body."""
        pos = 0
        while True:
            if self.state == self.FAILED:
                assert self.error is not None
                raise self.error
            done = self.state == self.COMMITTED
            ready = max(self.written, self.received)
            limit = ready if done else ready - 1
            if pos < limit:
                views = self._from_window(pos, limit)
                if views:
                    pos += sum(len(view) for view in views)
                    yield views
                    continue
                if pos < self.written:
                    end = min(self.written, limit)
                    if self._recent and pos < self._recent_start < end:
                        end = self._recent_start  # from there on, memory
                    yield FileSpan(pos, end)
                    pos = end
                    continue
            elif done:
                return
            await self._event.wait()

    def _from_window(self, pos: int, limit: int) -> list[memoryview]:
        """Views of the window's bytes `[pos, limit)`, or none when `pos` is not in it.
        Taken at once, without awaiting: the window may move on while they are sent, and
        a view keeps its piece alive meanwhile."""
        at = self._recent_start
        if not at <= pos < at + self._recent_bytes:
            return []
        views = []
        for piece in self._recent:
            piece_end = at + len(piece)
            if piece_end > pos:
                views.append(memoryview(piece)[max(pos - at, 0) : min(limit, piece_end) - at])
            if piece_end >= limit:
                break
            at = piece_end
        return views

    async def read(
        self, handle: BinaryIO, offload: Offload
    ) -> AsyncGenerator[bytes | memoryview, None]:
        """The whole blob as it arrives, in pieces of at most `READ_CHUNK` (for chunked
        responses, whose framing sendfile cannot do)."""
        fd = handle.fileno()
        async for part in self.parts():
            if not isinstance(part, FileSpan):
                for view in part:
                    yield view
                continue
            pos, end = part
            while pos < end:
                data = await offload.run(os.pread, fd, min(READ_CHUNK, end - pos), pos)
                if not data:
                    raise FlightFailed("spool file shrank")
                pos += len(data)
                yield data


class SpoolSink:
    """A flight's spool as an `intake.Sink`: readers are told of every byte as it lands
    (blocks from the pump thread reach the loop in order, before the pump's result)."""

    def __init__(
        self,
        flight: BlobFlight,
        hasher: Hasher,
        on_landed: Callable[[int], None],
        loop: asyncio.AbstractEventLoop,
        to_window: bool = False,
    ) -> None:
        self.flight = flight
        self.hasher = hasher
        self.on_landed = on_landed
        self.loop = loop
        self.to_window = to_window

    def write(self, pieces: Sequence[bytes | memoryview]) -> int:
        return self.flight.write_sync(pieces)

    def hash(self, pieces: Sequence[bytes | memoryview]) -> None:
        update_all(self.hasher, pieces)

    def landed(self, count: int) -> None:
        self.flight.advance(count)
        self.on_landed(count)

    @contextlib.contextmanager
    def block_writer(self) -> Iterator[Callable[[memoryview], None]]:
        """Blocks written from the spool's end so far: past the page cache from the
        flight's `direct_from` on, when it has one (its readers at the head are sent the
        window, not these pages)."""
        flight = self.flight
        if flight.direct_from is None:
            at = flight.written

            def write(block: memoryview) -> None:
                nonlocal at
                at += flight.write_sync([block], at)
                self.loop.call_soon_threadsafe(self.landed, len(block))

            yield write
            return
        writer = DirectWriter(flight.spool, flight.written, flight.direct_from)
        loop = self.loop

        def write_direct(block: memoryview) -> None:
            if self.to_window:  # a copy: the block's buffer is refilled once written
                loop.call_soon_threadsafe(flight.arrived, bytes(block))
            writer.write(block)
            loop.call_soon_threadsafe(self.landed, len(block))

        try:
            yield write_direct
        finally:
            writer.close()


class Claim:
    """One fetch claimed across processes (several workers on one temp folder): a file in
    the spool folder that the fetching process holds an exclusive `flock` on.

    The holder writes its progress into the file, one JSON line (`publish`): the spool
    file's name once it has one, the size once the upstream answered, then `committed`
    or `failed`. Other processes (followers) read it (`read`) and stream the holder's
    spool as it grows, and see a holder that died without a last word by the lock being
    free (the kernel releases it with the process). The holder removes the file when done;
    a follower still reads the last state through its own descriptor.
    """

    CONNECTING, STREAMING, COMMITTED, FAILED = "connecting", "streaming", "committed", "failed"

    def __init__(self, path: Path, fd: int, holder: bool) -> None:
        self.path = path
        self.fd = fd
        self.holder = holder

    @classmethod
    def take(cls, path: Path) -> Claim:
        """Hold the claim at `path`, or follow whoever holds it (blocking: offload it)."""
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return cls(path, fd, holder=False)
            # the file may be one a finished holder just removed: then take a new one
            mine = os.fstat(fd)
            try:
                there = os.stat(path)
            except FileNotFoundError:
                there = None
            if there is None or (there.st_ino, there.st_dev) != (mine.st_ino, mine.st_dev):
                os.close(fd)
                continue
            os.ftruncate(fd, 0)  # what a holder that died left
            return cls(path, fd, holder=True)

    def publish(self, state: str, **fields: object) -> None:
        """The holder's progress (a few bytes written in place: cheap enough inline)."""
        line = json.dumps({"state": state, **fields}).encode() + b"\n"
        with contextlib.suppress(OSError):
            os.pwrite(self.fd, line, 0)
            os.ftruncate(self.fd, len(line))

    def read(self) -> dict:
        """The holder's last published state ({} before its first)."""
        data = os.pread(self.fd, 65536, 0)
        line, newline, _ = data.partition(b"\n")
        if not newline:
            return {}
        try:
            state = json.loads(line)
        except ValueError:
            return {}  # caught in the middle of a rewrite: ask again
        return state if isinstance(state, dict) else {}

    def holder_alive(self) -> bool:
        """Whether the holder still holds the claim (for a follower)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return False

    def poll(self, spool_fd: int) -> tuple[dict, int, bool]:
        """A follower's look: (the holder's state, the spool's size, holder alive or done)."""
        state = self.read()
        if state.get("state") not in (self.COMMITTED, self.FAILED) and not self.holder_alive():
            state = self.read()  # its last word may have come just before it let go
            if state.get("state") not in (self.COMMITTED, self.FAILED):
                return state, os.fstat(spool_fd).st_size, False
        return state, os.fstat(spool_fd).st_size, True

    def release(self) -> None:
        """Done with the claim: the holder removes its file first (if it still is its own)."""
        if self.fd < 0:
            return
        if self.holder:
            with contextlib.suppress(OSError):
                mine, there = os.fstat(self.fd), os.stat(self.path)
                if (there.st_ino, there.st_dev) == (mine.st_ino, mine.st_dev):
                    os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1
