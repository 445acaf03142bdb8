"""Stores for the offline commands, built fast and directly (no server in between).

``verify``: a few large blobs through ``Store.commit_blob``/``put_manifest`` (the real write
path, fsync included). ``gc``: 100k blobs and 10k manifests written straight into the
layout that ``storage.layout.Layout`` describes, without fsync: building it through the
store's durable writes would take minutes, and gc only reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

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


def build_gc_store(
    root: Path, blobs: int, manifests: int, *, repos: int | None = None, seed: int = 7
) -> GcStore:
    """``manifests`` tagged image manifests (each: its own config and 8 layers drawn from
    a shared pool) spread over ``repos`` repositories, plus 5% orphan blobs older than gc's
    default grace period; ``blobs`` blob files in all (manifests are blobs too).
    """
    started = time.perf_counter()
    layout = Layout(root)
    for folder in (layout.blobs, layout.repositories, layout.tmp):
        folder.mkdir(parents=True, exist_ok=True)
    repos = repos or max(1, manifests // 10)
    orphans = blobs // 20
    pool_size = max(8, blobs - 2 * manifests - orphans)  # layers shared between images
    rng = random.Random(seed)
    made_dirs: set[Path] = set()

    def write(path: Path, data: bytes) -> None:
        parent = path.parent
        if parent not in made_dirs:
            parent.mkdir(parents=True, exist_ok=True)
            made_dirs.add(parent)
        with open(path, "wb") as f:
            f.write(data)

    def put_blob(data: bytes) -> tuple[Digest, int]:
        digest = _digest(data)
        write(layout.blob(digest), data)
        return digest, len(data)

    pool = [put_blob(f"layer {i} of the benchmark pool".encode()) for i in range(pool_size)]
    count = pool_size
    for m in range(manifests):
        name = f"bench/repo{m % repos:05d}"
        config = put_blob(f'{{"architecture":"amd64","os":"linux","n":{m}}}'.encode())
        layers = rng.sample(pool, 8)
        data = _manifest(config, layers)
        digest, _ = put_blob(data)
        count += 2
        write(layout.revision(name, digest), OCI_MANIFEST.encode())
        write(layout.tag(name, f"v{m // repos}"), str(digest).encode())
        for d, _n in (config, *layers):
            write(layout.layer(name, d), b"")
    old = time.time() - 2 * 3600
    for i in range(orphans):
        digest, _ = put_blob(f"orphan {i}".encode())
        os.utime(layout.blob(digest), (old, old))
        count += 1
    return GcStore(count, manifests, orphans, repos, time.perf_counter() - started)
