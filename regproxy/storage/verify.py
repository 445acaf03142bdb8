"""`verify`: re-hash every blob and manifest, check references, find stray temp files.

Returns a `VerifyReport` and never prints; the CLI renders it. Safe while `serve`
and `gc` run on the same stores: blobs are immutable and appear whole (a rename, a
completed upload), so a blob that vanishes while we read it was swept (not corrupt),
and each repository's references are checked under the store's shared lock so no gc
sweep can run half-way through one.

Every store file is reached through the store's `Backend` (a folder or a bucket): the
walk of `blobs/`, the reads, the repairs. What a leftover looks like depends on where
the store is: on disk, temp files (`.tmp-*`, which listings leave out as dot-files) and
entries of the store's `tmp/` folder, found through `Backend.local_path`; on an object
store, multipart uploads a writer never completed, which `Backend.sweep_leftovers`
counts and aborts. Anything in `blobs/` whose name is not its digest is a stray on both.

Hashing uses a thread pool: `hashlib` and file reads release the GIL for large
buffers, so N threads hash N blobs on N cores without the cost of processes
(no pickling, no fork of a big interpreter). One blob is hashed by one thread:
sha256 itself is sequential.

The two stores are judged differently. Pushed content must be complete: every
tag leads to a manifest whose blobs are all present and linked. The proxy cache
is partial by design (a client may pull one platform of an index, eviction
drops least-recently-pulled blobs), so there only corruption, unreadable tags
and strays are problems.

`repair=True` never deletes pushed data: a corrupt pushed blob is moved to
`<store>/quarantine/` with a note naming every manifest that needs it; a corrupt
cached blob is removed so the next pull fetches it again; dangling metadata
links are removed, missing links to present blobs are re-created, and stray
temp files (and unfinished multipart uploads) older than `layout.TEMP_MAX_AGE` are
removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from regproxy import manifest as mf
from regproxy.digest import Digest
from regproxy.errors import DigestInvalid, RegistryError
from regproxy.storage.backend import Backend
from regproxy.storage.layout import LAYERS, REFERRERS, TEMP_MAX_AGE, is_temp
from regproxy.storage.store import Store

HASH_CHUNK = 1024 * 1024
QUARANTINE = "quarantine"

# problem kinds
CORRUPT = "corrupt"
UNREADABLE = "unreadable"
MISSING_BLOB = "missing-blob"
MISSING_LINK = "missing-link"
MISSING_MANIFEST = "missing-manifest"
INVALID_MANIFEST = "invalid-manifest"
DANGLING_TAG = "dangling-tag"
BAD_TAG = "bad-tag"
ORPHANED_LINK = "orphaned-link"
STRAY_FILE = "stray-file"
STRAY_TEMP = "stray-temp"


class Progress(Protocol):
    """Hashing progress; `advance` is called from worker threads."""

    def start(self, total_bytes: int, total_files: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...


class _NoProgress:
    def start(self, total_bytes: int, total_files: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass


@dataclass
class Problem:
    store: str
    kind: str
    path: str
    message: str
    digest: str | None = None
    #: what `--repair` did about it (None: nothing could be or was done)
    repair: str | None = None
    #: references (`name:tag` or `name@digest`) of manifests that need a corrupt blob
    needed_by: list[str] = field(default_factory=list)


@dataclass
class StoreStats:
    store: str
    root: str
    blobs: int = 0
    bytes: int = 0
    repositories: int = 0
    manifests: int = 0
    tags: int = 0
    seconds: float = 0.0


@dataclass
class VerifyReport:
    stores: list[StoreStats]
    problems: list[Problem]
    workers: int
    repair: bool
    bytes_hashed: int = 0
    blobs_hashed: int = 0
    hash_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def throughput(self) -> float:
        """Bytes per second re-hashed (0 when nothing was)."""
        return self.bytes_hashed / self.hash_seconds if self.hash_seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "repair": self.repair,
            "workers": self.workers,
            "blobs_hashed": self.blobs_hashed,
            "bytes_hashed": self.bytes_hashed,
            "hash_seconds": round(self.hash_seconds, 3),
            "throughput": round(self.throughput),
            "seconds": round(self.seconds, 3),
            "stores": [asdict(s) for s in self.stores],
            "problems": [asdict(p) for p in self.problems],
        }


@dataclass(frozen=True)
class Target:
    """One store to verify: its label, and whether it is a cache (partial by design)."""

    label: str
    store: Store
    cached: bool = False


@dataclass(frozen=True, slots=True)
class _Blob:
    target: Target
    digest: Digest
    path: Path
    size: int


# ---- hashing ------------------------------------------------------------------------------


def hash_blob(backend: Backend, path: Path, algorithm: str, advance: Callable[[int], None]) -> str:
    """Hex digest of a stored file: read straight from disk where the backend keeps it
    there (`local_path`), else streamed through `Backend.open_read`.

    Why both: measured on disk, the stream hashes large blobs as fast (~1 GiB of 1-64 MiB
    blobs), but its buffered file object per blob costs ~25 % more CPU on 20 000 blobs
    of 1 KiB.
    """
    local = backend.local_path(path)
    if local is not None:
        with open(local, "rb", buffering=0) as f:
            return _hash_into(f.readinto, algorithm, advance)
    with contextlib.closing(backend.open_read(path)) as stream:
        return hash_stream(stream, algorithm, advance)


def hash_stream(stream: BinaryIO, algorithm: str, advance: Callable[[int], None]) -> str:
    """Hex digest of a stream, read in `HASH_CHUNK` blocks: into one reused buffer where
    the stream can (`readinto`: both backends' streams can; a fresh 1 MiB `bytes` per
    `read` costs ~5 % more CPU)."""
    readinto = getattr(stream, "readinto", None)
    if readinto is not None:
        return _hash_into(readinto, algorithm, advance)
    hasher = hashlib.new(algorithm)
    while chunk := stream.read(HASH_CHUNK):
        hasher.update(chunk)
        advance(len(chunk))
    return hasher.hexdigest()


def _hash_into(
    readinto: Callable[[bytearray], int | None], algorithm: str, advance: Callable[[int], None]
) -> str:
    """Blocks read into this thread's buffer and hashed from it (the GIL is released for
    both)."""
    hasher = hashlib.new(algorithm)
    buf = _buffer()
    view = memoryview(buf)
    while n := readinto(buf):
        hasher.update(view[:n])
        advance(n)
    return hasher.hexdigest()


_buffers = threading.local()


def _buffer() -> bytearray:
    """The calling thread's hashing buffer, allocated once per worker: a fresh zeroed
    1 MiB `bytearray` per blob was most of the CPU of hashing small blobs (measured:
    3.7 times the CPU on 20 000 blobs of 1 KiB)."""
    buf: bytearray | None = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(HASH_CHUNK)
    return buf


def default_workers() -> int:
    return max(2, min(8, os.cpu_count() or 1))


# ---- the walk over one store's files ------------------------------------------------------


def _blob_digest(name: str) -> Digest | None:
    """The digest of a file `<algorithm>/<2 hex>/<hex>` below `blobs/`; None for any other
    name (a stray)."""
    parts = name.split("/")
    if len(parts) != 3 or parts[1] != parts[2][:2]:
        return None
    try:
        return Digest.parse(f"{parts[0]}:{parts[2]}")
    except DigestInvalid:
        return None


def _scan_blobs(target: Target, problems: list[Problem]) -> Iterator[_Blob]:
    """Every blob, from the backend's walk of `blobs/`; any other file there is a stray."""
    blobs = target.store.layout.blobs
    for entry in target.store.backend.files(blobs):
        path = blobs / entry.name
        digest = _blob_digest(entry.name)
        if digest is None:
            problems.append(
                Problem(
                    target.label, STRAY_FILE, str(path), "not a blob: the name is not its digest"
                )
            )
            continue
        yield _Blob(target, digest, path, entry.size)


def _scan_leftovers(target: Target, now: float, problems: list[Problem]) -> list[Problem]:
    """Leftovers of interrupted writes older than `TEMP_MAX_AGE`, added to `problems`;
    returns those a `Backend.sweep_leftovers` of the store removes (see `_sweep`).

    On disk: the entries of the store's `tmp/` (swept), `.tmp-*` files and other dot-files
    in `blobs/` and temp files under `repositories/`, which the backend's listings leave
    out. On an object store: multipart uploads never completed (one problem, swept).
    """
    store = target.store
    layout = store.layout
    tmp = store.backend.local_path(layout.tmp)
    if tmp is None:
        count = store.backend.sweep_leftovers(layout.tmp, TEMP_MAX_AGE, now, dry_run=True)
        if not count:
            return []
        hours = TEMP_MAX_AGE / 3600
        message = f"{count} unfinished multipart upload(s) started over {hours:g} h ago"
        found = [Problem(target.label, STRAY_TEMP, str(store.root), message)]
        problems += found
        return found
    for folder, only_temp in ((layout.blobs, False), (layout.repositories, True)):
        local = store.backend.local_path(folder)
        if local is None:
            continue
        for relative in _dot_files(local):
            path = folder / relative
            if is_temp(path.name):
                if _age(local / relative, now) >= TEMP_MAX_AGE:
                    problems.append(
                        Problem(
                            target.label, STRAY_TEMP, str(path), "leftover temp file of a write"
                        )
                    )
            elif not only_temp:
                problems.append(
                    Problem(target.label, STRAY_FILE, str(path), "not a blob: a hidden file")
                )
    found = [
        Problem(
            target.label,
            STRAY_TEMP,
            str(layout.tmp / entry.name),
            "leftover of an interrupted commit",
        )
        for entry in _entries(tmp)
        if _age(entry, now) >= TEMP_MAX_AGE
    ]
    problems += found
    return found


def _dot_files(folder: Path) -> Iterator[str]:
    """Files below a local folder with a dot-name on their way (relative paths): what
    `Backend.files` does not list. Blobs never have one, temp files always do."""
    for dirpath, _dirs, names in os.walk(folder):
        relative = os.path.relpath(dirpath, folder)
        hidden = any(part.startswith(".") for part in Path(relative).parts)
        for name in names:
            if hidden or name.startswith("."):
                yield name if relative == "." else f"{relative}/{name}"


def _entries(folder: Path) -> list[os.DirEntry]:
    """Entries of a local folder (temporary storage, or a store's `tmp/` on disk)."""
    try:
        return list(os.scandir(folder))
    except FileNotFoundError:
        return []


def _age(entry: os.DirEntry | Path, now: float) -> float:
    try:
        st = entry.stat(follow_symlinks=False) if isinstance(entry, os.DirEntry) else entry.lstat()
    except OSError:
        return 0.0
    return now - st.st_mtime


def _scan_temp_root(temp_root: Path, upload_max_age: float, now: float) -> list[Problem]:
    """Expired upload sessions and old proxy spool files in `temporary_registry_storage`."""
    problems = []
    for entry in _entries(temp_root / "uploads"):
        data = Path(entry.path, "data")
        age = _age(data if data.exists() else entry, now)
        if age > upload_max_age:
            problems.append(
                Problem(
                    "temporary",
                    STRAY_TEMP,
                    entry.path,
                    f"upload session idle for {age / 3600:.1f} h (expired)",
                )
            )
    for entry in _entries(temp_root / "spool"):
        if _age(entry, now) >= TEMP_MAX_AGE:
            problems.append(
                Problem("temporary", STRAY_TEMP, entry.path, "leftover proxy spool file")
            )
    return problems


# ---- references ---------------------------------------------------------------------------


class _RepoChecker:
    """Tags → manifests → blobs of one repository, plus its links and referrer entries."""

    def __init__(self, target: Target, name: str, corrupt: set[Digest], stats: StoreStats):
        self.target = target
        self.store = target.store
        self.name = name
        self.corrupt = corrupt
        self.stats = stats
        self.problems: list[Problem] = []
        #: manifest digest → tags pointing at it
        self.tags: dict[Digest, list[str]] = {}
        #: revision → its parse (None: corrupt, its content cannot be trusted); `needed_by`
        self.parsed: dict[Digest, mf.Manifest | None] = {}

    def problem(self, kind: str, path: Path, message: str, digest: Digest | None = None) -> None:
        digest_text = str(digest) if digest is not None else None
        self.problems.append(Problem(self.target.label, kind, str(path), message, digest_text))

    def run(self) -> None:
        layout = self.store.layout
        strict = not self.target.cached
        for tag in self.store.backend.names(layout.tags_dir(self.name)):
            self.stats.tags += 1
            path = layout.tags_dir(self.name) / tag
            raw = self.store.backend.read(path)
            if raw is None:
                continue  # deleted since the listing: not a problem
            try:
                digest = Digest.parse(raw.decode().strip())
            except (UnicodeDecodeError, DigestInvalid):
                self.problem(BAD_TAG, path, f"tag {self.name}:{tag} does not hold a digest")
                continue
            self.tags.setdefault(digest, []).append(tag)
            if strict and not self.store.has_manifest(self.name, digest):
                self.problem(
                    DANGLING_TAG,
                    path,
                    f"tag {self.name}:{tag} points at {digest}, not a manifest of the repository",
                    digest,
                )
        for digest, _mtime in self.store.revisions(self.name):
            self.stats.manifests += 1
            self._check_revision(digest, strict)
        if strict:
            self._check_layer_links()
            self._check_referrer_links()

    def _check_revision(self, digest: Digest, strict: bool) -> None:
        layout = self.store.layout
        revision = layout.revision(self.name, digest)
        data = self.store.backend.read(layout.blob(digest))
        if data is None:
            if strict:
                self.problem(
                    MISSING_MANIFEST,
                    revision,
                    f"{self.name}@{digest}: the manifest's bytes are missing",
                    digest,
                )
            return
        if digest in self.corrupt:
            self.parsed[digest] = None
            return  # reported by the hash check; its content cannot be trusted
        try:
            parsed = mf.parse(data, self.store.media_type(self.name, digest))
        except RegistryError as exc:
            self.problem(
                INVALID_MANIFEST,
                layout.blob(digest),
                f"{self.name}@{digest}: {exc.message}",
                digest,
            )
            return
        self.parsed[digest] = parsed
        if not strict:
            return
        for desc in parsed.blobs:
            if not self.store.has_blob(desc.digest):
                self.problem(
                    MISSING_BLOB,
                    layout.blob(desc.digest),
                    f"{self.name}@{digest} needs blob {desc.digest}, which is missing",
                    desc.digest,
                )
            elif not self.store.backend.exists(layout.layer(self.name, desc.digest)):
                self.problem(
                    MISSING_LINK,
                    layout.layer(self.name, desc.digest),
                    f"{self.name}@{digest} needs blob {desc.digest}, "
                    "which is not linked into the repository",
                    desc.digest,
                )
        for desc in parsed.children:
            if not self.store.has_manifest(self.name, desc.digest):
                self.problem(
                    MISSING_MANIFEST,
                    layout.revision(self.name, desc.digest),
                    f"index {self.name}@{digest} lists {desc.digest}, "
                    "which is not a manifest of the repository",
                    desc.digest,
                )

    def _check_layer_links(self) -> None:
        folder = self.store.layout.repo(self.name) / LAYERS
        for algorithm in self.store.backend.names(folder):
            for hex_ in self.store.backend.names(folder / algorithm):
                try:
                    digest = Digest.parse(f"{algorithm}:{hex_}")
                except DigestInvalid:
                    self.problem(ORPHANED_LINK, folder / algorithm / hex_, "not a digest")
                    continue
                if not self.store.has_blob(digest):
                    self.problem(
                        ORPHANED_LINK,
                        folder / algorithm / hex_,
                        f"{self.name} links blob {digest}, which is missing",
                        digest,
                    )

    def _check_referrer_links(self) -> None:
        folder = self.store.layout.repo(self.name) / REFERRERS
        for algorithm in self.store.backend.names(folder):
            for subject in self.store.backend.names(folder / algorithm):
                for entry in self.store.backend.names(folder / algorithm / subject):
                    path = folder / algorithm / subject / entry
                    alg, _, hex_ = entry.partition("-")
                    try:
                        referrer = Digest.parse(f"{alg}:{hex_}")
                    except DigestInvalid:
                        self.problem(ORPHANED_LINK, path, "referrer entry is not a digest")
                        continue
                    if not self.store.has_manifest(self.name, referrer):
                        self.problem(
                            ORPHANED_LINK,
                            path,
                            f"{self.name}: referrer entry for {referrer}, "
                            "which is not a manifest of the repository",
                            referrer,
                        )

    def _needs(self, digest: Digest, bad: Digest) -> bool:
        """Whether revision `digest` is `bad` or needs it, directly or through an index."""
        for current, parsed in mf.walk(digest, self.parsed.get):
            blobs = parsed.blobs if parsed is not None else ()
            if current == bad or any(d.digest == bad for d in blobs):
                return True
        return False

    def users_of(self, bad: Digest) -> list[str]:
        """References of manifests needing `bad`, directly or through an index."""
        affected = [d for d in self.parsed if self._needs(d, bad)]
        out = []
        for digest in sorted(affected, key=str):
            tags = self.tags.get(digest)
            if tags:
                out += [f"{self.name}:{t}" for t in sorted(tags)]
            else:
                out.append(f"{self.name}@{digest}")
        return out


# ---- repair -------------------------------------------------------------------------------


def _quarantine(store: Store, digest: Digest, problem: Problem) -> str:
    """Move a corrupt pushed blob out of `blobs/`, with a note saying why and who needs it."""
    folder = store.root / QUARANTINE / digest.algorithm
    destination = folder / digest.hex
    note = {
        "digest": str(digest),
        "problem": problem.message,
        "quarantined": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "needed_by": problem.needed_by,
    }
    text = json.dumps(note, indent=2) + "\n"
    store.backend.write_atomic(folder / f"{digest.hex}.json", text.encode())
    source = store.blob_path(digest)
    store.backend.move(source, destination)
    store.backend.prune(source.parent, store.layout.blobs)
    return f"moved to {destination}; push the image again to restore it"


def _repair(
    targets: Sequence[Target], problems: list[Problem], swept: list[Problem], now: float
) -> None:
    """Under each store's exclusive lock, so no commit sees a blob half-way out. `swept`:
    the leftovers one `sweep_leftovers` removes (found with the clock at `now`)."""
    sweep = {id(p) for p in swept}
    for target in targets:
        mine = [p for p in problems if p.store == target.label]
        if not mine:
            continue
        with target.store.exclusive_lock():
            for p in mine:
                if id(p) not in sweep:
                    with contextlib.suppress(OSError):
                        p.repair = _repair_one(target, p)
            _sweep(target, [p for p in mine if id(p) in sweep], now)
    for p in problems:
        if p.store == "temporary" and p.kind == STRAY_TEMP:
            p.repair = _remove_path(Path(p.path))


def _sweep(target: Target, found: list[Problem], now: float) -> None:
    """Remove the store's leftovers with the age and clock that found them, so the sweep
    takes what the scan reported (and nothing younger)."""
    if not found:
        return
    store = target.store
    try:
        store.backend.sweep_leftovers(store.layout.tmp, TEMP_MAX_AGE, now, dry_run=False)
        left = store.backend.sweep_leftovers(store.layout.tmp, TEMP_MAX_AGE, now, dry_run=True)
    except OSError:
        return
    for p in found:
        p.repair = "removed" if not left else f"{left} could not be removed"


def _repair_one(target: Target, p: Problem) -> str | None:
    store = target.store
    path = Path(p.path)
    if p.kind in (CORRUPT, INVALID_MANIFEST) and p.digest is not None:
        digest = Digest.parse(p.digest)
        if not store.has_blob(digest):
            return None
        if target.cached:
            store.backend.remove(store.blob_path(digest))
            store.backend.prune(store.blob_path(digest).parent, store.layout.blobs)
            return "removed; the next pull fetches it again"
        return _quarantine(store, digest, p)
    if p.kind == ORPHANED_LINK:
        store.backend.remove(path)
        store.backend.prune(path.parent, store.layout.repositories)
        return "link removed"
    if p.kind == MISSING_LINK and p.digest is not None and store.has_blob(Digest.parse(p.digest)):
        store.backend.ensure(path)
        return "link re-created"
    if p.kind == STRAY_TEMP:  # a temp file beside blobs or tags (on disk)
        return "removed" if store.backend.remove(path) else "already gone"
    return None


def _remove_path(path: Path) -> str | None:
    """Remove an entry of the temporary storage (always a local folder)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return "already gone"
    except OSError:
        return None
    return "removed"


# ---- entry point --------------------------------------------------------------------------


def verify(
    targets: Sequence[Target],
    temp_root: Path | None = None,
    upload_max_age: float = 86400.0,
    repair: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    """Re-hash, check references and look for strays in `targets`; optionally repair."""
    started = time.time()
    progress = progress or _NoProgress()
    workers = workers or default_workers()
    problems: list[Problem] = []
    stats = {t.label: StoreStats(t.label, str(t.store.root)) for t in targets}
    blobs: list[_Blob] = []
    swept: list[Problem] = []
    for target in targets:
        for blob in _scan_blobs(target, problems):
            blobs.append(blob)
            stats[target.label].blobs += 1
            stats[target.label].bytes += blob.size
        swept += _scan_leftovers(target, started, problems)
    report = VerifyReport(list(stats.values()), problems, workers, repair)

    corrupt = _hash_all(blobs, workers, progress, report)
    corrupt_by_label: dict[str, set[Digest]] = {}
    for p in corrupt:
        assert p.digest is not None
        corrupt_by_label.setdefault(p.store, set()).add(Digest.parse(p.digest))

    for target in targets:
        began = time.monotonic()
        bad = corrupt_by_label.get(target.label, set())
        users: dict[Digest, list[str]] = {d: [] for d in bad}
        names = target.store.repositories()
        stats[target.label].repositories = len(names)
        lock = _lock_for(target.store)
        for name in names:
            checker = _RepoChecker(target, name, bad, stats[target.label])
            with lock():  # no gc sweep half-way through a repository
                checker.run()
            problems.extend(checker.problems)
            for digest in bad:
                users[digest] += checker.users_of(digest)
        for p in corrupt:
            if p.store == target.label and p.digest is not None:
                p.needed_by = users[Digest.parse(p.digest)]
        stats[target.label].seconds = time.monotonic() - began
    problems[:0] = corrupt
    if temp_root is not None:
        problems.extend(_scan_temp_root(Path(temp_root), upload_max_age, started))
    if repair:
        _repair(targets, problems, swept, started)
    report.seconds = time.time() - started
    return report


def _lock_for(store: Store) -> Callable[[], AbstractContextManager[None]]:
    """The store's shared lock, or none for a store we may not write to (a read-only mount,
    a backup being checked): nothing that can write there takes it anyway."""
    try:
        with store.shared_lock():
            pass
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        return contextlib.nullcontext
    return store.shared_lock


def _hash_all(
    blobs: list[_Blob], workers: int, progress: Progress, report: VerifyReport
) -> list[Problem]:
    """Hash every blob with `workers` threads, largest first so the pool drains evenly."""
    blobs.sort(key=lambda b: b.size, reverse=True)
    progress.start(sum(b.size for b in blobs), len(blobs))

    def check(blob: _Blob) -> tuple[int, Problem | None]:
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            progress.advance(n)

        try:
            backend = blob.target.store.backend
            actual = hash_blob(backend, blob.path, blob.digest.algorithm, advance)
        except FileNotFoundError:
            return done, None  # swept or evicted meanwhile: not a problem
        except OSError as exc:
            message = f"cannot read blob {blob.digest}: {exc.strerror or exc}"
            return done, Problem(
                blob.target.label, UNREADABLE, str(blob.path), message, str(blob.digest)
            )
        if actual == blob.digest.hex:
            return done, None
        message = f"content does not match its digest (hashes to {blob.digest.algorithm}:{actual})"
        return done, Problem(blob.target.label, CORRUPT, str(blob.path), message, str(blob.digest))

    began = time.monotonic()
    found: list[Problem] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="regproxy-verify") as pool:
        for done, problem in pool.map(check, blobs):
            report.bytes_hashed += done
            report.blobs_hashed += 1
            if problem is not None:
                found.append(problem)
    report.hash_seconds = time.monotonic() - began
    return found
