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

Shared mode (`lock_folder` given: several processes serve one temp root, `[server]
workers`): a session started by one process continues on any other, so what counts is
on disk, and each process's memory is a cache of it.

```
<temporary_registry_storage>/uploads/<id>/lock    flock: held by the request appending
<temporary_registry_storage>/uploads/<id>/hashed  JSON: size and sha256 of the bytes so far
```

- A PATCH or PUT holds the session's lock file for the whole request (`acquire` /
  `release`): two processes never append to one session at once.
- Under the lock, `acquire` compares the data file's size with the offset this process
  knows. Equal (the session did not move): nothing to do, and every byte is hashed once,
  as it arrives. Larger: other processes appended; the running hash (a `hashlib` state
  cannot be handed over) catches up by reading only those bytes, or the whole prefix when
  this process never saw the session (a session that moved right after its POST has no
  prefix yet: docker's POST, PATCH, PUT costs nothing however they are spread).
- After each PATCH the process that appended records the digest of the bytes so far
  (`hashed`), so a PUT without a body answered by any process needs no hashing at all.
- `create` takes `<lock_folder>/uploads.lock` and counts the sessions on disk (the
  client of each is in its `info`), so the limits hold across processes; `purge` skips a
  session whose lock another process holds, and judges idleness by the data file's mtime.
"""

from __future__ import annotations

import contextlib
import fcntl
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
    #: shared mode: the running hash covers only the first `hashed` bytes (None: `offset`)
    hashed: int | None = None

    @property
    def data_path(self) -> Path:
        return self.folder / "data"


class Uploads:
    """All upload sessions of one temp root."""

    def __init__(
        self,
        temp_root: Path,
        direct_writes: bool = True,
        lock_folder: Path | None = None,
        id_prefix: str = "",
    ) -> None:
        self.root = Path(temp_root) / "uploads"
        #: session ids start with it: the replica that holds the session (`replicas`)
        self.id_prefix = id_prefix
        self.direct_from = DIRECT_FROM if direct_writes else None
        self.root.mkdir(parents=True, exist_ok=True)
        #: other processes serve the same sessions (see the module's docstring)
        self.shared = lock_folder is not None
        self._create_lock = lock_folder / "uploads.lock" if lock_folder is not None else None
        if lock_folder is not None:
            lock_folder.mkdir(parents=True, exist_ok=True)
        #: shared mode: the client of each session on disk, read once from its info file
        self._clients: dict[str, str | None] = {}
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
        upload_id = (self.id_prefix + uuid.uuid4().hex)[:32]
        folder = self.root / upload_id
        now = time.time()
        session = UploadSession(upload_id, name, folder, 0, new_hasher(), now, owner, now, client)
        if self._create_lock is not None:
            return self._create_shared(session, max_per_client, max_total)
        with self._lock:
            # counted from here on, before its files exist: no concurrent create overshoots
            self._check_room(client, max_per_client, max_total)
            self._live[upload_id] = session
        try:
            self._write_files(session)
        except BaseException:
            with self._lock:
                self._live.pop(upload_id, None)
            remove_tree(folder)
            raise
        return session

    def _write_files(self, session: UploadSession) -> None:
        session.folder.mkdir()
        info = {
            "name": session.name,
            "owner": session.owner,
            "started": session.started,
            "client": session.client,
        }
        (session.folder / "info").write_text(json.dumps(info))
        (session.folder / "data").touch()

    def _create_shared(
        self, session: UploadSession, max_per_client: int | None, max_total: int | None
    ) -> UploadSession:
        """`create` when other processes create sessions too: counted on disk, under a lock
        file all of them take (a few hundred microseconds per POST)."""
        assert self._create_lock is not None
        fd = os.open(self._create_lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._check_room_on_disk(session.client, max_per_client, max_total)
            try:
                self._write_files(session)
            except BaseException:
                remove_tree(session.folder)
                raise
            self._clients[session.id] = session.client
            with self._lock:
                self._live[session.id] = session
        finally:
            os.close(fd)
        return session

    def _check_room_on_disk(
        self, client: str | None, max_per_client: int | None, max_total: int | None
    ) -> None:
        with os.scandir(self.root) as entries:
            ids = [entry.name for entry in entries if entry.is_dir(follow_symlinks=False)]
        if max_total is not None and len(ids) >= max_total:
            raise TooManyRequests(
                f"the registry already holds its maximum of {max_total} open upload "
                "sessions; retry later (abandoned sessions expire)"
            )
        if max_per_client is None:
            return
        known, self._clients = self._clients, {}
        held = 0
        for upload_id in ids:
            if upload_id in known:
                owner = known[upload_id]
            else:
                info = _read_info(self.root / upload_id)
                if info is None:
                    continue  # being created or removed right now
                owner = info.get("client")
            self._clients[upload_id] = owner
            held += owner == client
        if held >= max_per_client:
            raise TooManyRequests(
                f"at most {max_per_client} upload sessions may be open at once per client"
            )

    def check_room(
        self, client: str | None, max_per_client: int | None, max_total: int | None
    ) -> None:
        """`TooManyRequests` unless one more session fits (a cheap early refusal; `create`
        checks again when it takes the slot). Shared mode: only `create` can tell."""
        if self.shared:
            return
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
        if session is not None and self.shared and not session.folder.is_dir():
            self._forget(session)  # finished, cancelled or purged by another process
            session = None
        if session is None:
            session = self._load(upload_id)
        if session is None or session.name != name or session.owner != owner:
            raise BlobUploadUnknown(detail={"uuid": upload_id})
        return session

    def _forget(self, session: UploadSession) -> None:
        with self._lock:
            if self._live.get(session.id) is session and not session.users:
                del self._live[session.id]

    # ---- shared mode: a session's lock, moves between processes -------------------------

    def acquire(self, session: UploadSession, catch_up: bool = True) -> int | None:
        """Take the session's lock file for a request (shared mode; blocking: offload it):
        the descriptor to `release`, or None when another process holds it.

        Then take in what other processes appended: the offset becomes the data file's
        size, and with `catch_up` the running hash is brought up to it (hashing only the
        bytes this process did not see); without, `finish` decides what to hash.
        `BlobUploadUnknown` when the session is gone.
        """
        try:
            fd = os.open(session.folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except (FileNotFoundError, NotADirectoryError):
            self._forget(session)
            raise BlobUploadUnknown(detail={"uuid": session.id}) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            self._sync(session, catch_up)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _sync(self, session: UploadSession, catch_up: bool) -> None:
        try:
            size = os.stat(session.data_path).st_size
        except (FileNotFoundError, NotADirectoryError):
            self._forget(session)
            raise BlobUploadUnknown(detail={"uuid": session.id}) from None
        covered = self._covered(session)
        if covered > size:  # cut back below what this process hashed (never by appends)
            session.hasher, covered = None, 0
        session.offset = size
        if not catch_up:
            session.hashed = covered if covered != size else None
            return
        if session.hasher is None:
            session.hasher, covered = new_hasher(), 0
        if covered < size:
            self._hash_range(session, session.hasher, covered, size)
        session.hashed = None

    @staticmethod
    def _covered(session: UploadSession) -> int:
        """How many bytes the session's running hash covers in this process."""
        if session.hasher is None:
            return 0
        return session.offset if session.hashed is None else session.hashed

    @staticmethod
    def _hash_range(session: UploadSession, hasher: Hasher, start: int, end: int) -> None:
        with open(session.data_path, "rb") as f:
            f.seek(start)
            left = end - start
            while left > 0 and (block := f.read(min(HASH_BLOCK, left))):
                hasher.update(block)
                left -= len(block)
        if left:
            raise BlobUploadUnknown(detail={"uuid": session.id})  # shrunk under the lock

    def release(self, session: UploadSession, fd: int, record: bool) -> None:
        """End a request's hold on the session; with `record`, leave the digest of the bytes
        so far for whichever process finishes the session."""
        try:
            if record and session.hasher is not None and session.hashed is None:
                digest = session.hasher.hexdigest()  # hashlib's: the hash goes on
                hashed = session.folder / "hashed"
                temp = session.folder / f".hashed-{os.getpid()}"
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    temp.write_text(json.dumps({"size": session.offset, "sha256": digest}))
                    os.replace(temp, hashed)
        finally:
            os.close(fd)

    def offset_on_disk(self, session: UploadSession) -> int:
        """The session's offset as any process sees it: its data file's size (shared mode)."""
        if not self.shared:
            return session.offset
        try:
            return os.stat(session.data_path).st_size
        except (FileNotFoundError, NotADirectoryError):
            self._forget(session)
            raise BlobUploadUnknown(detail={"uuid": session.id}) from None

    def _shared_digest(self, session: UploadSession, expected: Digest, size: int) -> str:
        """The digest of a session's bytes at its finish, hashing as little as possible: this
        process's running hash, else the one the last appender recorded, else a catch-up."""
        if expected.algorithm == "sha256":
            covered = self._covered(session)
            if session.hasher is not None and covered == size:
                return session.hasher.hexdigest()
            record = _read_json(session.folder / "hashed")
            if isinstance(record, dict) and record.get("size") == size:
                return str(record.get("sha256"))
            if session.hasher is not None and covered < size:
                self._hash_range(session, session.hasher, covered, size)
                return session.hasher.hexdigest()
        return self._digest_of_file(session, expected.algorithm)

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
            info.get("client"),
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
        if self.shared:
            actual = self._shared_digest(session, expected, size)
        else:
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
        session.hashed = None

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
            if self.shared:
                removed += self._purge_shared(upload_id, folder, live, expired)
                continue
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

    def _purge_shared(
        self,
        upload_id: str,
        folder: Path,
        live: UploadSession | None,
        expired: Callable[[float, float], bool],
    ) -> bool:
        """Shared mode: judged by the files (another process may be the one writing), and
        never while another process's request holds the session's lock."""
        times = self._times_on_disk(folder)
        if times is None:  # finished or removed elsewhere: forget it here too
            if live is not None:
                self._forget(live)
            return False
        started, last = times
        if live is not None:
            if live.users:
                return False
            last = max(last, live.touched)
        if not expired(started, last):
            return False
        try:
            fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a request of another process is using it
            with self._lock:
                live = self._live.get(upload_id)
                if live is not None and live.users:
                    return False
                self._live.pop(upload_id, None)
                self._purging.add(upload_id)
            try:
                remove_tree(folder)
            finally:
                with self._lock:
                    self._purging.discard(upload_id)
            return True
        finally:
            os.close(fd)

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


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_info(folder: Path) -> dict | None:
    info = _read_json(folder / "info")
    return info if isinstance(info, dict) else None
