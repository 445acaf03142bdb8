"""`storage.verify`: corruption, referential integrity, strays, and what `repair` does."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from regproxy.config import Config
from regproxy.digest import Digest, of_bytes
from regproxy.storage import stores
from regproxy.storage import verify as v
from regproxy.storage.layout import TEMP_MAX_AGE
from regproxy.storage.store import Store
from tests.storage.helpers import (
    age_tree,
    blob_path,
    push_index,
    push_orphan,
    put_blob,
    snapshot,
)
from tests.support.inprocess import start_client
from tests.support.oci import make_artifact, make_image, push_image, sha256
from tests.support.s3store import s3_config
from tests.support.seaweed import SeaweedS3


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _run(config: Config, repair: bool = False, **kwargs: Any) -> v.VerifyReport:
    targets = [v.Target("registry", Store(config.registry_storage))]
    if config.proxy_storage.exists():
        targets.append(v.Target("proxy", Store(config.proxy_storage), cached=True))
    return v.verify(targets, config.temporary_registry_storage, 86400.0, repair, **kwargs)


def _kinds(report: v.VerifyReport) -> list[tuple[str, str]]:
    return sorted((p.store, p.kind) for p in report.problems)


async def test_clean_store_has_no_problems(client: TestClient, config: Config) -> None:
    await push_image(client, "app", make_image(layer_sizes=(300_000, 5000)), "v1")
    await push_index(client, "multi", "latest")
    subject = make_image()
    await push_image(client, "multi", subject, "signed")
    sig = make_artifact("application/vnd.example.sig", subject=subject)
    await push_image(client, "multi", sig, sig.digest)
    report = _run(config)
    assert report.ok, report.problems
    files = {d: s for d, s, _ in Store(config.registry_storage).iter_blobs()}
    assert report.blobs_hashed == len(files)
    assert report.bytes_hashed == sum(files.values())
    registry = next(s for s in report.stores if s.store == "registry")
    assert (registry.repositories, registry.tags) == (2, 3)


async def test_corrupt_pushed_layer_is_found_and_quarantined(
    client: TestClient, config: Config
) -> None:
    root = config.registry_storage
    shared = make_image()
    await push_image(client, "app", shared, "v1")
    await push_image(client, "app", shared, "latest")
    _index, children = await push_index(client, "multi", "v2")
    bad_layer = sha256(children[0].layers[0])
    _flip_byte(blob_path(root, bad_layer))
    bad_shared = sha256(shared.layers[1])
    _flip_byte(blob_path(root, bad_shared))

    report = _run(config)
    corrupt = {p.digest: p for p in report.problems if p.kind == v.CORRUPT}
    assert set(corrupt) == {bad_layer, bad_shared}
    assert corrupt[bad_layer].path == str(blob_path(root, bad_layer))
    assert "does not match its digest" in corrupt[bad_layer].message
    # the child needs it directly, the index through the child
    assert set(corrupt[bad_layer].needed_by) == {"multi:v2", f"multi@{children[0].digest}"}
    assert set(corrupt[bad_shared].needed_by) == {"app:latest", "app:v1"}
    assert all(p.repair is None for p in report.problems)

    before = snapshot(root)
    report = _run(config, repair=True)
    for digest in (bad_layer, bad_shared):
        hex_ = digest.split(":")[1]
        assert not blob_path(root, digest).exists()
        moved = root / "quarantine" / "sha256" / hex_
        assert moved.exists(), "pushed data is moved, never deleted"
        note = json.loads((root / "quarantine" / "sha256" / f"{hex_}.json").read_text())
        assert note["digest"] == digest and note["needed_by"]
        assert corrupt[digest].needed_by == note["needed_by"]
    assert all(p.repair and "quarantine" in p.repair for p in report.problems)
    # nothing else changed
    after = snapshot(root)
    gone = set(before) - set(after)
    assert gone == {f"blobs/sha256/{d.split(':')[1][:2]}/{d.split(':')[1]}" for d in corrupt}

    # what is left is reported as missing until the images are pushed again
    again = _run(config)
    assert {p.kind for p in again.problems} == {v.MISSING_BLOB, v.ORPHANED_LINK}
    assert not again.ok


async def test_corrupt_cached_blob_is_removed(client: TestClient, config: Config) -> None:
    proxy = Store(config.proxy_storage)
    digest = put_blob(proxy, "up/library/alpine", os.urandom(5000))
    _flip_byte(proxy.blob_path(digest))
    report = _run(config, repair=True)
    assert _kinds(report) == [("proxy", v.CORRUPT)]
    assert "next pull" in (report.problems[0].repair or "")
    assert not proxy.has_blob(digest)
    assert not (config.proxy_storage / "quarantine").exists()
    assert _run(config).ok  # a partial cache is not a problem


async def test_corrupt_manifest_bytes(client: TestClient, config: Config) -> None:
    root = config.registry_storage
    image = make_image()
    await push_image(client, "app", image, "v1")
    path = blob_path(root, image.digest)
    path.write_bytes(path.read_bytes().replace(b"schemaVersion", b"schemaVersiom"))
    report = _run(config)
    assert _kinds(report) == [("registry", v.CORRUPT)]
    assert report.problems[0].needed_by == ["app:v1"]


async def test_referential_integrity(client: TestClient, config: Config) -> None:
    """Dangling tags, missing blobs and links, orphaned links and referrer entries."""
    root = config.registry_storage
    store = Store(root)
    a, b = make_image(), make_image()
    await push_image(client, "app", a, "a")
    await push_image(client, "app", b, "b")
    # a tag pointing at a manifest the repository does not have
    (root / "repositories/app/_tags/ghost").write_text(sha256(b"nothing"))
    # a tag that is not a digest
    (root / "repositories/app/_tags/garbled").write_text("not a digest")
    # b's layer link lost: pulls of that blob would say BLOB_UNKNOWN
    layer = sha256(b.layers[0])
    link = root / "repositories/app/_layers/sha256" / layer.split(":")[1]
    link.unlink()
    # a link to a blob that is gone
    gone = await push_orphan(client, "app")
    blob_path(root, gone).unlink()
    # a referrer entry for a manifest that is not there
    ref = store.layout.referrer("app", of_bytes(a.manifest), of_bytes(b"missing"))
    ref.parent.mkdir(parents=True)
    ref.touch()
    report = _run(config)
    found = {(p.kind, p.path) for p in report.problems}
    assert (v.DANGLING_TAG, str(root / "repositories/app/_tags/ghost")) in found
    assert (v.BAD_TAG, str(root / "repositories/app/_tags/garbled")) in found
    assert (v.MISSING_LINK, str(link)) in found
    orphan_link = root / "repositories/app/_layers/sha256" / gone.split(":")[1]
    assert (v.ORPHANED_LINK, str(orphan_link)) in found
    assert (v.ORPHANED_LINK, str(ref)) in found
    assert len(found) == 5

    repaired = _run(config, repair=True)
    assert {p.kind: p.repair for p in repaired.problems} == {
        v.DANGLING_TAG: None,
        v.BAD_TAG: None,
        v.MISSING_LINK: "link re-created",
        v.ORPHANED_LINK: "link removed",
    }
    assert link.exists() and not orphan_link.exists() and not ref.exists()
    resp = await client.get(f"/v2/app/blobs/{layer}")
    assert resp.status == 200
    assert _kinds(_run(config)) == [("registry", v.BAD_TAG), ("registry", v.DANGLING_TAG)]


async def test_missing_blob_of_a_manifest(client: TestClient, config: Config) -> None:
    root = config.registry_storage
    image = make_image()
    await push_image(client, "app", image, "v1")
    blob_path(root, sha256(image.config)).unlink()
    report = _run(config, repair=True)
    kinds = {p.kind for p in report.problems}
    assert kinds == {v.MISSING_BLOB, v.ORPHANED_LINK}
    missing = next(p for p in report.problems if p.kind == v.MISSING_BLOB)
    assert missing.digest == sha256(image.config)
    assert f"app@{image.digest}" in missing.message


def test_stray_files(config: Config) -> None:
    store = Store(config.registry_storage)
    old = time.time() - 2 * TEMP_MAX_AGE
    blobs = config.registry_storage / "blobs/sha256/ab"
    blobs.mkdir(parents=True)
    (blobs / "not-a-digest").write_bytes(b"x")
    (blobs / ".tmp-old").write_bytes(b"x")
    (blobs / ".tmp-new").write_bytes(b"x")  # a write in progress: not a problem
    os.utime(blobs / ".tmp-old", (old, old))
    (store.layout.tmp / "staged").write_bytes(b"x")
    os.utime(store.layout.tmp / "staged", (old, old))
    temp = config.temporary_registry_storage
    for name, age in (("expired", 2 * 86400), ("active", 1)):
        (temp / "uploads" / name).mkdir(parents=True)
        (temp / "uploads" / name / "data").write_bytes(b"x")
        age_tree(temp / "uploads" / name, age)
    (temp / "spool").mkdir()
    (temp / "spool" / "leftover").write_bytes(b"x")
    os.utime(temp / "spool" / "leftover", (old, old))
    report = _run(config)
    found = {(p.kind, Path(p.path).name) for p in report.problems}
    assert found == {
        (v.STRAY_FILE, "not-a-digest"),
        (v.STRAY_TEMP, ".tmp-old"),
        (v.STRAY_TEMP, "staged"),
        (v.STRAY_TEMP, "expired"),
        (v.STRAY_TEMP, "leftover"),
    }
    _run(config, repair=True)
    assert sorted(os.listdir(blobs)) == [".tmp-new", "not-a-digest"]
    assert os.listdir(temp / "uploads") == ["active"]
    assert {(p.kind) for p in _run(config).problems} == {v.STRAY_FILE}


def test_hashing_uses_the_worker_pool(config: Config) -> None:
    store = Store(config.registry_storage)
    for _ in range(6):
        put_blob(store, "app", os.urandom(4 * 1024 * 1024))

    class Threads:
        def __init__(self) -> None:
            self.seen: set[int] = set()
            self.total = 0
            self.done = 0
            self.lock = threading.Lock()

        def start(self, total_bytes: int, total_files: int) -> None:
            self.total = total_bytes

        def advance(self, nbytes: int) -> None:
            with self.lock:
                self.seen.add(threading.get_ident())
                self.done += nbytes

    progress = Threads()
    report = v.verify([v.Target("registry", store)], workers=3, progress=progress)
    assert report.ok and report.workers == 3
    assert progress.done == progress.total == 6 * 4 * 1024 * 1024
    assert len(progress.seen) > 1
    assert threading.get_ident() not in progress.seen


# ---- a store on S3 -------------------------------------------------------------------------


def _flip_stored_byte(store: Store, digest: Digest) -> None:
    path = store.blob_path(digest)
    data = bytearray(store.backend.read(path) or b"")
    data[len(data) // 2] ^= 0xFF
    store.backend.write_atomic(path, bytes(data))


async def test_on_s3_corruption_strays_and_leftovers(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both stores on a bucket: hashed through ranged GETs, a key that is no digest is a
    stray, an unfinished multipart upload a leftover; repair quarantines and removes
    through the backend and aborts the upload."""
    config = s3_config(seaweed, s3_bucket, tmp_path)
    client = await start_client(config)
    try:
        image = make_image(layer_sizes=(300_000, 5000))
        await push_image(client, "app", image, "v1")
    finally:
        await client.close()
    registry = stores.open_store(config.registry_storage, config.s3)
    proxy = stores.open_store(config.proxy_storage, config.s3)
    cached = os.urandom(5000)
    staged = tmp_path / "staged"
    staged.write_bytes(cached)
    proxy.commit_blob("up/library/alpine", staged, of_bytes(cached))
    layer = of_bytes(image.layers[0])
    _flip_stored_byte(registry, layer)
    _flip_stored_byte(proxy, of_bytes(cached))
    stray = registry.layout.blobs / "sha256/ab/not-a-digest"
    registry.backend.write_atomic(stray, b"x")
    s3 = seaweed.client()
    upload_key = f"registry/blobs/sha256/cd/{'cd' * 32}"
    s3.create_multipart_upload(Bucket=s3_bucket, Key=upload_key)
    monkeypatch.setattr(v, "TEMP_MAX_AGE", 1.0)
    time.sleep(1.5)  # the upload is older than the (shortened) leftover age

    targets = [v.Target("registry", registry), v.Target("proxy", proxy, cached=True)]
    report = v.verify(targets, config.temporary_registry_storage)
    assert _kinds(report) == [
        ("proxy", v.CORRUPT),
        ("registry", v.CORRUPT),
        ("registry", v.STRAY_FILE),
        ("registry", v.STRAY_TEMP),
    ]
    assert report.blobs_hashed == len(image.blobs) + 1 + 1  # the manifest, the cached blob
    found = {(p.store, p.kind): p for p in report.problems}
    assert found["registry", v.CORRUPT].needed_by == ["app:v1"]
    assert found["registry", v.CORRUPT].path == str(registry.blob_path(layer))
    assert found["registry", v.STRAY_FILE].path == str(stray)
    assert "1 unfinished multipart upload" in found["registry", v.STRAY_TEMP].message

    repaired = v.verify(targets, config.temporary_registry_storage, repair=True)
    done = {(p.store, p.kind): p.repair for p in repaired.problems}
    assert "quarantine" in (done["registry", v.CORRUPT] or "")
    assert "next pull" in (done["proxy", v.CORRUPT] or "")
    assert done["registry", v.STRAY_TEMP] == "removed"
    assert done["registry", v.STRAY_FILE] is None
    assert not registry.has_blob(layer) and not proxy.has_blob(of_bytes(cached))
    quarantine = registry.root / "quarantine" / "sha256"
    assert registry.backend.read(quarantine / layer.hex) is not None
    note = json.loads(registry.backend.read(quarantine / f"{layer.hex}.json") or b"")
    assert note["digest"] == str(layer) and note["needed_by"] == ["app:v1"]
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []

    again = v.verify(targets, config.temporary_registry_storage)
    assert {p.kind for p in again.problems} == {v.MISSING_BLOB, v.ORPHANED_LINK, v.STRAY_FILE}
