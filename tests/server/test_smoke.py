from aiohttp.test_utils import TestClient

from tests.server.oci import make_image, push_blob_chunked, push_image


async def test_push_then_pull(client: TestClient) -> None:
    image = make_image()
    digest = await push_image(client, "team/app", image, "v1")
    resp = await client.get("/v2/team/app/manifests/v1")
    assert resp.status == 200
    assert await resp.read() == image.manifest
    assert resp.headers["Docker-Content-Digest"] == digest
    for layer in image.layers:
        from tests.server.oci import sha256

        resp = await client.get(f"/v2/team/app/blobs/{sha256(layer)}")
        assert resp.status == 200
        assert await resp.read() == layer


async def test_chunked(client: TestClient) -> None:
    import os

    data = os.urandom(3 * 1024 * 1024 + 7)
    digest = await push_blob_chunked(client, "a", data, 1024 * 1024)
    resp = await client.get(f"/v2/a/blobs/{digest}", headers={"Range": "bytes=10-19"})
    assert resp.status == 206
    assert await resp.read() == data[10:20]
