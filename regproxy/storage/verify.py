"""`verify`: re-hash every blob and manifest, check references, find stray temp files.

Returns a `VerifyReport` and never prints; the CLI renders it. Safe while `serve`
and `gc` run on the same stores: blobs are immutable and appear by rename, so a
blob that vanishes while we read it was swept (not corrupt), and each
repository's references are checked under the store's shared lock so no gc
sweep can run half-way through one.

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
temp files older than `layout.TEMP_MAX_AGE` are removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from regproxy import manifest as mf
from regproxy.digest import Digest
from regproxy.errors import DigestInvalid, RegistryError
from regproxy.storage.fs import prune_empty_dirs
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


def hash_file(path: Path, algorithm: str, advance: Callable[[int], None]) -> str:
    """Hex digest of a file, read in 1 MiB blocks into one reused buffer (GIL released)."""
    hasher = hashlib.new(algorithm)
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            hasher.update(view[:n])
            advance(n)
    return hasher.hexdigest()


def default_workers() -> int:
    return max(2, min(8, os.cpu_count() or 1))


# ---- the walk over one store's files ------------------------------------------------------


def _scan_blobs(target: Target, now: float, problems: list[Problem]) -> Iterator[_Blob]:
    """Every blob file; misplaced files and old `.tmp-*` leftovers become problems."""
    blobs = target.store.layout.blobs
    for alg_entry in _entries(blobs):
        if not alg_entry.is_dir(follow_symlinks=False):
            _stray(target, alg_entry, now, problems)
            continue
        for prefix in _entries(Path(alg_entry.path)):
            if not prefix.is_dir(follow_symlinks=False):
                _stray(target, prefix, now, problems)
                continue
            for entry in _entries(Path(prefix.path)):
                try:
                    digest = Digest.parse(f"{alg_entry.name}:{entry.name}")
                    regular = entry.is_file(follow_symlinks=False)
                    size = entry.stat(follow_symlinks=False).st_size
                except (DigestInvalid, OSError):
                    digest, regular, size = None, False, 0
                if digest is None or not regular or prefix.name != entry.name[:2]:
                    _stray(target, entry, now, problems)
                    continue
                yield _Blob(target, digest, Path(entry.path), size)


def _entries(folder: Path) -> list[os.DirEntry]:
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


def _stray(target: Target, entry: os.DirEntry, now: float, problems: list[Problem]) -> None:
    if is_temp(entry.name):
        if _age(entry, now) >= TEMP_MAX_AGE:
            problems.append(
                Problem(target.label, STRAY_TEMP, entry.path, "leftover temp file of a write")
            )
        return
    problems.append(
        Problem(target.label, STRAY_FILE, entry.path, "not a blob: the name is not its digest")
    )


def _scan_temp_files(target: Target, now: float, problems: list[Problem]) -> None:
    """Old entries of the store's `tmp/` and `.tmp-*` files under `repositories/`."""
    for entry in _entries(target.store.layout.tmp):
        if _age(entry, now) >= TEMP_MAX_AGE:
            problems.append(
                Problem(target.label, STRAY_TEMP, entry.path, "leftover of an interrupted commit")
            )
    for dirpath, _dirs, files in os.walk(target.store.layout.repositories):
        for name in files:
            path = Path(dirpath, name)
            if is_temp(name) and _age(path, now) >= TEMP_MAX_AGE:
                problems.append(
                    Problem(target.label, STRAY_TEMP, str(path), "leftover temp file of a write")
                )


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
    folder.mkdir(parents=True, exist_ok=True)
    destination = folder / digest.hex
    note = {
        "digest": str(digest),
        "problem": problem.message,
        "quarantined": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "needed_by": problem.needed_by,
    }
    (folder / f"{digest.hex}.json").write_text(json.dumps(note, indent=2) + "\n")
    source = store.blob_path(digest)
    os.replace(source, destination)
    prune_empty_dirs(source.parent, store.layout.blobs)
    return f"moved to {destination}; push the image again to restore it"


def _repair(targets: Sequence[Target], problems: list[Problem]) -> None:
    """Under each store's exclusive lock, so no commit sees a blob half-way out."""
    for target in targets:
        mine = [p for p in problems if p.store == target.label]
        if not mine:
            continue
        with target.store.exclusive_lock():
            for p in mine:
                with contextlib.suppress(OSError):
                    p.repair = _repair_one(target, p)
    for p in problems:
        if p.store == "temporary" and p.kind == STRAY_TEMP:
            p.repair = _remove_path(Path(p.path))


def _repair_one(target: Target, p: Problem) -> str | None:
    store = target.store
    path = Path(p.path)
    if p.kind in (CORRUPT, INVALID_MANIFEST) and p.digest is not None:
        digest = Digest.parse(p.digest)
        if not store.has_blob(digest):
            return None
        if target.cached:
            store.backend.remove(store.blob_path(digest))
            prune_empty_dirs(store.blob_path(digest).parent, store.layout.blobs)
            return "removed; the next pull fetches it again"
        return _quarantine(store, digest, p)
    if p.kind == ORPHANED_LINK:
        store.backend.remove(path)
        prune_empty_dirs(path.parent, store.layout.repositories)
        return "link removed"
    if p.kind == MISSING_LINK and p.digest is not None and store.has_blob(Digest.parse(p.digest)):
        store.backend.ensure(path)
        return "link re-created"
    if p.kind == STRAY_TEMP:
        return _remove_path(path)
    return None


def _remove_path(path: Path) -> str | None:
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
    for target in targets:
        for blob in _scan_blobs(target, started, problems):
            blobs.append(blob)
            stats[target.label].blobs += 1
            stats[target.label].bytes += blob.size
        _scan_temp_files(target, started, problems)
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
        _repair(targets, problems)
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
            actual = hash_file(blob.path, blob.digest.algorithm, advance)
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
