"""Filling stores for storage tests: push through a real server, age files, snapshot trees."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from aiohttp.test_utils import TestClient

from regproxy import manifest as mf
from regproxy.digest import Digest, of_bytes
from regproxy.storage.fs import FsBackend
from regproxy.storage.layout import temp_name
from regproxy.storage.store import Store
from tests.support.oci import (
    Image,
    make_image,
    make_index,
    push_blob,
    push_image,
    put_manifest,
    sha256,
)


def put_blob(store: Store, name: str, data: bytes) -> Digest:
    """Store `data` as a blob linked into `name` the way the server does: a finished temp
    file committed by `Store.commit_blob` (uploads and proxy fetches alike)."""
    digest = of_bytes(data)
    staged = temp_name(store.layout.tmp)
    staged.write_bytes(data)
    store.commit_blob(name, staged, digest)
    return digest


def age_tree(root: Path, seconds: float) -> None:
    """Move every file's mtime `seconds` into the past (outside any grace period)."""
    then = time.time() - seconds
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            os.utime(Path(dirpath, name), (then, then))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Relative path → (size, mtime_ns) of every file under `root` but the lock file."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if rel != "lock":
                st = path.stat()
                out[rel] = (st.st_size, st.st_mtime_ns)
    return out


def blob_path(root: Path, digest: str) -> Path:
    algorithm, _, hex_ = digest.partition(":")
    return root / "blobs" / algorithm / hex_[:2] / hex_


async def push_index(
    client: TestClient, name: str, tag: str, n: int = 2, media_type: str | None = None
) -> tuple[Image, list[Image]]:
    """Children pushed by digest (untagged), then an index over them under `tag`."""
    children = [make_image() for _ in range(n)]
    for child in children:
        await push_image(client, name, child, child.digest)
    data, digest = make_index(children, *([media_type] if media_type else []))
    index = Image(data, digest, b"", [], media_type or "application/vnd.oci.image.index.v1+json")
    index.blobs = []  # an index needs manifests, not blobs
    resp = await put_manifest(client, name, tag, data, index.media_type)
    assert resp.status == 201, await resp.text()
    return index, children


async def push_orphan(client: TestClient, name: str, size: int = 500) -> str:
    """A blob no manifest references (what an interrupted push leaves)."""
    return await push_blob(client, name, os.urandom(size))


async def assert_pullable(client: TestClient, name: str, image: Image) -> None:
    """The manifest by digest, and every blob with its exact bytes."""
    resp = await client.get(
        f"/v2/{name}/manifests/{image.digest}", headers={"Accept": image.media_type}
    )
    assert resp.status == 200, (name, image.digest, await resp.text())
    assert await resp.read() == image.manifest
    for blob in image.blobs:
        resp = await client.get(f"/v2/{name}/blobs/{sha256(blob)}")
        assert resp.status == 200, (name, sha256(blob), resp.status)
        assert await resp.read() == blob


class NoSyncBackend(FsBackend):
    """The filesystem backend without fsync or locks: for generating large stores quickly
    in a test where nothing else writes to them."""

    def shared_lock(self, path: Path) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    exclusive_lock = shared_lock

    def write_atomic(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(path.parent)
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def move_into(self, src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)

    def ensure(self, path: Path) -> None:
        if not os.path.exists(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()


def cache_image(store: Store, name: str, layers: int = 2, size: int = 1000) -> list[Digest]:
    """Put a manifest and its blobs into a proxy-style store as a pull would."""
    blobs = [os.urandom(size) for _ in range(layers)]
    for data in blobs:
        put_blob(store, name, data)
    config = json.dumps({"os": "linux", "architecture": "amd64", "n": name}).encode()
    put_blob(store, name, config)
    doc = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_MANIFEST,
        "config": {"mediaType": mf.OCI_MANIFEST, "digest": str(of_bytes(config)), "size": 1},
        "layers": [
            {"mediaType": "application/octet-stream", "digest": str(of_bytes(b)), "size": len(b)}
            for b in blobs
        ],
    }
    doc["config"]["mediaType"] = "application/vnd.oci.image.config.v1+json"
    data = json.dumps(doc).encode()
    digest = of_bytes(data)
    store.put_manifest(name, data, mf.parse(data), digest, tag="latest", check_references=False)
    store.mark_pulled(name)
    return [digest, of_bytes(config), *(of_bytes(b) for b in blobs)]
