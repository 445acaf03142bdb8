"""Mark-and-sweep correctness on stores filled through the real server, and gc at scale."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from regproxy import manifest as mf
from regproxy.config import Config
from regproxy.digest import of_bytes
from regproxy.storage import gc
from regproxy.storage.store import Store
from tests.storage.helpers import (
    NoSyncBackend,
    age_tree,
    assert_pullable,
    blob_path,
    cache_image,
    push_index,
    push_orphan,
    put_blob,
    snapshot,
)
from tests.support.oci import (
    make_artifact,
    make_image,
    push_blob,
    push_image,
    sha256,
)

HOUR = 3600.0


def _collect_in_thread(store: Store, **kwargs: object) -> gc.GcReport:
    """Run `collect` with a deadline: a self-deadlock on the store lock fails, not hangs."""
    result: list[gc.GcReport] = []
    worker = threading.Thread(target=lambda: result.append(gc.collect(store, **kwargs)))
    worker.daemon = True
    worker.start()
    worker.join(20)
    assert result, "gc.collect did not finish (a lock it already holds?)"
    return result[0]


async def test_kept_vs_swept(client: TestClient, config: Config) -> None:
    root = config.registry_storage
    image = make_image()
    await push_image(client, "app", image, "v1")
    orphan = await push_orphan(client, "app")
    age_tree(root, 2 * HOUR)
    report = gc.collect(Store(root), grace=HOUR)
    assert report.blobs_removed == 1
    assert report.note and report.removed == [orphan]
    assert report.bytes_freed == 500
    assert not blob_path(root, orphan).exists()
    # the orphan's link is gone too, so the repository does not claim it any more
    assert not (root / "repositories/app/_layers/sha256" / orphan.split(":")[1]).exists()
    await assert_pullable(client, "app", image)


async def test_grace_period_protects_young_blobs(client: TestClient, config: Config) -> None:
    root = config.registry_storage
    orphan = await push_orphan(client, "app")
    assert gc.collect(Store(root), grace=HOUR).blobs_removed == 0
    assert blob_path(root, orphan).exists()
    age_tree(root, 90)
    assert gc.collect(Store(root), grace=HOUR).blobs_removed == 0  # 90 s < 1 h
    assert gc.collect(Store(root), grace=60).blobs_removed == 1
    assert not blob_path(root, orphan).exists()


async def test_multi_arch_children_and_their_blobs_are_kept(
    client: TestClient, config: Config
) -> None:
    """`--delete-untagged` drops an untagged image, never the untagged children of an index."""
    root = config.registry_storage
    index, children = await push_index(client, "multi", "latest", n=3)
    stray = make_image()
    await push_image(client, "multi", stray, stray.digest)  # untagged, nobody needs it
    age_tree(root, 2 * HOUR)
    report = _collect_in_thread(Store(root), grace=HOUR, delete_untagged=True)
    assert report.manifests_removed == 1
    assert f"multi@{stray.digest}" in report.removed
    assert report.blobs_removed == 1 + len(stray.blobs)  # its manifest, config and layers
    await assert_pullable(client, "multi", index)
    for child in children:
        await assert_pullable(client, "multi", child)
    resp = await client.get(f"/v2/multi/manifests/{stray.digest}")
    assert resp.status == 404


async def test_referrers_follow_their_subject(client: TestClient, config: Config) -> None:
    """A signature of a kept image is kept; one of a dropped untagged image goes with it."""
    root = config.registry_storage
    kept = make_image()
    await push_image(client, "signed", kept, "v1")
    sig = make_artifact("application/vnd.example.sig", subject=kept)
    await push_image(client, "signed", sig, sig.digest)
    dropped = make_image()
    await push_image(client, "signed", dropped, dropped.digest)
    dropped_sig = make_artifact("application/vnd.example.sig", subject=dropped)
    await push_image(client, "signed", dropped_sig, dropped_sig.digest)
    age_tree(root, 2 * HOUR)
    report = _collect_in_thread(Store(root), grace=HOUR, delete_untagged=True)
    assert {f"signed@{dropped.digest}", f"signed@{dropped_sig.digest}"} <= set(report.removed)
    await assert_pullable(client, "signed", kept)
    await assert_pullable(client, "signed", sig)
    resp = await client.get(f"/v2/signed/referrers/{kept.digest}")
    assert [m["digest"] for m in (await resp.json())["manifests"]] == [sig.digest]
    resp = await client.get(f"/v2/signed/manifests/{dropped_sig.digest}")
    assert resp.status == 404


async def test_young_untagged_manifests_survive_delete_untagged(
    client: TestClient, config: Config
) -> None:
    """The children of an index still being pushed arrive untagged: the grace period keeps
    them and the blobs they need, even when those blobs are old (shared layers)."""
    root = config.registry_storage
    old = make_image()
    await push_image(client, "multi", old, old.digest)
    age_tree(root, 2 * HOUR)
    # a new child re-using the old image's layers arrives now, untagged
    child = make_image()
    child.layers = old.layers
    doc = json.loads(child.manifest)
    doc["layers"] = json.loads(old.manifest)["layers"]
    child.manifest = json.dumps(doc).encode()
    child.digest = sha256(child.manifest)
    child.blobs = [child.config, *old.layers]
    await push_blob(client, "multi", child.config)
    resp = await client.put(
        f"/v2/multi/manifests/{child.digest}",
        data=child.manifest,
        headers={"Content-Type": mf.OCI_MANIFEST},
    )
    assert resp.status == 201
    report = _collect_in_thread(Store(root), grace=HOUR, delete_untagged=True)
    assert report.manifests_removed == 1 and f"multi@{old.digest}" in report.removed
    assert set(report.removed) - {f"multi@{old.digest}"} == {old.digest, sha256(old.config)}
    await assert_pullable(client, "multi", child)


async def test_re_push_restarts_the_clock_of_an_untagged_manifest(
    client: TestClient, config: Config
) -> None:
    root = config.registry_storage
    child = make_image()
    await push_image(client, "multi", child, child.digest)
    age_tree(root, 2 * HOUR)
    await push_image(client, "multi", child, child.digest)  # pushed again: young again
    report = _collect_in_thread(Store(root), grace=HOUR, delete_untagged=True)
    assert report.manifests_removed == 0 and report.blobs_removed == 0
    await assert_pullable(client, "multi", child)


async def test_dry_run_changes_nothing(client: TestClient, config: Config) -> None:
    root = config.registry_storage
    await push_image(client, "app", make_image(), "v1")
    await push_image(client, "app", make_image(), "untagged-soon")
    await client.delete("/v2/app/manifests/untagged-soon")
    await push_orphan(client, "app")
    await push_index(client, "multi", "latest")
    age_tree(root, 2 * HOUR)
    before = snapshot(root)
    dry = _collect_in_thread(Store(root), grace=HOUR, delete_untagged=True, dry_run=True)
    assert snapshot(root) == before
    assert dry.dry_run and dry.blobs_removed > 0 and dry.manifests_removed == 1
    real = _collect_in_thread(Store(root), grace=HOUR, delete_untagged=True)
    assert (real.blobs_removed, real.bytes_freed, real.manifests_removed) == (
        dry.blobs_removed,
        dry.bytes_freed,
        dry.manifests_removed,
    )
    assert sorted(real.removed) == sorted(dry.removed)


def test_blob_touched_just_after_gc_started_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """File times come from a coarse clock and may read a few ms *before* time.time():
    a re-push landing right after the mark began must still count as fresh."""
    store = Store(tmp_path)
    digest = put_blob(store, "app", os.urandom(100))
    started = time.time()
    os.utime(store.blob_path(digest), (started - 0.004, started - 0.004))
    monkeypatch.setattr(gc.time, "time", lambda: started)
    assert gc.collect(store, grace=0).blobs_removed == 0
    assert store.has_blob(digest)


def test_commit_restarts_the_grace_period(tmp_path: Path) -> None:
    """A rename keeps the upload file's mtime (its last PATCH); the commit must not."""
    store = Store(tmp_path / "store")
    upload = tmp_path / "upload"
    data = os.urandom(100)
    upload.write_bytes(data)
    os.utime(upload, (time.time() - 2 * HOUR,) * 2)
    digest = of_bytes(data)
    store.commit_blob("app", upload, digest)
    assert time.time() - store.blob_path(digest).stat().st_mtime < 60
    assert gc.collect(store, grace=HOUR).blobs_removed == 0


def test_proxy_max_age_expires_repositories_not_pulled(tmp_path: Path) -> None:
    store = Store(tmp_path)
    stale = cache_image(store, "up/library/old")
    fresh = cache_image(store, "up/library/new")
    age_tree(tmp_path / "blobs", 2 * HOUR)
    age_tree(tmp_path / "repositories/up/library/old", 3 * 86400)
    dry = gc.collect(store, grace=HOUR, dry_run=True, expire_repositories_older_than=86400)
    assert dry.tags_removed == 1 and dry.blobs_removed == len(stale)  # dry run counts right
    report = gc.collect(store, grace=HOUR, expire_repositories_older_than=86400)
    assert report.tags_removed == 1 and report.manifests_removed == 1
    assert report.blobs_removed == len(stale)
    assert not any(store.has_blob(d) for d in stale)
    assert all(store.has_blob(d) for d in fresh)


def test_evict_lru_removes_least_recently_pulled_first(tmp_path: Path) -> None:
    store = Store(tmp_path)
    old = cache_image(store, "up/a", layers=2, size=10_000)
    new = cache_image(store, "up/b", layers=2, size=10_000)
    age_tree(tmp_path / "blobs", 2 * HOUR)
    for digest in new:
        store.record_pull("up/b", digest)
    total = sum(size for _, size, _ in store.iter_blobs())
    report = gc.evict_lru(store, total - 15_000)
    assert report.size_after <= total - 15_000
    assert all(store.has_blob(d) for d in new)
    assert sum(not store.has_blob(d) for d in old) >= 2


def test_collect_temp_removes_expired_uploads_and_spool_leftovers(tmp_path: Path) -> None:
    for name, age in (("expired", 2 * 86400), ("active", 10)):
        folder = tmp_path / "uploads" / name
        folder.mkdir(parents=True)
        (folder / "data").write_bytes(b"x")
        os.utime(folder, (time.time() - age,) * 2)
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "old").write_bytes(b"x")
    os.utime(tmp_path / "spool" / "old", (time.time() - 2 * HOUR,) * 2)
    (tmp_path / "spool" / "live").write_bytes(b"x")
    report = gc.collect_temp(tmp_path, upload_max_age=86400, grace=0, dry_run=False)
    assert report.uploads_removed == 1 and report.temp_files_removed == 1
    assert sorted(os.listdir(tmp_path / "uploads")) == ["active"]
    assert os.listdir(tmp_path / "spool") == ["live"]


def test_scale_5k_blobs_500_manifests(tmp_path: Path) -> None:
    """gc time grows with the number of files, not faster: 5k blobs / 500 manifests in a
    few seconds (the issue's 100k / 10k is measured outside the test suite)."""
    store = Store(tmp_path, backend=NoSyncBackend())
    layers_per_image, n_images = 8, 500
    live: set[str] = set()
    for i in range(n_images):
        name = f"team{i % 20}/app{i % 50}"
        descs = []
        for _ in range(layers_per_image):
            digest = put_blob(store, name, os.urandom(64))
            descs.append({"mediaType": "x/layer", "digest": str(digest), "size": 64})
        doc = {
            "schemaVersion": 2,
            "mediaType": mf.OCI_MANIFEST,
            "config": descs[0] | {"mediaType": "application/vnd.oci.image.config.v1+json"},
            "layers": descs[1:],
        }
        data = json.dumps(doc).encode()
        digest = of_bytes(data)
        keep = i % 5 != 0  # every fifth image loses its tag
        store.put_manifest(name, data, mf.parse(data), digest, tag=f"v{i}" if keep else None)
        if keep:
            live |= {str(digest), *(d["digest"] for d in descs)}
    for i in range(1000):  # orphans of interrupted pushes
        put_blob(store, f"team{i % 20}/app{i % 50}", os.urandom(32))
    age_tree(tmp_path, 2 * HOUR)
    total = sum(1 for _ in store.iter_blobs())
    assert total == n_images * (layers_per_image + 1) + 1000
    started = time.monotonic()
    report = gc.collect(store, grace=HOUR, delete_untagged=True)
    seconds = time.monotonic() - started
    assert report.blobs_kept == len(live)
    assert report.blobs_removed == total - len(live)
    assert {str(d) for d, _, _ in store.iter_blobs()} == live
    assert seconds < 10, f"gc of {total} blobs took {seconds:.1f} s"


def test_store_tmp_keeps_writes_in_progress(tmp_path: Path) -> None:
    """Atomic writes stage in the store's tmp/: even `--grace 0` only removes leftovers."""
    store = Store(tmp_path)
    in_progress = store.layout.tmp / ".tmp-writing"
    in_progress.write_bytes(b"x")
    os.utime(in_progress, (time.time() - 30,) * 2)  # a slow fsync, a big cross-fs copy
    leftover = store.layout.tmp / ".tmp-crashed"
    leftover.write_bytes(b"x")
    os.utime(leftover, (time.time() - 2 * HOUR,) * 2)
    report = gc.collect(store, grace=0)
    assert report.temp_files_removed == 1
    assert in_progress.exists() and not leftover.exists()
