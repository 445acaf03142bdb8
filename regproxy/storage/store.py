"""`Store`: blobs, manifests, tags, repository links and referrers of one store root.

Both the pushed-images store and the proxy cache are `Store`s. All methods are
synchronous; the server calls the ones that touch large files through
`storage.aio`, and the cheap metadata reads (a tag file, a revision link, a
cached manifest) inline.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from regproxy import manifest as mf
from regproxy.digest import Digest
from regproxy.errors import (
    BlobUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
)
from regproxy.reference import validate_tag
from regproxy.storage.backend import Backend
from regproxy.storage.fs import FsBackend
from regproxy.storage.layout import REPO_MARKERS, Layout

T = TypeVar("T")

#: entries of each small metadata cache before it starts over
MAX_REMEMBERED = 100_000
#: folders listed at once when walking the repositories of an object store
LISTING_THREADS = 16


class ManifestCache:
    """Manifest bytes by digest. Content is immutable, so entries never go stale."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._items: OrderedDict[Digest, bytes] = OrderedDict()
        self._bytes = 0
        self._max = max_bytes
        self._lock = threading.Lock()

    def get(self, digest: Digest) -> bytes | None:
        with self._lock:
            data = self._items.get(digest)
            if data is not None:
                self._items.move_to_end(digest)
            return data

    def put(self, digest: Digest, data: bytes) -> None:
        if len(data) > self._max // 4:
            return
        with self._lock:
            if digest in self._items:
                return
            self._items[digest] = data
            self._bytes += len(data)
            while self._bytes > self._max:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)


class Recall:
    """Answers of an object store remembered for `ttl` seconds, per process.

    On disk the metadata reads behind a pull cost a stat; on an object store each is a
    request (~1.5 ms of client CPU with botocore), and a manifest GET by tag needs two.
    Within `ttl` this process answers them from memory; its own writes forget what they
    change at once, so it always reads its own writes. Another process's write (a push
    through another replica, a gc) is seen at most `ttl` later ([s3] metadata_ttl).
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._items: dict[Hashable, tuple[float, object]] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> tuple[bool, object]:
        item = self._items.get(key)
        if item is None or item[0] < time.monotonic():
            return False, None
        return True, item[1]

    def put(self, key: Hashable, value: object) -> None:
        with self._lock:
            if len(self._items) >= MAX_REMEMBERED:
                self._items.clear()
            self._items[key] = (time.monotonic() + self.ttl, value)

    def forget(self, *keys: Hashable) -> None:
        with self._lock:
            for key in keys:
                self._items.pop(key, None)


@dataclass(frozen=True, slots=True)
class StoredManifest:
    digest: Digest
    media_type: str
    data: bytes


class Store:
    """One store root (pushed images or the proxy cache)."""

    def __init__(
        self, root: Path, backend: Backend | None = None, metadata_ttl: float = 0.0
    ) -> None:
        self.layout = Layout(root)
        self.backend: Backend = backend or FsBackend(self.layout.tmp)
        self.manifests = ManifestCache()
        #: an object store's pull-path answers, remembered briefly (see `Recall`); a local
        #: store needs none: its reads are stats, checked by version below
        remote = not self.backend.local and metadata_ttl > 0
        self.recall: Recall | None = Recall(metadata_ttl) if remote else None
        # small metadata remembered with the file version it was read at (see `version`)
        self._media_types: dict[tuple[str, Digest], tuple[Hashable, str]] = {}
        self._tag_lists: dict[str, tuple[Hashable, tuple[str, ...]]] = {}
        self.backend.prepare([self.layout.blobs, self.layout.repositories, self.layout.tmp])

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def location(self) -> str:
        """Where the store is, as its configuration names it: a folder or `s3://…`."""
        return self.backend.describe(self.layout.root)

    def shared_lock(self):
        """Held by every commit for a few milliseconds; gc's sweep takes it exclusively."""
        return self.backend.shared_lock(self.layout.lock)

    def exclusive_lock(self):
        return self.backend.exclusive_lock(self.layout.lock)

    # ---- blobs -------------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        return self.layout.blob(digest)

    def has_blob(self, digest: Digest) -> bool:
        return self.backend.exists(self.layout.blob(digest))

    def _recalled(self, key: Hashable, compute: Callable[[], T]) -> T:
        """`compute()`, or what it gave within the last `metadata_ttl` (object stores)."""
        if self.recall is None:
            return compute()
        hit, value = self.recall.get(key)
        if hit:
            return value  # type: ignore[return-value]  # stored by this very key's compute
        value = compute()
        self.recall.put(key, value)
        return value

    def _forget(self, *keys: Hashable) -> None:
        if self.recall is not None:
            self.recall.forget(*keys)

    def is_linked(self, name: str, digest: Digest) -> bool:
        """Whether the blob is visible in `name`: pushed or mounted there, or a manifest of it."""
        return self._recalled(
            ("linked", name, digest),
            lambda: (
                self.backend.exists(self.layout.layer(name, digest))
                or self.backend.exists(self.layout.revision(name, digest))
            ),
        )

    def blob_size(self, name: str, digest: Digest) -> int:
        """Size of a blob visible in `name`; `BlobUnknown` otherwise."""
        if self.is_linked(name, digest):
            path = self.layout.blob(digest)
            size = self._recalled(("size", digest), lambda: self.backend.size(path))
            if size is not None:
                return size
        raise BlobUnknown(detail={"digest": str(digest)})

    def commit_blob(self, name: str, src: Path, digest: Digest) -> None:
        """Move a verified temp file into `blobs/` and link it into `name`.

        When the blob already exists the temp file is dropped and the existing one
        touched, which restarts its gc grace period.
        """
        target = self.layout.blob(digest)
        if not self.backend.local:
            self._commit_remote(name, src, digest)
            self._forget(("linked", name, digest), ("size", digest))
            return
        with self.shared_lock():
            if self.backend.exists(target):
                os.unlink(src)
                self.backend.touch(target)
            else:
                self.backend.move_into(src, target)
                # a rename keeps the upload's mtime (its last PATCH): restart the gc grace
                # period at the commit, as for a re-push of an existing blob
                self.backend.touch(target)
            self.backend.ensure(self.layout.layer(name, digest))

    def _commit_remote(self, name: str, src: Path, digest: Digest) -> None:
        """`commit_blob` on an object store: the upload (seconds for a large blob) runs
        outside the store lock, which commits hold for milliseconds; under the lock the
        blob is checked again, since a gc sweep may have taken it in between, and
        uploaded once more from the local file if so. Only then is it linked."""
        target = self.layout.blob(digest)
        if not self.backend.exists(target):
            self.backend.upload(src, target)
        with self.shared_lock():
            if not self.backend.exists(target):
                self.backend.upload(src, target)
            self.backend.touch(target)
            self.backend.ensure(self.layout.layer(name, digest))
        os.unlink(src)

    def mount_blob(self, name: str, digest: Digest, source: str) -> bool:
        """Link a blob from `source` into `name`; False when `source` does not have it."""
        with self.shared_lock():
            if not self.backend.exists(self.layout.layer(source, digest)):
                return False
            target = self.layout.blob(digest)
            if not self.backend.exists(target):
                return False
            self.backend.touch(target)
            self.backend.ensure(self.layout.layer(name, digest))
        self._forget(("linked", name, digest))
        return True

    def unlink_blob(self, name: str, digest: Digest) -> None:
        self._forget(("linked", name, digest))
        if not self.backend.remove(self.layout.layer(name, digest)):
            raise BlobUnknown(detail={"digest": str(digest)})

    # ---- manifests ---------------------------------------------------------------------

    def missing_references(self, name: str, manifest: mf.Manifest) -> list[str]:
        """Digests a manifest needs that `name` does not have (blobs and child manifests)."""
        missing = [
            str(d.digest)
            for d in manifest.blobs
            if not (
                self.backend.exists(self.layout.layer(name, d.digest))
                and self.backend.exists(self.layout.blob(d.digest))
            )
        ]
        missing += [
            str(d.digest)
            for d in manifest.children
            if not self.backend.exists(self.layout.revision(name, d.digest))
        ]
        return missing

    def put_manifest(
        self,
        name: str,
        data: bytes,
        manifest: mf.Manifest,
        digest: Digest,
        tag: str | None = None,
        check_references: bool = True,
    ) -> None:
        """Store a parsed manifest's exact bytes as a revision of `name`, then set the tag."""
        target = self.layout.blob(digest)
        with self.shared_lock():
            # checked under the lock, so a gc sweep cannot remove a blob between check and write
            if check_references:
                missing = self.missing_references(name, manifest)
                if missing:
                    raise ManifestBlobUnknown(
                        f"manifest references {len(missing)} unknown blob(s) or manifest(s)",
                        detail={"digests": missing[:50]},
                    )
            if self.backend.exists(target):
                self.backend.touch(target)
            else:
                self.backend.write_atomic(target, data)
            revision = self.layout.revision(name, digest)
            if self.backend.read(revision) != manifest.media_type.encode():
                self.backend.write_atomic(revision, manifest.media_type.encode())
            else:
                # a re-push restarts the revision's gc clock (untagged children of an
                # index being pushed again must survive `gc --delete-untagged`)
                self.backend.touch(revision)
            if manifest.subject is not None:
                self.backend.ensure(self.layout.referrer(name, manifest.subject.digest, digest))
            if tag is not None:
                self.set_tag(name, tag, digest)
        self._forget(("media", name, digest), ("linked", name, digest))
        self.manifests.put(digest, data)

    def set_tag(self, name: str, tag: str, digest: Digest) -> None:
        self.backend.write_atomic(self.layout.tag(name, tag), str(digest).encode())
        self._forget(("tag", name, tag), ("tags", name))

    def tag_digest(self, name: str, tag: str) -> Digest | None:
        path = self.layout.tag(name, validate_tag(tag))
        raw = self._recalled(("tag", name, tag), lambda: self.backend.read(path))
        if raw is None:
            return None
        try:
            return Digest.parse(raw.decode().strip())
        except (UnicodeDecodeError, DigestInvalid):
            return None  # a damaged tag file reads as absent; verify reports it

    def tag_age(self, name: str, tag: str) -> float | None:
        """Seconds since the tag was set or last revalidated; None when absent."""
        mtime = self.backend.mtime(self.layout.tag(name, tag))
        return None if mtime is None else max(0.0, time.time() - mtime)

    def touch_tag(self, name: str, tag: str) -> None:
        self.backend.touch(self.layout.tag(name, tag))

    def record_pull(self, name: str, digest: Digest) -> None:
        """A cached blob was served: link it into `name` and restart its LRU clock."""
        self.backend.touch(self.layout.blob(digest))
        self.backend.ensure(self.layout.layer(name, digest))

    def resolve(self, name: str, reference: str) -> Digest:
        """A tag or digest → the digest of a revision present in `name`."""
        if ":" in reference:
            digest = Digest.parse(reference)
        else:
            found = self.tag_digest(name, reference)
            if found is None:
                raise ManifestUnknown(detail={"tag": reference})
            digest = found
        return digest

    def media_type(self, name: str, digest: Digest) -> str | None:
        """The media type of a revision of `name`; None when it is not in the repository.

        Remembered per revision and checked with one stat: a rewrite replaces the file
        (a new inode), a delete removes it.
        """
        path = self.layout.revision(name, digest)
        if self.recall is not None:  # an object store: one read, remembered briefly
            return self._recalled(("media", name, digest), lambda: self._read_media_type(path))
        version = self.backend.version(path)
        if version is None:
            return None
        key = (name, digest)
        hit = self._media_types.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        raw = self.backend.read(path)
        if not raw:
            return None
        media_type = raw.decode(errors="replace").strip()
        if len(self._media_types) > MAX_REMEMBERED:
            self._media_types.clear()
        self._media_types[key] = (version, media_type)
        return media_type

    def _read_media_type(self, path: Path) -> str | None:
        raw = self.backend.read(path)
        return raw.decode(errors="replace").strip() if raw else None

    def get_manifest(self, name: str, reference: str) -> StoredManifest:
        """The manifest `reference` (tag or digest) of `name`: digest, media type, bytes."""
        digest = self.resolve(name, reference)
        media_type = self.media_type(name, digest)
        if media_type is None:
            raise ManifestUnknown(detail={"reference": reference})
        data = self.manifests.get(digest)
        if data is None:
            data = self.backend.read(self.layout.blob(digest))
            if data is None:
                raise ManifestUnknown(detail={"reference": reference})
            self.manifests.put(digest, data)
        return StoredManifest(digest, media_type, data)

    def has_manifest(self, name: str, digest: Digest) -> bool:
        return self.backend.exists(self.layout.revision(name, digest))

    def delete_tag(self, name: str, tag: str) -> None:
        self._forget(("tag", name, tag), ("tags", name))
        if not self.backend.remove(self.layout.tag(name, tag)):
            raise ManifestUnknown(detail={"tag": tag})

    def delete_manifest(self, name: str, digest: Digest, lock: bool = True) -> None:
        """Remove a revision, every tag pointing at it and its referrer entry.

        `lock=False` is for gc, which already holds the store lock exclusively: flock
        treats each open of the lock file separately, so taking it shared again from
        the same process would wait for ourselves forever.
        """
        revision = self.layout.revision(name, digest)
        if not self.backend.exists(revision):
            raise ManifestUnknown(detail={"digest": str(digest)})
        data = self.manifests.get(digest) or self.backend.read(self.layout.blob(digest))
        self._forget(("media", name, digest), ("linked", name, digest), ("tags", name))
        with self.shared_lock() if lock else contextlib.nullcontext():
            for tag in self.tags(name, missing_ok=True):
                if self.tag_digest(name, tag) == digest:
                    self._forget(("tag", name, tag))
                    self.backend.remove(self.layout.tag(name, tag))
            self.backend.remove(revision)
            if data is not None:
                try:
                    subject = mf.parse(data).subject
                except RegistryError:
                    subject = None
                if subject is not None:
                    link = self.layout.referrer(name, subject.digest, digest)
                    self.backend.remove(link)
                    self.backend.prune(link.parent, self.layout.repo(name))

    # ---- listings ----------------------------------------------------------------------

    def repository_exists(self, name: str) -> bool:
        # one listing: on an object store a folder is no object a HEAD could find
        return any(entry in REPO_MARKERS for entry in self.backend.names(self.layout.repo(name)))

    def cached_tags(self, name: str) -> list[str] | None:
        """The remembered tag list of `name` if its folder has not changed (one stat), else
        None (also whenever the backend cannot vouch for the folder: see `version`)."""
        version = self.backend.version(self.layout.tags_dir(name))
        hit = self._tag_lists.get(name)
        if version is None or hit is None or hit[0] != version:
            return None
        return list(hit[1])

    def tags(self, name: str, missing_ok: bool = False) -> list[str]:
        """Sorted tags of `name`; `NameUnknown` when the repository does not exist."""
        if self.recall is not None:  # an object store: one listing, remembered briefly
            found = self._recalled(("tags", name), lambda: self._list_tags(name))
            if found is None:
                if not missing_ok:
                    raise NameUnknown(detail={"name": name})
                return []
            return list(found)
        folder = self.layout.tags_dir(name)
        version = self.backend.version(folder)
        if version is None and not missing_ok and not self.repository_exists(name):
            raise NameUnknown(detail={"name": name})
        tags = sorted(self.backend.names(folder))
        if version is not None:  # a backend that can vouch for the folder (see `version`)
            if len(self._tag_lists) > MAX_REMEMBERED:
                self._tag_lists.clear()
            self._tag_lists[name] = (version, tuple(tags))
        return tags

    def _list_tags(self, name: str) -> tuple[str, ...] | None:
        """The tags of `name` from one listing of the repository (its `_tags/` folder's
        entries); None when it is no repository."""
        folder = self.layout.tags_dir(name)
        tags = self.backend.names(folder)
        if not tags and not self.repository_exists(name):
            return None
        return tuple(sorted(tags))

    def repositories(self) -> list[str]:
        """Every repository name in the store, sorted.

        One listing per folder above the repositories' metadata. On an object store each
        listing is a round trip, so the folders of one depth are listed together
        (`LISTING_THREADS` at a time): a thousand repositories cost a thousand requests
        either way, but not a thousand round trips in a row.
        """
        found: list[str] = []
        pending = [""]
        threads = 1 if self.backend.local else LISTING_THREADS
        with ThreadPoolExecutor(threads, thread_name_prefix="regproxy-list") as pool:
            while pending:
                root = self.layout.repositories
                folders = [root / prefix if prefix else root for prefix in pending]
                names = self.backend.names
                listings = pool.map(names, folders) if threads > 1 else map(names, folders)
                deeper: list[str] = []
                for prefix, entries in zip(pending, listings, strict=True):
                    if prefix and any(entry in REPO_MARKERS for entry in entries):
                        found.append(prefix)
                    deeper += [f"{prefix}/{e}" if prefix else e for e in entries if e[:1] != "_"]
                pending = deeper
        return sorted(found)

    def revisions(self, name: str) -> list[tuple[Digest, float]]:
        """Every manifest revision of `name` with the mtime of its link."""
        found = []
        folder = self.layout.revisions_dir(name)
        for algorithm in self.backend.names(folder):
            for hex_ in self.backend.names(folder / algorithm):
                try:
                    digest = Digest.parse(f"{algorithm}:{hex_}")
                except DigestInvalid:
                    continue
                mtime = self.backend.mtime(folder / algorithm / hex_)
                if mtime is not None:
                    found.append((digest, mtime))
        return found

    def referrer_digests(self, name: str, subject: Digest) -> list[Digest]:
        out = []
        for entry in self.backend.names(self.layout.referrers_dir(name, subject)):
            algorithm, _, hex_ = entry.partition("-")
            try:
                out.append(Digest.parse(f"{algorithm}:{hex_}"))
            except DigestInvalid:
                continue
        return out

    def manifest_bytes(self, digest: Digest) -> bytes | None:
        data = self.manifests.get(digest)
        return data if data is not None else self.backend.read(self.layout.blob(digest))

    def iter_blobs(self) -> Iterator[tuple[Digest, int, float]]:
        """Every blob file: digest, size, mtime (files that do not parse are skipped)."""
        for entry in self.backend.files(self.layout.blobs):
            algorithm, _, rest = entry.name.partition("/")
            try:
                digest = Digest.parse(f"{algorithm}:{rest.rpartition('/')[2]}")
            except DigestInvalid:
                continue
            yield digest, entry.size, entry.mtime

    def referrers(self, name: str, subject: Digest, artifact_type: str | None = None) -> list[dict]:
        """Descriptors of manifests in `name` whose subject is `subject`."""
        out: list[dict] = []
        for digest in sorted(self.referrer_digests(name, subject), key=str):
            try:
                stored = self.get_manifest(name, str(digest))
                parsed = mf.parse(stored.data, stored.media_type)
            except RegistryError:  # a dangling or damaged entry is skipped; verify reports it
                continue
            kind = parsed.referrer_artifact_type()
            if artifact_type is not None and kind != artifact_type:
                continue
            out.append(
                mf.Descriptor(
                    stored.media_type,
                    digest,
                    len(stored.data),
                    artifact_type=kind,
                    annotations=parsed.annotations or None,
                ).to_json()
            )
        return out

    def mark_pulled(self, name: str) -> None:
        """Record a pull of a cached repository (LRU eviction reads its mtime)."""
        path = self.layout.pulled(name)
        if self.backend.exists(path):
            self.backend.touch(path)
        else:
            self.backend.ensure(path)
