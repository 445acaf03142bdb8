"""gc honours its grace period for unfinished multipart uploads, and never aborts a live one.

A commit's multipart upload runs outside the store lock, for as long as the bytes take.
Its writer keeps a marker object rewritten while it runs (`S3Backend._marked`); gc
aborts an upload older than its grace period only when no marker of its key is fresh.
Here the marker's beat and staleness are shortened (0.5 s and 4 s instead of 30 s and
120 s) so that a commit can outlive several beats within a test.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from regproxy.digest import Digest
from regproxy.storage import gc as gc_mod
from regproxy.storage import s3 as s3_mod
from regproxy.storage import stores
from regproxy.storage.store import Store
from tests.support.digests import sha256
from tests.support.s3store import blob_key, bucket_keys, multipart_uploads, s3_config
from tests.support.seaweed import SeaweedS3

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

MiB = 1024 * 1024
RENEW = 0.5
STALE = 4.0  # whole seconds: a marker written at 10.9 lists as 10.0


@pytest.fixture(autouse=True)
def quick_marks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3_mod, "MARK_RENEW", RENEW)
    monkeypatch.setattr(s3_mod, "MARK_STALE", STALE)
    # a multipart upload of a few small parts
    monkeypatch.setattr(s3_mod, "SINGLE_PUT_MAX", s3_mod.MIN_PART)
    monkeypatch.setattr(s3_mod, "PART_SIZE", s3_mod.MIN_PART)


def _store(engine: SeaweedS3, bucket: str, folder: Path) -> Store:
    config = s3_config(engine, bucket, folder)
    return stores.open_store(config.registry_storage, config.s3)


class _Gated:
    """The S3 client of a writer whose parts wait at a gate (a slow network, or a
    large blob): every call passes through, `upload_part` only once `gate` is open."""

    def __init__(self, client: Any, gate: threading.Event) -> None:
        self._client = client
        self._gate = gate

    def upload_part(self, **kwargs: Any) -> Any:
        assert self._gate.wait(60), "the test never opened the gate"
        return self._client.upload_part(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def _gc(store: Store, grace: float, dry_run: bool = False) -> gc_mod.GcReport:
    return gc_mod.collect(store, grace=grace, dry_run=dry_run)


def test_a_slow_commit_outlives_a_shorter_grace_period(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(seaweed, s3_bucket, tmp_path / "gc")
    backend = store.backend
    assert isinstance(backend, s3_mod.S3Backend)
    gate = threading.Event()
    writer = s3_mod.S3Backend(
        _Gated(backend.client, gate), s3_bucket, backend.prefix, PurePosixPath(store.root)
    )
    data = os.urandom(3 * s3_mod.MIN_PART + 123)
    digest = Digest.parse(sha256(data))
    src = tmp_path / "upload"
    src.write_bytes(data)
    result: list[object] = []

    def commit() -> None:
        try:
            result.append(writer.upload(src, store.blob_path(digest)))
        except BaseException as exc:  # reported by the test below
            result.append(exc)

    thread = threading.Thread(target=commit)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not multipart_uploads(seaweed, s3_bucket):
            assert time.monotonic() < deadline, "the commit's upload never showed"
            time.sleep(0.05)
        (upload,) = multipart_uploads(seaweed, s3_bucket)
        # older than the grace period, and than the marker's first write by far
        time.sleep(STALE + 2)
        for grace in (1.0, 0.0):
            report = _gc(store, grace)
            assert report.temp_files_removed == 0, report
            assert [u["UploadId"] for u in multipart_uploads(seaweed, s3_bucket)] == [
                upload["UploadId"]
            ], "gc aborted a live commit's upload"
    finally:
        gate.set()
        thread.join(60)
    assert result == [True], result
    assert backend.read(store.blob_path(digest)) == data
    assert multipart_uploads(seaweed, s3_bucket) == []
    assert not bucket_keys(seaweed, s3_bucket, f"registry/{s3_mod.UPLOADING}/"), "marker left"


def _abandoned(engine: SeaweedS3, bucket: str, marked: bool) -> tuple[str, str]:
    """An upload the way a killed writer leaves it: a part sent, never completed; its
    marker (`marked`) written at the start and never again."""
    client = engine.client()
    key = blob_key("registry", sha256(uuid.uuid4().bytes))
    if marked:
        relative = key.removeprefix("registry/")
        name = f"{s3_mod.mark_id(relative)}.{uuid.uuid4().hex}"
        client.put_object(Bucket=bucket, Key=f"registry/{s3_mod.UPLOADING}/{name}", Body=b"")
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 100)
    return key, upload


def test_an_abandoned_upload_older_than_grace_is_aborted(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(seaweed, s3_bucket, tmp_path / "gc")
    unmarked = _abandoned(seaweed, s3_bucket, marked=False)  # a writer before markers
    marked = _abandoned(seaweed, s3_bucket, marked=True)
    # older than gc's grace period and its clock slack on an object store (2 s in all)
    time.sleep(gc_mod.clock_slack(store) + 0.5)

    def open_uploads() -> set[str]:
        return {u["UploadId"] for u in multipart_uploads(seaweed, s3_bucket)}

    # the unmarked one is older than the grace period: it goes; the marked one's writer
    # may still be running (its marker is fresh), so it stays
    report = _gc(store, 0.5, dry_run=True)
    assert report.temp_files_removed == 1
    assert open_uploads() == {unmarked[1], marked[1]}
    report = _gc(store, 0.5)
    assert report.temp_files_removed == 1
    assert open_uploads() == {marked[1]}
    # a long grace period keeps it even once its marker is stale
    time.sleep(STALE + 0.5)
    assert _gc(store, 3600.0).temp_files_removed == 0
    assert open_uploads() == {marked[1]}
    # a grace period it is older than, and a stale marker: it goes, and so does the marker
    report = _gc(store, 0.5)
    assert report.temp_files_removed == 1
    assert open_uploads() == set()
    assert not bucket_keys(seaweed, s3_bucket, f"registry/{s3_mod.UPLOADING}/")
    assert "_uploading" not in store.backend.names(store.root)
