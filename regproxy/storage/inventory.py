"""The data behind `regproxy ls`: repositories, tags, manifests, platforms and sizes.

Returns dataclasses and never prints. Sizes are bytes on disk: a blob counts
once per repository however many manifests share it, and only when present (a
cache holds what was pulled, not always whole images). A repository's bytes
are split into *unique* (no other repository of the same store needs the blob)
and *shared*, so an operator sees what deleting a repository would free.

Times come from the files themselves (see `layout`): a tag's mtime is when it
was last set (or, in the cache, last revalidated upstream), a revision link's
is when the manifest was pushed (or fetched), and a cached repository's
`_pulled` marker is touched on every pull.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from regproxy import manifest as mf
from regproxy.digest import Digest
from regproxy.errors import RegistryError
from regproxy.storage.layout import LAYERS
from regproxy.storage.store import Store

LOCAL, PROXY = "local", "proxy"
#: image config types whose JSON names the platform
CONFIG_TYPES = frozenset(
    {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
)
MAX_CONFIG_READ = 1024 * 1024


@dataclass
class TagInfo:
    tag: str
    digest: str
    #: when the tag was last set (cache: fetched or revalidated upstream)
    updated: float | None


@dataclass
class ManifestInfo:
    digest: str
    media_type: str | None
    #: bytes on disk of the manifest and everything it needs (each blob once)
    size: int
    platforms: list[str] = field(default_factory=list)
    artifact_type: str | None = None
    tags: list[str] = field(default_factory=list)
    #: when the revision was pushed or fetched
    pushed: float | None = None
    #: every blob and child manifest it needs is present
    complete: bool = True
    #: an index's manifests (digests)
    children: list[str] = field(default_factory=list)


@dataclass
class RepositoryInfo:
    #: the name to pull: `app/web`, or `p/<upstream>/<remote>` for cached content
    name: str
    kind: str
    upstream: str | None
    remote: str | None
    tags: list[TagInfo]
    manifests: list[ManifestInfo]
    size: int = 0
    unique_size: int = 0
    shared_size: int = 0
    #: newest push (local) or fetch/revalidation (cache)
    updated: float | None = None
    last_pulled: float | None = None
    last_revalidated: float | None = None


@dataclass
class StoreTotals:
    kind: str
    root: str
    repositories: int = 0
    blobs: int = 0
    bytes: int = 0


@dataclass
class Inventory:
    repositories: list[RepositoryInfo]
    stores: list[StoreTotals]


def _platform(p: dict | None) -> str | None:
    if not isinstance(p, dict):
        return None
    os_, arch = p.get("os"), p.get("architecture")
    if not isinstance(os_, str) or not isinstance(arch, str) or os_ == "unknown":
        return None  # attestation manifests of buildkit say unknown/unknown
    variant = p.get("variant")
    return f"{os_}/{arch}/{variant}" if isinstance(variant, str) and variant else f"{os_}/{arch}"


class _StoreScan:
    """One pass over a store: blob sizes, then each repository's manifests."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.sizes: dict[str, int] = {str(d): size for d, size, _ in store.iter_blobs()}
        self._parsed: dict[str, mf.Manifest | None] = {}

    def parse(self, name: str, digest: Digest) -> mf.Manifest | None:
        key = str(digest)
        if key not in self._parsed:
            data = self.store.manifest_bytes(digest) if key in self.sizes else None
            try:
                parsed = (
                    mf.parse(data, self.store.media_type(name, digest))
                    if data is not None
                    else None
                )
            except RegistryError:
                parsed = None
            self._parsed[key] = parsed
        return self._parsed[key]

    def config_platform(self, parsed: mf.Manifest) -> str | None:
        if parsed.config_media_type not in CONFIG_TYPES or not parsed.blobs:
            return None
        config = parsed.blobs[0]
        if self.sizes.get(str(config.digest), MAX_CONFIG_READ + 1) > MAX_CONFIG_READ:
            return None
        data = self.store.backend.read(self.store.blob_path(config.digest))
        try:
            doc = json.loads(data or b"")
        except ValueError:
            return None
        return _platform(doc) if isinstance(doc, dict) else None

    def closure(self, name: str, digest: Digest) -> tuple[set[str], bool]:
        """Digests a manifest needs (itself included) and whether all are present."""
        needed: set[str] = set()
        complete = True
        for current, parsed in mf.walk(digest, functools.partial(self.parse, name)):
            needed.add(str(current))
            if parsed is None:
                complete = False
                continue
            for desc in parsed.blobs:
                needed.add(str(desc.digest))
                complete = complete and str(desc.digest) in self.sizes
        return needed, complete

    def size_of(self, digests: Iterable[str]) -> int:
        return sum(self.sizes.get(d, 0) for d in digests)

    def linked_blobs(self, name: str) -> set[str]:
        folder = self.store.layout.repo(name) / LAYERS
        return {
            f"{algorithm}:{hex_}"
            for algorithm in self.store.backend.names(folder)
            for hex_ in self.store.backend.names(folder / algorithm)
        }


def _platforms_from_indexes(scan: _StoreScan, name: str, manifests: list[ManifestInfo]) -> None:
    """A child's platform is what its index advertises (what clients select on)."""
    by_digest = {m.digest: m for m in manifests}
    for m in manifests:
        parsed = scan.parse(name, Digest.parse(m.digest)) if m.children else None
        for desc in parsed.children if parsed else ():
            child = by_digest.get(str(desc.digest))
            platform = _platform(desc.platform)
            if child is not None and platform:
                child.platforms = [platform]


def _repository(
    scan: _StoreScan, name: str, kind: str, prefix: str
) -> tuple[RepositoryInfo, set[str]]:
    store = scan.store
    tags: list[TagInfo] = []
    by_digest: dict[str, list[str]] = {}
    for tag in store.tags(name, missing_ok=True):
        digest = store.tag_digest(name, tag)
        if digest is None:
            continue
        mtime = store.backend.mtime(store.layout.tag(name, tag))
        tags.append(TagInfo(tag, str(digest), mtime))
        by_digest.setdefault(str(digest), []).append(tag)
    manifests: list[ManifestInfo] = []
    owned: set[str] = set()
    for digest, mtime in sorted(store.revisions(name), key=lambda r: str(r[0])):
        needed, complete = scan.closure(name, digest)
        owned |= needed
        parsed = scan.parse(name, digest)
        info = ManifestInfo(
            str(digest),
            store.media_type(name, digest),
            scan.size_of(needed),
            tags=sorted(by_digest.get(str(digest), [])),
            pushed=mtime,
            complete=complete,
        )
        if parsed is not None:
            if parsed.is_index:
                info.children = [str(d.digest) for d in parsed.children]
                found = (_platform(d.platform) for d in parsed.children)
                info.platforms = sorted({p for p in found if p})
            else:
                platform = scan.config_platform(parsed)
                info.platforms = [platform] if platform else []
                if parsed.artifact_type or parsed.config_media_type not in CONFIG_TYPES:
                    info.artifact_type = parsed.referrer_artifact_type()
        manifests.append(info)
    _platforms_from_indexes(scan, name, manifests)
    owned |= scan.linked_blobs(name)
    owned &= scan.sizes.keys()
    times = [t.updated for t in tags if t.updated] + [m.pushed for m in manifests if m.pushed]
    upstream = remote = None
    display = name
    last_pulled = last_revalidated = None
    if kind == PROXY:
        upstream, _, remote = name.partition("/")
        display = f"{prefix}/{name}"
        last_pulled = store.backend.mtime(store.layout.pulled(name))
        revalidated = [t.updated for t in tags if t.updated]
        last_revalidated = max(revalidated) if revalidated else None
    repository = RepositoryInfo(
        display,
        kind,
        upstream,
        remote,
        tags,
        manifests,
        size=scan.size_of(owned),
        updated=max(times) if times else None,
        last_pulled=last_pulled,
        last_revalidated=last_revalidated,
    )
    return repository, owned


def scan_store(
    store: Store, kind: str, proxy_prefix: str = "p"
) -> tuple[list[RepositoryInfo], StoreTotals]:
    """Every repository of one store, with unique/shared bytes computed within the store."""
    scan = _StoreScan(store)
    found: list[tuple[RepositoryInfo, set[str]]] = []
    users: Counter[str] = Counter()
    for name in store.repositories():
        try:
            info, owned = _repository(scan, name, kind, proxy_prefix)
        except RegistryError:
            continue  # a name that no longer validates; verify reports damage
        found.append((info, owned))
        users.update(owned)
    for info, owned in found:
        info.unique_size = scan.size_of(d for d in owned if users[d] == 1)
        info.shared_size = info.size - info.unique_size
    totals = StoreTotals(
        kind, store.location, len(found), len(scan.sizes), sum(scan.sizes.values())
    )
    return [info for info, _ in found], totals


def inventory(
    stores: Iterable[tuple[str, Store]],
    name_prefix: str | None = None,
    proxy_prefix: str = "p",
) -> Inventory:
    """Repositories of the given `(kind, store)` pairs whose name starts with `name_prefix`."""
    repositories: list[RepositoryInfo] = []
    totals: list[StoreTotals] = []
    for kind, store in stores:
        scanned, store_totals = scan_store(store, kind, proxy_prefix)
        totals.append(store_totals)
        repositories += [r for r in scanned if not name_prefix or r.name.startswith(name_prefix)]
    return Inventory(repositories, totals)
