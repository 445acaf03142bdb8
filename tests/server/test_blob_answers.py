"""Every blob answer carries the same headers, built in one place (issues 11 item 12, and 12).

A blob's ETag once differed between HEAD (the digest) and GET (aiohttp's mtime-size
tag), and proxied HEADs and streamed misses lacked ETag, Cache-Control and
Accept-Ranges. Now local and cached, HEAD and GET, hit and miss answer alike.
"""

from __future__ import annotations

import os
from pathlib import Path

from aiohttp.test_utils import TestClient

from tests.support.digests import sha256
from tests.support.fake_upstream import FakeUpstream
from tests.support.inprocess import make_config, start_client

SAME = ("ETag", "Docker-Content-Digest", "Cache-Control", "Accept-Ranges", "Content-Type")


async def _push_blob(client: TestClient, name: str, blob: bytes) -> str:
    digest = sha256(blob)
    async with client.post(f"/v2/{name}/blobs/uploads/?digest={digest}", data=blob) as resp:
        assert resp.status == 201
    return digest


def _headers(resp) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {key: resp.headers.get(key, "") for key in SAME}


async def test_local_head_and_get_agree(tmp_path: Path) -> None:
    client = await start_client(make_config(tmp_path))
    try:
        blob = os.urandom(5000)
        digest = await _push_blob(client, "same/app", blob)
        path = f"/v2/same/app/blobs/{digest}"
        async with client.head(path) as head, client.get(path) as get:
            assert head.status == get.status == 200
            assert _headers(head) == _headers(get)
            assert head.headers["ETag"] == f'"{digest}"'
            assert head.headers["Content-Length"] == get.headers["Content-Length"] == "5000"
            assert await get.read() == blob
        for method in ("GET", "HEAD"):
            async with client.request(method, path, headers={"If-None-Match": f'"{digest}"'}) as r:
                assert r.status == 304
            async with client.request(method, path, headers={"If-Match": '"sha256:00"'}) as r:
                assert r.status == 412
        async with client.get(path, headers={"Range": "bytes=10-19"}) as resp:
            assert resp.status == 206
            assert resp.headers["Content-Range"] == "bytes 10-19/5000"
            assert resp.headers["ETag"] == f'"{digest}"'
            assert await resp.read() == blob[10:20]
        async with client.get(path, headers={"Range": "bytes=-10"}) as resp:
            assert resp.status == 206
            assert await resp.read() == blob[-10:]
        async with client.get(path, headers={"Range": "bytes=4990-"}) as resp:
            assert await resp.read() == blob[4990:]
        async with client.get(path, headers={"Range": "bytes=0-1,5-6"}) as resp:
            assert resp.status == 200  # a list of ranges: the whole blob
            assert await resp.read() == blob
        async with client.get(path, headers={"Range": "bytes=10-19", "If-Range": '"x"'}) as resp:
            assert resp.status == 200  # another validator: the whole blob
        async with client.get(path, headers={"Range": "items=0-1"}) as resp:
            assert resp.status == 200  # a unit we do not know: ignored
        async with client.get(path, headers={"Range": "bytes=5000-"}) as resp:
            assert resp.status == 416
            assert resp.headers["Content-Range"] == "bytes */5000"
    finally:
        await client.close()


async def test_proxied_answers_carry_the_same_headers(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    await upstream.start()
    blob = os.urandom(300_000)
    digest = upstream.add_blob("lib/app", blob)
    proxy = {"upstreams": {"up": {"url": upstream.url}}}
    client = await start_client(make_config(tmp_path, proxy=proxy))
    try:
        path = f"/v2/p/up/lib/app/blobs/{digest}"
        async with client.head(path) as miss_head:  # not cached: asked upstream
            assert miss_head.status == 200
            seen = [_headers(miss_head)]
        async with client.get(path) as miss_get:  # streamed while it is fetched
            assert await miss_get.read() == blob
            seen.append(_headers(miss_get))
        async with client.head(path) as hit_head, client.get(path) as hit_get:
            seen += [_headers(hit_head), _headers(hit_get)]
            assert await hit_get.read() == blob
        assert all(headers == seen[0] for headers in seen), seen
        assert seen[0]["ETag"] == f'"{digest}"'
        assert seen[0]["Accept-Ranges"] == "bytes"
    finally:
        await client.close()
        await upstream.close()
