"""`[s3] metadata_ttl`: a process remembers what a pull read from S3 for a short while.

Its own writes are seen at once (they forget what they change); another process's
change is seen at most `metadata_ttl` later. This is what lets a manifest GET by tag
answer without an S3 request on the hot path.
"""

from __future__ import annotations

import time
from pathlib import Path

from regproxy.storage.stores import open_store
from tests.support.digests import sha256
from tests.support.inprocess import start_client
from tests.support.oci import make_image, push_image
from tests.support.s3store import s3_config
from tests.support.seaweed import SeaweedS3


async def test_own_writes_at_once_others_within_the_ttl(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    config = s3_config(seaweed, s3_bucket, tmp_path, s3={"metadata_ttl": "1s"})
    client = await start_client(config)
    try:
        first, second = make_image((1000,)), make_image((2000,))
        await push_image(client, "team/app", first, "v1")
        async with client.get("/v2/team/app/manifests/v1") as resp:
            assert await resp.read() == first.manifest
        # this process retags: seen at once
        await push_image(client, "team/app", second, "v1")
        async with client.get("/v2/team/app/manifests/v1") as resp:
            assert await resp.read() == second.manifest
        async with client.get("/v2/team/app/tags/list") as resp:
            assert (await resp.json())["tags"] == ["v1"]
        # another process (a second store object on the same bucket) retags and adds a tag
        other = open_store(config.registry_storage, config.s3)
        other.set_tag("team/app", "v1", other.resolve("team/app", sha256(first.manifest)))
        other.set_tag("team/app", "v2", other.resolve("team/app", sha256(first.manifest)))
        deadline = time.monotonic() + 1.5
        while True:
            async with client.get("/v2/team/app/manifests/v1") as resp:
                body = await resp.read()
            if body == first.manifest:
                break
            assert body == second.manifest  # the remembered answer, never anything else
            assert time.monotonic() < deadline, "the other process's tag was not seen in time"
            time.sleep(0.05)
        async with client.get("/v2/team/app/tags/list") as resp:
            assert (await resp.json())["tags"] == ["v1", "v2"]
    finally:
        await client.close()


async def test_no_ttl_asks_s3_every_time(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    config = s3_config(seaweed, s3_bucket, tmp_path)  # metadata_ttl 0
    client = await start_client(config)
    try:
        first, second = make_image((1000,)), make_image((2000,))
        await push_image(client, "team/app", first, "v1")
        await push_image(client, "team/app", second, "v2")
        async with client.get("/v2/team/app/manifests/v1") as resp:
            assert await resp.read() == first.manifest
        other = open_store(config.registry_storage, config.s3)
        other.set_tag("team/app", "v1", other.resolve("team/app", sha256(second.manifest)))
        async with client.get("/v2/team/app/manifests/v1") as resp:
            assert await resp.read() == second.manifest
    finally:
        await client.close()
