"""Upload sessions in `temporary_registry_storage`: offset, running hash, append, finish.

```
<temporary_registry_storage>/uploads/<id>/data    the bytes received so far
<temporary_registry_storage>/uploads/<id>/info    JSON: repository, owner, start time
```

The running sha256 lives in memory; a session found on disk after a restart
has none, and `finish` re-hashes its file instead. Writes and hashing happen
in one call per chunk so the server can do both in one thread hop.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from regproxy.digest import Digest, Hasher, new_hasher
from regproxy.errors import BlobUploadUnknown, DigestInvalid
from regproxy.storage.fs import DirectWriter, remove_tree
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
        self._lock = threading.Lock()

    def create(
        self, name: str, owner: str | None = None, client: str | None = None
    ) -> UploadSession:
        upload_id = uuid.uuid4().hex
        folder = self.root / upload_id
        folder.mkdir()
        now = time.time()
        info = {"name": name, "owner": owner, "started": now}
        (folder / "info").write_text(json.dumps(info))
        (folder / "data").touch()
        session = UploadSession(upload_id, name, folder, 0, new_hasher(), now, owner, now, client)
        with self._lock:
            self._live[upload_id] = session
        return session

    def open_sessions(self, client: str | None) -> int:
        """How many live sessions `client` holds (for the per-client limit)."""
        with self._lock:
            return sum(1 for s in self._live.values() if s.client == client)

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
            session = self._live.setdefault(upload_id, session)
        return session

    def write(self, session: UploadSession, pieces: list[bytes]) -> int:
        """Append `pieces` at the session's end; return the new offset.

        Hashing is separate (`hash`) so a server can run both on two cores at once;
        each must be called in chunk order, one call at a time per session.
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

    def hash(self, session: UploadSession, pieces: list[bytes]) -> None:
        hasher = session.hasher
        if hasher is not None:
            for piece in pieces:
                hasher.update(piece)

    def append(self, session: UploadSession, pieces: list[bytes]) -> int:
        """Write and hash in one call (offline users; the server overlaps the two)."""
        self.hash(session, pieces)
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

    def purge(self, max_age: float, now: float | None = None) -> int:
        """Remove sessions idle for longer than `max_age` seconds; return how many."""
        now = time.time() if now is None else now
        removed = 0
        for entry in os.scandir(self.root):
            if not entry.is_dir():
                continue
            with self._lock:
                live = self._live.get(entry.name)
            try:
                last = live.touched if live else os.stat(Path(entry.path) / "data").st_mtime
            except OSError:
                last = 0.0
            if now - last > max_age:
                with self._lock:
                    self._live.pop(entry.name, None)
                remove_tree(Path(entry.path))
                removed += 1
        return removed
