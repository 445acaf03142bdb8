"""Single-flight: one upstream fetch however many requests ask at once.

`SingleFlight` shares the result of a small coroutine (a manifest revalidation).
`BlobFlight` is one blob being streamed from upstream into a spool file: every
requester, the first included, reads the spool at its own pace; the last byte
is only released once the digest has been verified and the blob committed, so
a failed fetch can never look like a complete body.

`Claim` extends both across processes that share a temp folder (`[server] workers`):
one of them fetches, the others follow its spool file or wait for its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar

from regproxy.digest import Digest, Hasher
from regproxy.storage.aio import Offload
from regproxy.storage.intake import update_all

T = TypeVar("T")
READ_CHUNK = 1024 * 1024


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

    # ---- writer side (the app-owned fetch task) ----------------------------------------

    def _notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def start_streaming(self, total: int | None) -> None:
        self.total = total
        self.state = self.STREAMING
        self._notify()

    def sink(self, hasher: Hasher, on_landed: Callable[[int], None]) -> SpoolSink:
        """Where the upstream body goes (`intake.take_in` / `take_in_direct`)."""
        return SpoolSink(self, hasher, on_landed, asyncio.get_running_loop())

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

    def advance(self, n: int) -> None:
        self.written += n
        self._notify()

    def commit(self) -> None:
        self.state = self.COMMITTED
        self._notify()
        self._maybe_close()

    def fail(self, error: FlightFailed) -> None:
        self.state = self.FAILED
        self.error = error
        if self.owns_spool:
            with contextlib.suppress(OSError):
                os.unlink(self.spool)
        self._notify()
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.readers == 0 and self.state in (self.COMMITTED, self.FAILED) and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

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

    async def spans(self) -> AsyncGenerator[tuple[int, int], None]:
        """(start, end) ranges of the spool ready to send, in order, until the whole blob;
        raises `FlightFailed` on failure. The final byte is never handed out before the
        digest is verified, so a failed fetch never looks like a complete body."""
        pos = 0
        while True:
            if self.state == self.FAILED:
                assert self.error is not None
                raise self.error
            limit = self.written if self.state == self.COMMITTED else self.written - 1
            if pos < limit:
                yield pos, limit
                pos = limit
                continue
            if self.state == self.COMMITTED:
                return
            await self._event.wait()

    async def read(self, handle: BinaryIO, offload: Offload) -> AsyncGenerator[bytes, None]:
        """The whole blob as it arrives, in pieces of at most `READ_CHUNK` (for chunked
        responses, whose framing sendfile cannot do)."""
        fd = handle.fileno()
        async for start, end in self.spans():
            pos = start
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
    ) -> None:
        self.flight = flight
        self.hasher = hasher
        self.on_landed = on_landed
        self.loop = loop

    def write(self, pieces: Sequence[bytes | memoryview]) -> int:
        return self.flight.write_sync(pieces)

    def hash(self, pieces: Sequence[bytes | memoryview]) -> None:
        update_all(self.hasher, pieces)

    def landed(self, count: int) -> None:
        self.flight.advance(count)
        self.on_landed(count)

    @contextlib.contextmanager
    def block_writer(self) -> Iterator[Callable[[memoryview], None]]:
        at = self.flight.written

        def write(block: memoryview) -> None:
            nonlocal at
            at += self.flight.write_sync([block], at)
            self.loop.call_soon_threadsafe(self.landed, len(block))

        yield write


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
