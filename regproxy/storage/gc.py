"""Mark-and-sweep garbage collection and LRU eviction; both return reports, never print.

Safe while `serve` runs on the same store. Every commit (blob rename + link,
manifest PUT) holds the store's lock shared for a few milliseconds. gc marks
without the lock, then takes it exclusively, marks again whatever tags and
revisions changed since the mark began, and only then sweeps. Blobs younger
than the grace period, or touched after the mark began (a re-push of an
existing layer touches it), are never swept.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from regproxy import manifest as mf
from regproxy.digest import Digest
from regproxy.errors import RegistryError
from regproxy.storage.fs import remove_older_than
from regproxy.storage.layout import LAYERS, TEMP_MAX_AGE
from regproxy.storage.replicas import sweep_stale_claims
from regproxy.storage.store import Store

MAX_LISTED = 1000
#: seconds: how far a file's mtime may lag time.time() (coarse kernel timestamps), with margin
CLOCK_SLACK = 1.0
#: seconds an object store's times may lag on top: S3 keeps whole seconds (Last-Modified is
#: an HTTP date), so a blob committed at 10.9 reads back as written at 10.0
OBJECT_STORE_SLACK = 1.0


def clock_slack(store: Store) -> float:
    """How long before gc's start a change still counts as made during the run."""
    return CLOCK_SLACK + (0.0 if store.backend.local else OBJECT_STORE_SLACK)


@dataclass
class GcReport:
    store: str
    dry_run: bool
    blobs_removed: int = 0
    bytes_freed: int = 0
    manifests_removed: int = 0
    tags_removed: int = 0
    uploads_removed: int = 0
    temp_files_removed: int = 0
    blobs_kept: int = 0
    seconds: float = 0.0
    removed: list[str] = field(default_factory=list)  # digests, capped at MAX_LISTED

    def note(self, what: str) -> None:
        if len(self.removed) < MAX_LISTED:
            self.removed.append(what)

    def to_json(self) -> dict:
        return dict(self.__dict__)


class _Marker:
    """Reachability from roots through indexes, configs, layers and referrers."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.blobs: set[str] = set()
        #: repository → revisions reached in it
        self.revisions: dict[str, set[Digest]] = {}

    def marked(self, name: str, digest: Digest) -> bool:
        return digest in self.revisions.get(name, ())

    def mark(self, name: str, digest: Digest) -> None:
        seen = self.revisions.setdefault(name, set())
        # artifacts that refer to a kept manifest are kept with it
        also = functools.partial(self.store.referrer_digests, name)
        for current, parsed in mf.walk(digest, functools.partial(self._load, name), seen, also):
            self.blobs.add(str(current))
            if parsed is not None:
                self.blobs.update(str(d.digest) for d in parsed.blobs)

    def _load(self, name: str, digest: Digest) -> mf.Manifest | None:
        data = self.store.manifest_bytes(digest)
        if data is None:
            return None
        try:
            return mf.parse(data, self.store.media_type(name, digest))
        except RegistryError:
            return None

    def mark_repository(
        self, name: str, keep_untagged: bool, since: float | None = None, young: float = math.inf
    ) -> None:
        """Mark from the tags (and untagged revisions when kept); `since` limits to changes.

        Revisions pushed or re-pushed at or after `young` are roots even when untagged:
        the grace period covers manifests too (an index's children arrive untagged,
        before the index that keeps them).
        """
        tags_dir = self.store.layout.tags_dir(name)
        for tag in self.store.backend.names(tags_dir):
            if since is not None:
                mtime = self.store.backend.mtime(tags_dir / tag)
                if mtime is None or mtime < since:
                    continue
            digest = self.store.tag_digest(name, tag)
            if digest is not None:
                self.mark(name, digest)
        for digest, mtime in self.store.revisions(name):
            if keep_untagged or mtime >= young or (since is not None and mtime >= since):
                self.mark(name, digest)


def _drop_untagged(store: Store, marker: _Marker, name: str, report: GcReport) -> None:
    """Runs under the exclusive lock, so `delete_manifest` must not take it again."""
    for digest, _mtime in store.revisions(name):
        if marker.marked(name, digest):
            continue
        report.manifests_removed += 1
        report.note(f"{name}@{digest}")
        if not report.dry_run:
            with contextlib.suppress(RegistryError):
                store.delete_manifest(name, digest, lock=False)


def _unlink_swept_layers(store: Store, name: str, swept: set[str]) -> None:
    folder = store.layout.repo(name) / LAYERS
    for algorithm in store.backend.names(folder):
        for hex_ in store.backend.names(folder / algorithm):
            if f"{algorithm}:{hex_}" in swept:
                store.backend.remove(folder / algorithm / hex_)


def collect(
    store: Store,
    grace: float = 3600.0,
    delete_untagged: bool = False,
    dry_run: bool = False,
    label: str = "registry",
    expire_repositories_older_than: float | None = None,
) -> GcReport:
    """Mark from every tag, sweep unreferenced blobs older than `grace` seconds.

    `expire_repositories_older_than` (proxy cache): repositories not pulled for
    that long lose their tags and revisions first.
    """
    started = time.time()
    report = GcReport(label, dry_run)
    # File times come from the kernel's coarse clock and can lag time.time() by a tick (on
    # an object store by up to a second more): anything stamped within the slack of the
    # start counts as changed during the run.
    fresh = started - clock_slack(store)
    cutoff = min(fresh, started - grace)
    repositories = store.repositories()

    expired: set[str] = set()
    if expire_repositories_older_than is not None:
        limit = started - expire_repositories_older_than
        for name in repositories:
            pulled = store.backend.mtime(store.layout.pulled(name))
            if pulled is None or pulled < limit:
                expired.add(name)
                _expire_repository(store, name, report)
    # a dry run left their tags in place: do not let them keep what a real run would sweep
    skip = expired if dry_run else set()

    marker = _Marker(store)
    for name in repositories:
        if name not in skip:
            marker.mark_repository(name, keep_untagged=not delete_untagged, young=cutoff)
    candidates = [
        (digest, size)
        for digest, size, mtime in store.iter_blobs()
        if mtime < cutoff and str(digest) not in marker.blobs
    ]

    lock = store.exclusive_lock() if not dry_run else contextlib.nullcontext()
    with lock:
        # whatever was pushed or re-tagged while we marked is live too
        for name in store.repositories():
            if name not in skip:
                marker.mark_repository(
                    name, keep_untagged=not delete_untagged, since=fresh, young=cutoff
                )
        if delete_untagged:
            for name in repositories:
                _drop_untagged(store, marker, name, report)
        swept: set[str] = set()
        for digest, size in candidates:
            if str(digest) in marker.blobs:
                continue
            path = store.blob_path(digest)
            mtime = store.backend.mtime(path)
            if mtime is None or mtime >= cutoff:
                continue  # touched meanwhile: a re-push or a mount keeps it
            swept.add(str(digest))
            report.blobs_removed += 1
            report.bytes_freed += size
            report.note(str(digest))
            if not dry_run:
                store.backend.remove(path)
                store.backend.prune(path.parent, store.layout.blobs)
        if swept and not dry_run:
            for name in repositories:
                _unlink_swept_layers(store, name, swept)
    report.blobs_kept = len(marker.blobs)
    # tmp/ on disk holds atomic writes and cross-filesystem copies in progress (a slow
    # fsync or a big copy can take seconds) with no sign of life: only crash leftovers go
    # there, whatever the grace period. On an object store a commit's multipart upload is
    # marked live while it runs (S3Backend._marked): the grace period holds for the rest.
    floor = TEMP_MAX_AGE if store.backend.local else 0.0
    report.temp_files_removed += store.backend.sweep_leftovers(
        store.layout.tmp, max(started - cutoff, floor), started, dry_run
    )
    # blob claims of replicas that died mid-fetch (proxy store; whatever the grace period)
    report.temp_files_removed += sweep_stale_claims(store, started, dry_run)
    report.seconds = time.time() - started
    return report


def _expire_repository(store: Store, name: str, report: GcReport) -> None:
    for tag in store.tags(name, missing_ok=True):
        report.tags_removed += 1
        if not report.dry_run:
            store.backend.remove(store.layout.tag(name, tag))
    for digest, _ in store.revisions(name):
        report.manifests_removed += 1
        if not report.dry_run:
            with contextlib.suppress(RegistryError):
                store.delete_manifest(name, digest)


def collect_temp(temp_root: Path, upload_max_age: float, grace: float, dry_run: bool) -> GcReport:
    """Expired upload sessions and proxy spool leftovers in `temporary_registry_storage`."""
    started = time.time()
    report = GcReport("temporary", dry_run)
    temp_root = Path(temp_root)
    report.uploads_removed = remove_older_than(
        temp_root / "uploads", upload_max_age, started, dry_run
    )
    report.temp_files_removed = remove_older_than(
        temp_root / "spool", max(grace, TEMP_MAX_AGE), started, dry_run
    )
    report.seconds = time.time() - started
    return report


@dataclass
class EvictionReport:
    store: str
    dry_run: bool
    budget: int
    size_before: int = 0
    size_after: int = 0
    blobs_removed: int = 0
    bytes_freed: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dict(self.__dict__)


def evict_lru(
    store: Store, max_bytes: int, dry_run: bool = False, label: str = "proxy"
) -> EvictionReport:
    """Delete least-recently-pulled blobs of a cache until it fits in `max_bytes`.

    Only for the proxy cache: an evicted blob (or manifest) is fetched again on
    its next pull. Blob mtimes are the LRU clock (a pull touches the blob).
    """
    started = time.time()
    report = EvictionReport(label, dry_run, max_bytes)
    blobs = sorted(store.iter_blobs(), key=lambda item: item[2])
    total = sum(size for _, size, _ in blobs)
    report.size_before = report.size_after = total
    if total <= max_bytes:
        report.seconds = time.time() - started
        return report
    lock = store.exclusive_lock() if not dry_run else contextlib.nullcontext()
    with lock:
        for digest, size, _mtime in blobs:
            if total <= max_bytes:
                break
            total -= size
            report.blobs_removed += 1
            report.bytes_freed += size
            if not dry_run:
                path = store.blob_path(digest)
                store.backend.remove(path)
                store.backend.prune(path.parent, store.layout.blobs)
    report.size_after = total
    report.seconds = time.time() - started
    return report
