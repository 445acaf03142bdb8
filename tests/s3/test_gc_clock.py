"""gc's grace period on S3 counts from the same moment as on disk.

S3 keeps whole seconds (Last-Modified is an HTTP date): a blob committed at 10.9 reads
back as written at 10.0. gc keeps what changed within `CLOCK_SLACK` of its start even
with `--grace 0` (a push whose manifest is on its way); on S3 that second must still be
a second, not whatever part of it the truncation left.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from regproxy.server.keys import REGISTRY
from regproxy.storage import gc as gc_mod
from tests.support.digests import sha256
from tests.support.inprocess import make_config, start_client
from tests.support.oci import make_image, push_blob, put_manifest
from tests.support.s3store import s3_config
from tests.support.seaweed import SeaweedS3

pytestmark = pytest.mark.timeout(60)

#: tries to push within the last 0.3 s of a second (a loaded machine may miss it)
ATTEMPTS = 5


async def _at_fraction(fraction: float) -> None:
    """Sleep until the clock's fractional second is `fraction` (within the next second)."""
    now = time.time()
    wait = (fraction - now % 1.0) % 1.0
    await asyncio.sleep(wait)


@pytest.mark.parametrize("where", ["disk", "s3"])
async def test_grace_zero_keeps_a_blob_pushed_a_moment_before_gc(
    where: str, seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path) if where == "disk" else s3_config(seaweed, s3_bucket, tmp_path)
    client = await start_client(config)
    try:
        store = client.server.app[REGISTRY]
        for _attempt in range(ATTEMPTS):
            image = make_image((300,))
            # the blobs land late in one second, gc starts early in the next
            await _at_fraction(0.7)
            pushed = time.time()
            for blob in image.blobs:
                await push_blob(client, "app", blob)
            await _at_fraction(0.05)
            started = time.time()
            if started - pushed < 0.9:
                break  # else a busy machine: the pushes took too long to prove anything
        else:
            pytest.fail(f"pushing two small blobs took over 0.3 s {ATTEMPTS} times")
        report = await asyncio.to_thread(gc_mod.collect, store, 0.0)
        swept = {sha256(blob) for blob in image.blobs} & set(report.removed)
        assert not swept, f"gc --grace 0 swept blobs pushed {started - pushed:.2f} s before"
        resp = await put_manifest(client, "app", "v1", image.manifest, image.media_type)
        assert resp.status == 201, await resp.text()
    finally:
        await client.close()


async def test_grace_zero_still_sweeps_what_is_older(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    """The slack is a second or two, not more: an orphan pushed 2.5 s before gc goes."""
    client = await start_client(s3_config(seaweed, s3_bucket, tmp_path))
    try:
        store = client.server.app[REGISTRY]
        orphan = os.urandom(500)
        await push_blob(client, "app", orphan)
        await asyncio.sleep(3.1)
        report = await asyncio.to_thread(gc_mod.collect, store, 0.0)
        assert report.removed == [sha256(orphan)]
    finally:
        await client.close()
