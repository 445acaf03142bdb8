"""Upload sessions in `temporary_registry_storage`: offset, running hash, append, finish.

```
<temporary_registry_storage>/uploads/<id>/data    the bytes received so far
<temporary_registry_storage>/uploads/<id>/info    JSON: repository, owner, start time
```

The running sha256 lives in memory; a session found on disk after a restart
has none, and `finish` re-hashes its file instead. Writes and hashing happen
in one call per chunk so the server can do both in one thread hop.

Limits: `create` refuses sessions beyond a per-client and a global count (both
checked and taken under one lock, so concurrent creates cannot overshoot), and
`purge` drops sessions idle too long or started too long ago, never one a
request is using (`using`): abandoned sessions free their slots on their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from regproxy.digest import Digest, Hasher, new_hasher
from regproxy.errors import BlobUploadUnknown, DigestInvalid, TooManyRequests
from regproxy.storage.fs import DirectWriter, remove_tree
from regproxy.storage.intake import update_all
from regproxy.storage.store import Store

_ID_RE = re.compile(r"[0-9a-f]{32}")
HASH_BLOCK = 1024 * 1024
#: Upload bytes past this offset are written past the page cache (see `DirectWriter`).
DIRECT_FROM = 64 * 1024 * 1024


@dataclass
class UploadSession:
    id: str
    name: str
    folder: Path
    offset: int = 0
    hasher: Hasher | None = field(default=None, repr=False)
    started: float = 0.0
    owner: str | None = None
    touched: float = 0.0
    client: str | None = None  # user or address, for the per-client session limit
    users: int = 0  # requests writing to or finishing it right now: never purged meanwhile

    @property
    def data_path(self) -> Path:
        return self.folder / "data"


class Uploads:
    """All upload sessions of one temp root."""

    def __init__(self, temp_root: Path, direct_writes: bool = True) -> None:
        self.root = Path(temp_root) / "uploads"
        self.direct_from = DIRECT_FROM if direct_writes else None
        self.root.mkdir(parents=True, exist_ok=True)
        self._live: dict[str, UploadSession] = {}
        #: ids `purge` is removing: a concurrent `get` must not load them back from disk
        self._purging: set[str] = set()
        self._lock = threading.Lock()

    def create(
        self,
        name: str,
        owner: str | None = None,
        client: str | None = None,
        *,
        max_per_client: int | None = None,
        max_total: int | None = None,
    ) -> UploadSession:
        """A new session; `TooManyRequests` when `client` already holds `max_per_client`
        sessions or all clients together `max_total`."""
        upload_id = uuid.uuid4().hex
        folder = self.root / upload_id
        now = time.time()
        session = UploadSession(upload_id, name, folder, 0, new_hasher(), now, owner, now, client)
        with self._lock:
            # counted from here on, before its files exist: no concurrent create overshoots
            self._check_room(client, max_per_client, max_total)
            self._live[upload_id] = session
        try:
            folder.mkdir()
            info = {"name": name, "owner": owner, "started": now}
            (folder / "info").write_text(json.dumps(info))
            (folder / "data").touch()
        except BaseException:
            with self._lock:
                self._live.pop(upload_id, None)
            remove_tree(folder)
            raise
        return session

    def check_room(
        self, client: str | None, max_per_client: int | None, max_total: int | None
    ) -> None:
        """`TooManyRequests` unless one more session fits (a cheap early refusal; `create`
        checks again when it takes the slot)."""
        with self._lock:
            self._check_room(client, max_per_client, max_total)

    def _check_room(
        self, client: str | None, max_per_client: int | None, max_total: int | None
    ) -> None:
        if max_total is not None and len(self._live) >= max_total:
            raise TooManyRequests(
                f"the registry already holds its maximum of {max_total} open upload "
                "sessions; retry later (abandoned sessions expire)"
            )
        if max_per_client is not None:
            held = sum(1 for s in self._live.values() if s.client == client)
            if held >= max_per_client:
                raise TooManyRequests(
                    f"at most {max_per_client} upload sessions may be open at once per client"
                )

    def open_sessions(self, client: str | None) -> int:
        """How many live sessions `client` holds (for the per-client limit)."""
        with self._lock:
            return sum(1 for s in self._live.values() if s.client == client)

    def open_total(self) -> int:
        """How many live sessions all clients hold together (for the global limit)."""
        with self._lock:
            return len(self._live)

    @contextlib.contextmanager
    def using(self, session: UploadSession) -> Iterator[None]:
        """Keep `purge` off the session while a request writes to or finishes it; its
        idle time restarts when the request ends. `BlobUploadUnknown` when it was purged
        or cancelled since the request looked it up."""
        with self._lock:
            if self._live.get(session.id) is not session:
                raise BlobUploadUnknown(detail={"uuid": session.id})
            session.users += 1
        try:
            yield
        finally:
            with self._lock:
                session.users -= 1
                session.touched = time.time()

    def get(self, name: str, upload_id: str, owner: str | None = None) -> UploadSession:
        """The session `upload_id` of repository `name` started by `owner`.

        Anything else (unknown id, another repository, another user's session) is
        `BlobUploadUnknown`: a session's existence is not revealed to others.
        """
        if not _ID_RE.fullmatch(upload_id):
            raise BlobUploadUnknown(detail={"uuid": upload_id[:100]})
        with self._lock:
            session = self._live.get(upload_id)
        if session is None:
            session = self._load(upload_id)
        if session is None or session.name != name or session.owner != owner:
            raise BlobUploadUnknown(detail={"uuid": upload_id})
        return session

    def _load(self, upload_id: str) -> UploadSession | None:
        """A session left on disk by an earlier process: no running hash, offset = file size."""
        folder = self.root / upload_id
        try:
            info = json.loads((folder / "info").read_text())
            size = os.stat(folder / "data").st_size
        except (OSError, ValueError):
            return None
        session = UploadSession(
            upload_id,
            info.get("name", ""),
            folder,
            size,
            None,
            float(info.get("started", 0)),
            info.get("owner"),
            time.time(),
        )
        with self._lock:
            if upload_id in self._purging:
                return None
            session = self._live.setdefault(upload_id, session)
        return session

    def write(self, session: UploadSession, pieces: Sequence[bytes | memoryview]) -> int:
        """Append `pieces` at the session's end; return the new offset.

        Hashing is separate (the sink's `hash`) so a server can run both on two cores at
        once; each must be called in chunk order, one call at a time per session.
        """
        with open(session.data_path, "ab") as f:
            f.writelines(pieces)
        session.offset += sum(len(piece) for piece in pieces)
        session.touched = time.time()
        return session.offset

    @contextlib.contextmanager
    def appender(self, session: UploadSession) -> Iterator[Callable[[memoryview], None]]:
        """Append blocks to the session from one thread, past the page cache where aligned
        and beyond `DIRECT_FROM` (`DirectWriter`); the same ordering rules as `write`."""
        writer = DirectWriter(session.data_path, session.offset, self.direct_from)

        def append(block: memoryview) -> None:
            session.offset = writer.write(block)
            session.touched = time.time()

        try:
            yield append
        finally:
            writer.close()

    def sink(self, session: UploadSession) -> SessionSink:
        """Where a request body for `session` goes (`intake.take_in` / `take_in_direct`)."""
        return SessionSink(self, session)

    def append(self, session: UploadSession, pieces: list[bytes]) -> int:
        """Write and hash in one call (offline users; the server overlaps the two)."""
        update_all(session.hasher, pieces)
        return self.write(session, pieces)

    def _digest_of_file(self, session: UploadSession, algorithm: str) -> str:
        hasher = new_hasher(algorithm)
        with open(session.data_path, "rb") as f:
            while block := f.read(HASH_BLOCK):
                hasher.update(block)
        return hasher.hexdigest()

    def finish(self, session: UploadSession, expected: Digest, store: Store) -> int:
        """Verify the digest, then commit the bytes as a blob of the session's repository.

        A mismatch deletes the session (the upload failed) and raises `DigestInvalid`;
        nothing becomes visible.
        """
        size = os.stat(session.data_path).st_size
        if size != session.offset:
            # another process or a crash changed the file: trust only a full re-hash
            session.hasher = None
        if session.hasher is not None and expected.algorithm == "sha256":
            actual = session.hasher.hexdigest()
        else:
            actual = self._digest_of_file(session, expected.algorithm)
        if actual != expected.hex:
            self.cancel(session)
            raise DigestInvalid(
                detail={"expected": str(expected), "actual": f"{expected.algorithm}:{actual}"}
            )
        with open(session.data_path, "rb+") as f:
            os.fsync(f.fileno())
        store.commit_blob(session.name, session.data_path, expected)
        self.cancel(session)
        return size

    def cancel(self, session: UploadSession) -> None:
        # the folder goes first, so a concurrent `get` cannot reload a half-deleted session
        remove_tree(session.folder)
        with self._lock:
            self._live.pop(session.id, None)

    def rewind(self, session: UploadSession, offset: int) -> None:
        """Drop bytes after `offset` (a rejected chunk); the hash is recomputed at finish."""
        with open(session.data_path, "rb+") as f:
            f.truncate(offset)
        session.offset = offset
        session.hasher = None

    def purge(
        self, max_age: float, now: float | None = None, idle_timeout: float | None = None
    ) -> int:
        """Remove sessions started more than `max_age` seconds ago, or that received
        nothing for more than `idle_timeout` seconds; return how many.

        A session a request is using (`using`) is left alone, however old: it is looked
        at again on the next purge. Its next request after removal is `BlobUploadUnknown`.
        """
        now = time.time() if now is None else now

        def expired(started: float, last: float) -> bool:
            if now - started > max_age:
                return True
            return idle_timeout is not None and now - last > idle_timeout

        with self._lock:
            ids = set(self._live)
        with os.scandir(self.root) as entries:
            ids.update(entry.name for entry in entries if entry.is_dir())
        removed = 0
        for upload_id in ids:
            folder = self.root / upload_id
            with self._lock:
                live = self._live.get(upload_id)
            if live is not None:
                if live.users or not expired(live.started, live.touched):
                    continue
            else:
                times = self._times_on_disk(folder)
                if times is None or not expired(*times):
                    continue
            with self._lock:
                # decided again under the lock: a request may have taken it meanwhile
                live = self._live.get(upload_id)
                if live is not None:
                    if live.users or not expired(live.started, live.touched):
                        continue
                    del self._live[upload_id]
                self._purging.add(upload_id)
            try:
                remove_tree(folder)
            finally:
                with self._lock:
                    self._purging.discard(upload_id)
            removed += 1
        return removed

    @staticmethod
    def _times_on_disk(folder: Path) -> tuple[float, float] | None:
        """(started, last written) of a session this process does not hold in memory;
        None when it is gone already."""
        try:
            last = os.stat(folder).st_mtime  # a folder still being created counts as new
        except OSError:
            return None
        with contextlib.suppress(OSError):
            last = max(last, os.stat(folder / "data").st_mtime)
        started = last
        with contextlib.suppress(OSError, ValueError, TypeError, LookupError, AttributeError):
            started = float(json.loads((folder / "info").read_text())["started"])
        return started, last


class SessionSink:
    """An upload session as an `intake.Sink`: appended to its data file, hashed into its
    running hash, blocks from the socket written past the page cache (`appender`)."""

    def __init__(self, uploads: Uploads, session: UploadSession) -> None:
        self.uploads = uploads
        self.session = session

    def write(self, pieces: Sequence[bytes | memoryview]) -> int:
        before = self.session.offset
        return self.uploads.write(self.session, pieces) - before

    def hash(self, pieces: Sequence[bytes | memoryview]) -> None:
        update_all(self.session.hasher, pieces)

    def landed(self, count: int) -> None:
        """Nobody reads an upload while it arrives."""

    def block_writer(self) -> contextlib.AbstractContextManager[Callable[[memoryview], None]]:
        return self.uploads.appender(self.session)
