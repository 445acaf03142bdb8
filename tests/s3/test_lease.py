"""What a gc killed in its exclusive phase leaves on S3, and how the store recovers.

On disk the kernel drops a dead process's flock at once. On S3 the exclusive lock is a
lease object (`s3.LeaseLock`) with an expiry: a gc killed while holding it blocks commits
until the lease expires (`s3.LEASE_SECONDS`), and not one moment longer; commits wait
for it rather than fail, and the next gc takes the expired lease over.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from regproxy.server.keys import REGISTRY
from regproxy.storage import gc as gc_mod
from tests.support.digests import sha256
from tests.support.inprocess import start_client
from tests.support.oci import make_image, push_blob, push_image
from tests.support.s3store import bucket_keys, s3_config
from tests.support.seaweed import SeaweedS3

pytestmark = pytest.mark.timeout(60)

LEASE = "registry/lock.d/exclusive"
#: seconds the dead gc's lease has left in the test
LEFT = 3.0


async def test_a_dead_gcs_lease_holds_commits_only_until_it_expires(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    client = await start_client(s3_config(seaweed, s3_bucket, tmp_path))
    try:
        image = make_image((2000,))
        await push_image(client, "app", image, "v1")
        # what a gc killed in its sweep leaves: its lease, still some time to run
        lease = {"owner": "killed-gc", "expires": time.time() + LEFT}
        seaweed.client().put_object(Bucket=s3_bucket, Key=LEASE, Body=json.dumps(lease))

        started = time.monotonic()
        data = os.urandom(1000)
        await push_blob(client, "app", data)  # a commit: waits, then succeeds
        waited = time.monotonic() - started
        assert LEFT - 1.0 < waited < LEFT + 5.0, f"the commit waited {waited:.1f} s"
        async with client.get(f"/v2/app/blobs/{sha256(data)}") as resp:
            assert resp.status == 200 and await resp.read() == data

        # the next gc takes the expired lease over, and leaves no lease behind
        store = client.server.app[REGISTRY]
        report = await asyncio.to_thread(gc_mod.collect, store, 0.0)
        assert sha256(data) not in report.removed  # pushed a moment ago
        assert LEASE not in bucket_keys(seaweed, s3_bucket, "registry/lock.d/")
        async with client.get("/v2/app/manifests/v1") as resp:
            assert resp.status == 200 and await resp.read() == image.manifest
    finally:
        await client.close()
