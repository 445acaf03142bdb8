"""A registry with both stores on SeaweedFS: push and pull work, and blobs never touch disk."""

from __future__ import annotations

from pathlib import Path

from tests.support.inprocess import start_client
from tests.support.oci import make_image, push_image
from tests.support.s3store import s3_config
from tests.support.seaweed import SeaweedS3


async def test_push_and_pull_on_s3(seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path) -> None:
    client = await start_client(s3_config(seaweed, s3_bucket, tmp_path))
    try:
        image = make_image((300_000, 5000))
        await push_image(client, "team/app", image, "v1")
        async with client.get("/v2/team/app/manifests/v1") as resp:
            assert resp.status == 200
            assert await resp.read() == image.manifest
        for blob in image.blobs:
            from tests.support.digests import sha256

            async with client.get(f"/v2/team/app/blobs/{sha256(blob)}") as resp:
                assert resp.status == 200, await resp.text()
                assert await resp.read() == blob
            async with client.get(
                f"/v2/team/app/blobs/{sha256(blob)}", headers={"Range": "bytes=10-19"}
            ) as resp:
                assert resp.status == 206
                assert await resp.read() == blob[10:20]
        async with client.get("/v2/team/app/tags/list") as resp:
            assert (await resp.json())["tags"] == ["v1"]
        async with client.get("/v2/_catalog") as resp:
            assert (await resp.json())["repositories"] == ["team/app"]
        keys = [o["Key"] for o in seaweed.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
        assert any(k.startswith("registry/blobs/sha256/") for k in keys), keys
        assert not any(Path(tmp_path, "storage/registry").rglob("*"))
    finally:
        await client.close()
