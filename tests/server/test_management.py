"""Management: DELETE of tags, manifests, blobs and upload sessions."""

from __future__ import annotations

import os
import time

from aiohttp.test_utils import TestClient

from regproxy.config import Config
from regproxy.server.keys import UPLOADS
from tests.support.digests import sha256
from tests.support.oci import (
    assert_error,
    make_artifact,
    make_image,
    push_blob,
    push_image,
    put_manifest,
    stored_files,
)


async def _tags(client: TestClient, name: str) -> list[str]:
    resp = await client.get(f"/v2/{name}/tags/list")
    assert resp.status == 200
    return (await resp.json())["tags"]


async def test_delete_tag_keeps_revision(client: TestClient) -> None:
    image = make_image()
    await push_image(client, "deltag", image, "a")
    resp = await put_manifest(client, "deltag", "b", image.manifest, image.media_type)
    assert resp.status == 201
    resp = await client.delete("/v2/deltag/manifests/a")
    assert resp.status == 202
    assert await _tags(client, "deltag") == ["b"]
    resp = await client.get("/v2/deltag/manifests/a")
    await assert_error(resp, 404, "MANIFEST_UNKNOWN")
    for ref in ("b", image.digest):
        resp = await client.get(f"/v2/deltag/manifests/{ref}")
        assert resp.status == 200
    resp = await client.delete("/v2/deltag/manifests/a")
    await assert_error(resp, 404, "MANIFEST_UNKNOWN")


async def test_delete_by_digest_removes_revision_and_tags(client: TestClient) -> None:
    keep, drop = make_image(), make_image()
    await push_image(client, "deldig", keep, "keep")
    await push_image(client, "deldig", drop, "one")
    for tag in ("two", "three"):
        resp = await put_manifest(client, "deldig", tag, drop.manifest, drop.media_type)
        assert resp.status == 201
    resp = await client.delete(f"/v2/deldig/manifests/{drop.digest}")
    assert resp.status == 202
    assert await _tags(client, "deldig") == ["keep"]
    for ref in ("one", "two", drop.digest):
        resp = await client.get(f"/v2/deldig/manifests/{ref}")
        await assert_error(resp, 404, "MANIFEST_UNKNOWN")
        resp = await client.head(f"/v2/deldig/manifests/{ref}")
        assert resp.status == 404
    resp = await client.get("/v2/deldig/manifests/keep")
    assert resp.status == 200
    resp = await client.delete(f"/v2/deldig/manifests/{drop.digest}")
    await assert_error(resp, 404, "MANIFEST_UNKNOWN")
    # the layers stay until gc: other revisions may share them
    resp = await client.get(f"/v2/deldig/blobs/{sha256(drop.layers[0])}")
    assert resp.status == 200


async def test_delete_in_one_repository_only(client: TestClient) -> None:
    image = make_image()
    await push_image(client, "left", image, "v1")
    await push_image(client, "right", image, "v1")
    resp = await client.delete(f"/v2/left/manifests/{image.digest}")
    assert resp.status == 202
    resp = await client.get("/v2/right/manifests/v1")
    assert resp.status == 200
    assert await resp.read() == image.manifest


async def test_delete_referrer_leaves_listing(client: TestClient) -> None:
    subject = make_image()
    await push_image(client, "refdel", subject, "v1")
    sig = make_artifact("application/vnd.example.sig", subject=subject)
    sbom = make_artifact("application/vnd.example.sbom", subject=subject)
    for artifact in (sig, sbom):
        await push_image(client, "refdel", artifact, artifact.digest)
    resp = await client.delete(f"/v2/refdel/manifests/{sig.digest}")
    assert resp.status == 202
    resp = await client.get(f"/v2/refdel/referrers/{subject.digest}")
    assert [m["digest"] for m in (await resp.json())["manifests"]] == [sbom.digest]


async def test_delete_pushed_again(client: TestClient) -> None:
    """A deleted revision can be pushed again."""
    image = make_image()
    await push_image(client, "again", image, "v1")
    resp = await client.delete(f"/v2/again/manifests/{image.digest}")
    assert resp.status == 202
    await push_image(client, "again", image, "v1")
    resp = await client.get("/v2/again/manifests/v1")
    assert await resp.read() == image.manifest


async def test_delete_blob(client: TestClient) -> None:
    data = os.urandom(500)
    digest = await push_blob(client, "delblob", data)
    await push_blob(client, "otherblob", data)
    resp = await client.delete(f"/v2/delblob/blobs/{digest}")
    assert resp.status == 202
    assert resp.headers["Docker-Content-Digest"] == digest
    resp = await client.get(f"/v2/delblob/blobs/{digest}")
    await assert_error(resp, 404, "BLOB_UNKNOWN")
    resp = await client.head(f"/v2/delblob/blobs/{digest}")
    assert resp.status == 404
    resp = await client.delete(f"/v2/delblob/blobs/{digest}")
    await assert_error(resp, 404, "BLOB_UNKNOWN")
    # still visible where it was pushed too
    resp = await client.get(f"/v2/otherblob/blobs/{digest}")
    assert await resp.read() == data


async def test_delete_unknown_blob(client: TestClient) -> None:
    resp = await client.delete(f"/v2/never/blobs/{sha256(b'never')}")
    await assert_error(resp, 404, "BLOB_UNKNOWN")


async def test_cancel_upload(client: TestClient, config: Config) -> None:
    before = stored_files(config)
    resp = await client.post("/v2/cancel/blobs/uploads/")
    location = resp.headers["Location"]
    resp = await client.patch(location, data=os.urandom(1000))
    assert resp.status == 202
    resp = await client.delete(location)
    assert resp.status == 204
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        resp = await client.request(method, f"{location}?digest={sha256(b'')}")
        await assert_error(resp, 404, "BLOB_UPLOAD_UNKNOWN")
    assert stored_files(config) == before


async def test_unknown_upload_ids(client: TestClient) -> None:
    for upload_id in ("0" * 32, "not-a-uuid", "A" * 32, "x" * 200):
        resp = await client.get(f"/v2/up/blobs/uploads/{upload_id}")
        await assert_error(resp, 404, "BLOB_UPLOAD_UNKNOWN")


async def test_stale_uploads_are_purged(client: TestClient, config: Config) -> None:
    """Sessions idle for longer than `upload_max_age` are removed with their files."""
    resp = await client.post("/v2/stale/blobs/uploads/")
    location = resp.headers["Location"]
    resp = await client.patch(location, data=b"partial")
    assert resp.status == 202
    uploads = client.app[UPLOADS]
    assert uploads.purge(config.server.upload_max_age) == 0
    assert uploads.purge(config.server.upload_max_age, now=time.time() + 2 * 86400) == 1
    resp = await client.get(location)
    await assert_error(resp, 404, "BLOB_UPLOAD_UNKNOWN")
    assert not any(f.startswith("tmp/uploads/") for f in stored_files(config))
