"""Stores for the offline commands, built fast and directly (no server in between).

``verify``: a few large blobs through ``Store.commit_blob``/``put_manifest`` (the real write
path, fsync included). ``gc``: 100k blobs and 10k manifests written straight into the
layout that ``storage.layout.Layout`` describes, without fsync: building it through the
store's durable writes would take minutes, and gc only reads it. ``s3``: the same layout,
smaller, written as objects into a bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from regproxy import manifest as mf
from regproxy.digest import Digest
from regproxy.storage.layout import Layout, temp_name
from regproxy.storage.store import Store

from .client import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, BlobSource


def _digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def _put_blob(store: Store, name: str, data: bytes, digest: Digest) -> None:
    """A blob the way an upload commits one: a temp file, fsync, ``Store.commit_blob``."""
    staged = temp_name(store.layout.tmp)
    with open(staged, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    store.commit_blob(name, staged, digest)


def _manifest(config: tuple[Digest, int], layers: list[tuple[Digest, int]]) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": str(config[0]), "size": config[1]},
        "layers": [{"mediaType": OCI_LAYER, "digest": str(d), "size": n} for d, n in layers],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def build_verify_store(root: Path, source: BlobSource, total: int, blob_size: int) -> int:
    """``total`` bytes in blobs of ``blob_size``, referenced by one tagged manifest.

    Returns the bytes stored in blobs (the large ones plus config and manifest).
    """
    store = Store(root)
    name = "bench/verify"
    layers = []
    for i in range(max(1, total // blob_size)):
        offset = (i * blob_size) % max(1, len(source.data) - blob_size + 1)
        blob = source.blob(offset, blob_size, f"verify-{i}")
        _put_blob(store, name, blob.tobytes(), Digest.parse(blob.digest))
        layers.append((Digest.parse(blob.digest), blob.size))
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    _put_blob(store, name, config, _digest(config))
    data = _manifest((_digest(config), len(config)), layers)
    store.put_manifest(name, data, mf.parse(data, OCI_MANIFEST), _digest(data), "latest")
    return sum(n for _, n in layers) + len(config) + len(data)


@dataclass
class GcStore:
    blobs: int
    manifests: int
    orphans: int
    repositories: int
    seconds: float
    #: blobs nothing references: the orphans, plus pool layers no image drew (the
    #: folder store's are as new as the run, so only a gc with no grace period sees them)
    unreferenced: int = 0


def plan_gc_store(
    layout: Layout, blobs: int, manifests: int, repos: int, seed: int = 7
) -> Iterator[tuple[Path, bytes, bool]]:
    """The files of a gc store, as (path, content, is an orphan blob): ``manifests``
    tagged image manifests (each: its own config and 8 layers drawn from a shared pool)
    spread over ``repos`` repositories with their links, plus 5% orphan blobs; ``blobs``
    blob files in all (manifests are blobs too). Every blob comes before what refers to it.
    """
    orphans = blobs // 20
    pool_size = max(8, blobs - 2 * manifests - orphans)  # layers shared between images
    rng = random.Random(seed)
    pool = []
    for i in range(pool_size):
        data = f"layer {i} of the benchmark pool".encode()
        digest = _digest(data)
        pool.append((digest, len(data)))
        yield layout.blob(digest), data, False
    for m in range(manifests):
        name = f"bench/repo{m % repos:05d}"
        data = f'{{"architecture":"amd64","os":"linux","n":{m}}}'.encode()
        config = _digest(data), len(data)
        yield layout.blob(config[0]), data, False
        layers = rng.sample(pool, 8)
        data = _manifest(config, layers)
        digest = _digest(data)
        yield layout.blob(digest), data, False
        yield layout.revision(name, digest), OCI_MANIFEST.encode(), False
        yield layout.tag(name, f"v{m // repos}"), str(digest).encode(), False
        for d, _n in (config, *layers):
            yield layout.layer(name, d), b"", False
    for i in range(orphans):
        data = f"orphan {i}".encode()
        yield layout.blob(_digest(data)), data, True


def _gc_shape(blobs: int, manifests: int, repos: int | None) -> tuple[int, int, int]:
    """(repositories, orphans, blob files) of `plan_gc_store`'s store."""
    repos = repos or max(1, manifests // 10)
    orphans = blobs // 20
    pool_size = max(8, blobs - 2 * manifests - orphans)
    return repos, orphans, pool_size + 2 * manifests + orphans


def build_gc_store(
    root: Path, blobs: int, manifests: int, *, repos: int | None = None, seed: int = 7
) -> GcStore:
    """`plan_gc_store` written into a folder, orphans older than gc's default grace."""
    started = time.perf_counter()
    layout = Layout(root)
    for folder in (layout.blobs, layout.repositories, layout.tmp):
        folder.mkdir(parents=True, exist_ok=True)
    repos, orphans, count = _gc_shape(blobs, manifests, repos)
    made_dirs: set[Path] = set()
    old = time.time() - 2 * 3600
    for path, data, orphan in plan_gc_store(layout, blobs, manifests, repos, seed):
        parent = path.parent
        if parent not in made_dirs:
            parent.mkdir(parents=True, exist_ok=True)
            made_dirs.add(parent)
        with open(path, "wb") as f:
            f.write(data)
        if orphan:
            os.utime(path, (old, old))
    return GcStore(count, manifests, orphans, repos, time.perf_counter() - started)


def build_gc_store_s3(
    client: Any,
    bucket: str,
    prefix: str,
    blobs: int,
    manifests: int,
    *,
    repos: int | None = None,
    seed: int = 7,
    threads: int = 16,
) -> GcStore:
    """`plan_gc_store` written straight into ``s3://bucket/prefix`` with plain PUTs from
    ``threads`` threads, keyed as regproxy's `S3Backend` keys a store's paths
    (``<prefix>/<path under the store root>``). An object store cannot backdate an
    object, so the orphans are as new as the rest: gc finds them with ``--grace 0``.
    """
    started = time.perf_counter()
    root = PurePosixPath("/store")
    layout = Layout(Path(root))
    repos, orphans, count = _gc_shape(blobs, manifests, repos)
    stored: set[str] = set()
    referenced: set[str] = set()

    def put(item: tuple[Path, bytes, bool]) -> None:
        relative = PurePosixPath(item[0]).relative_to(root).as_posix()
        client.put_object(Bucket=bucket, Key=f"{prefix}/{relative}", Body=item[1])

    def planned() -> Iterator[tuple[Path, bytes, bool]]:
        for item in plan_gc_store(layout, blobs, manifests, repos, seed):
            path = PurePosixPath(item[0])
            # a repository's layer and revision links name every blob an image needs
            (stored if path.parts[2] == "blobs" else referenced).add(path.name)
            yield item

    with ThreadPoolExecutor(threads) as pool:
        # blobs first, then what refers to them, as a registry writes them
        for _ in pool.map(put, planned()):
            pass
    unreferenced = len(stored - referenced)
    return GcStore(count, manifests, orphans, repos, time.perf_counter() - started, unreferenced)
