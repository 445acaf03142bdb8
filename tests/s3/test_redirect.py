"""`[s3] redirect = true`: blob GETs answer 307 to a short-lived presigned URL.

The URL is fetched from the test with a plain aiohttp client (no regproxy in between):
it must serve the exact bytes, ranges included, and expire within minutes. HEAD is
answered by regproxy itself, and so are manifests.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from tests.support.digests import sha256
from tests.support.fake_upstream import FakeUpstream
from tests.support.inprocess import start_client
from tests.support.oci import make_image, push_image
from tests.support.s3store import s3_config
from tests.support.seaweed import SeaweedS3

pytestmark = pytest.mark.timeout(60)

#: the longest lifetime a redirect URL may have (seconds)
MAX_EXPIRES = 600


def _expires(url: str) -> int:
    query = parse_qs(urlsplit(url).query)
    assert query.get("X-Amz-Algorithm") == ["AWS4-HMAC-SHA256"], url
    return int(query["X-Amz-Expires"][0])


async def test_blob_gets_redirect_to_a_presigned_url(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    config = s3_config(seaweed, s3_bucket, tmp_path, s3={"redirect": True})
    client = await start_client(config)
    image = make_image((200_000, 1500))
    layer = image.layers[0]
    digest = sha256(layer)
    try:
        await push_image(client, "team/app", image, "v1")
        blob = f"/v2/team/app/blobs/{digest}"

        async with client.get(blob, allow_redirects=False) as resp:
            assert resp.status == 307, await resp.text()
            location = resp.headers["Location"]
            assert resp.headers["Docker-Content-Digest"] == digest
            assert await resp.read() == b""
        assert location.startswith(seaweed.endpoint + "/"), location
        assert 0 < _expires(location) <= MAX_EXPIRES

        # HEAD and manifests are answered directly
        async with client.head(blob, allow_redirects=False) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(len(layer))
            assert resp.headers["Docker-Content-Digest"] == digest
            assert "Location" not in resp.headers
        async with client.get("/v2/team/app/manifests/v1", allow_redirects=False) as resp:
            assert resp.status == 200
            assert await resp.read() == image.manifest
        # an unknown blob is still an OCI error, never a redirect
        async with client.get(f"/v2/team/app/blobs/{sha256(b'no')}", allow_redirects=False) as r:
            assert r.status == 404
        # nor is a blob of another repository
        async with client.get(f"/v2/other/blobs/{digest}", allow_redirects=False) as resp:
            assert resp.status == 404
        # a conditional GET is answered before any redirect
        headers = {"If-None-Match": f'"{digest}"'}
        async with client.get(blob, headers=headers, allow_redirects=False) as resp:
            assert resp.status == 304

        # the URL itself, from a client that has never seen regproxy
        async with aiohttp.ClientSession() as plain:
            async with plain.get(location) as resp:
                assert resp.status == 200
                assert await resp.read() == layer
            async with plain.get(location, headers={"Range": "bytes=1000-1999"}) as resp:
                assert resp.status == 206
                assert await resp.read() == layer[1000:2000]
            async with plain.get(location, headers={"Range": "bytes=-10"}) as resp:
                assert resp.status == 206
                assert await resp.read() == layer[-10:]

            # a client that follows the redirect with its Range (what docker does on resume)
            headers = {"Range": "bytes=5-104"}
            async with plain.get(client.make_url(blob), headers=headers) as resp:
                assert resp.status == 206
                assert len(resp.history) == 1 and resp.history[0].status == 307
                assert await resp.read() == layer[5:105]
            async with plain.get(client.make_url(blob)) as resp:
                assert resp.status == 200
                assert await resp.read() == layer

            # a tampered URL is refused by S3
            tampered = location.replace("X-Amz-Expires=", "X-Amz-Expires=9")
            async with plain.get(tampered) as resp:
                assert resp.status == 403
    finally:
        await client.close()


async def test_redirect_urls_expire_within_minutes(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The URL dies with its lifetime: signed for 3 s here, refused once that passed."""
    from regproxy.server import responses

    monkeypatch.setattr(responses, "REDIRECT_SECONDS", 3)
    config = s3_config(seaweed, s3_bucket, tmp_path, s3={"redirect": True})
    client = await start_client(config)
    data = os.urandom(5000)
    try:
        async with client.post(f"/v2/a/blobs/uploads/?digest={sha256(data)}", data=data) as resp:
            assert resp.status == 201
        async with client.get(f"/v2/a/blobs/{sha256(data)}", allow_redirects=False) as resp:
            assert resp.status == 307
            location = resp.headers["Location"]
        assert _expires(location) == 3
        async with aiohttp.ClientSession() as plain:
            async with plain.get(location) as resp:
                assert resp.status == 200
                assert await resp.read() == data
            await asyncio.sleep(4.5)  # X-Amz-Date has whole seconds
            async with plain.get(location) as resp:
                assert resp.status == 403, await resp.text()
    finally:
        await client.close()


async def test_cached_blobs_redirect_too(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path, fake: FakeUpstream
) -> None:
    """A blob of the pull-through cache: the first pull streams from the upstream fetch,
    later ones are redirected to the cached object."""
    data = os.urandom(300_000)
    digest = fake.add_blob("lib/tool", data)
    upstreams = {"fake": {"url": fake.url, "tag_ttl": "1m"}}
    config = s3_config(
        seaweed, s3_bucket, tmp_path, s3={"redirect": True}, proxy={"upstreams": upstreams}
    )
    client = await start_client(config)
    path = f"/v2/p/fake/lib/tool/blobs/{digest}"
    try:
        async with client.get(path, allow_redirects=False) as resp:
            assert resp.status == 200
            assert resp.headers["X-Cache-Status"] == "MISS"
            assert await resp.read() == data
        async with client.get(path, allow_redirects=False) as resp:
            assert resp.status == 307
            assert resp.headers["X-Cache-Status"] == "HIT"
            location = resp.headers["Location"]
        assert "/proxy/blobs/" in urlsplit(location).path
        assert 0 < _expires(location) <= MAX_EXPIRES
        async with aiohttp.ClientSession() as plain, plain.get(location) as resp:
            assert resp.status == 200
            assert await resp.read() == data
        async with client.head(path, allow_redirects=False) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(len(data))
        assert fake.count("GET", "blob") == 1
    finally:
        await client.close()


async def test_public_endpoint_names_the_redirect_host(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    """Clients reach S3 by another name than regproxy does: the URL names (and is signed
    for) `public_endpoint`, and works there."""
    port = seaweed.ports["s3.port"]
    public = f"http://localhost:{port}"
    config = s3_config(
        seaweed, s3_bucket, tmp_path, s3={"redirect": True, "public_endpoint": public}
    )
    client = await start_client(config)
    data = os.urandom(70_000)
    try:
        async with client.post(f"/v2/a/blobs/uploads/?digest={sha256(data)}", data=data) as resp:
            assert resp.status == 201
        async with client.get(f"/v2/a/blobs/{sha256(data)}", allow_redirects=False) as resp:
            assert resp.status == 307
            location = resp.headers["Location"]
        assert location.startswith(f"{public}/{s3_bucket}/"), location
        async with aiohttp.ClientSession() as plain:
            async with plain.get(location) as resp:
                assert resp.status == 200
                assert await resp.read() == data
            # the signature covers the host: the same URL by the other name is refused
            other = location.replace(public, seaweed.endpoint)
            async with plain.get(other) as resp:
                assert resp.status == 403
    finally:
        await client.close()
