"""Many clients pushing the same blob or the same tag at once: safe and consistent after."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from regproxy.config import Config
from tests.support.digests import sha256
from tests.support.oci import (
    blob_files,
    make_image,
    put_manifest,
    stored_files,
)

CLIENTS = 16


@pytest.fixture
async def sessions(client: TestClient) -> AsyncIterator[list[aiohttp.ClientSession]]:
    """Independent client sessions (own connection pools) for the same server."""
    base = str(client.server.make_url(""))
    made = [aiohttp.ClientSession(base_url=base) for _ in range(CLIENTS)]
    try:
        yield made
    finally:
        await asyncio.gather(*(s.close() for s in made))


async def _monolithic(s: aiohttp.ClientSession, name: str, data: bytes) -> int:
    async with s.post(f"/v2/{name}/blobs/uploads/?digest={sha256(data)}", data=data) as r:
        return r.status


async def _chunked(s: aiohttp.ClientSession, name: str, data: bytes) -> int:
    async with s.post(f"/v2/{name}/blobs/uploads/") as r:
        location = r.headers["Location"]
    step = 256 * 1024
    for start in range(0, len(data), step):
        piece = data[start : start + step]
        headers = {"Content-Range": f"{start}-{start + len(piece) - 1}"}
        async with s.patch(location, data=piece, headers=headers) as r:
            assert r.status == 202, await r.text()
            location = r.headers["Location"]
    async with s.put(f"{location}?digest={sha256(data)}") as r:
        return r.status


async def _streamed(s: aiohttp.ClientSession, name: str, data: bytes) -> int:
    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 100_000):
            yield data[start : start + 100_000]
            await asyncio.sleep(0)

    async with s.post(f"/v2/{name}/blobs/uploads/") as r:
        location = r.headers["Location"]
    async with s.put(f"{location}?digest={sha256(data)}", data=body()) as r:
        return r.status


PUSHERS: list[Callable[[aiohttp.ClientSession, str, bytes], Awaitable[int]]] = [
    _monolithic,
    _chunked,
    _streamed,
]


def _no_leftovers(config: Config) -> None:
    """No upload sessions, no temp files anywhere in the store."""
    files = stored_files(config)
    assert not [f for f in files if f.startswith("tmp/")], files
    assert not [f for f in files if "/.tmp-" in f or f.startswith("registry/tmp/")], files


async def test_same_blob_many_clients(
    client: TestClient, config: Config, sessions: list[aiohttp.ClientSession]
) -> None:
    data = os.urandom(1024 * 1024 + 17)
    digest = sha256(data)
    jobs = []
    for i, s in enumerate(sessions):
        name = "shared/blob" if i % 2 else f"shared/blob{i % 4}"
        jobs.append(PUSHERS[i % len(PUSHERS)](s, name, data))
    statuses = await asyncio.gather(*jobs)
    assert statuses == [201] * CLIENTS
    for name in ("shared/blob", "shared/blob0", "shared/blob2"):
        resp = await client.get(f"/v2/{name}/blobs/{digest}")
        assert resp.status == 200
        assert await resp.read() == data
    files = blob_files(config.registry_storage)
    assert list(files) == [digest]
    assert sha256(files[digest].read_bytes()) == digest
    _no_leftovers(config)


async def test_same_tag_many_clients(
    client: TestClient, config: Config, sessions: list[aiohttp.ClientSession]
) -> None:
    images = [make_image(layer_sizes=(50_000,)) for _ in sessions]

    async def push(s: aiohttp.ClientSession, image_index: int) -> int:
        image = images[image_index]
        for blob in image.blobs:
            assert await _monolithic(s, "race", blob) == 201
        headers = {"Content-Type": image.media_type}
        async with s.put("/v2/race/manifests/latest", data=image.manifest, headers=headers) as r:
            return r.status

    statuses = await asyncio.gather(*(push(s, i) for i, s in enumerate(sessions)))
    assert statuses == [201] * CLIENTS
    resp = await client.get("/v2/race/manifests/latest")
    assert resp.status == 200
    body = await resp.read()
    assert sha256(body) == resp.headers["Docker-Content-Digest"]
    assert body in {image.manifest for image in images}
    resp = await client.get("/v2/race/tags/list")
    assert (await resp.json())["tags"] == ["latest"]
    for image in images:
        resp = await client.get(f"/v2/race/manifests/{image.digest}")
        assert resp.status == 200
        assert await resp.read() == image.manifest
    _no_leftovers(config)


async def test_same_manifest_many_tags_and_repos(
    client: TestClient, config: Config, sessions: list[aiohttp.ClientSession]
) -> None:
    """The same image pushed at once under many tags and into two repositories."""
    image = make_image(layer_sizes=(200_000, 300_000))

    async def push(s: aiohttp.ClientSession, i: int) -> int:
        name = f"fanout/r{i % 2}"
        for blob in image.blobs:
            assert await PUSHERS[i % len(PUSHERS)](s, name, blob) == 201
        headers = {"Content-Type": image.media_type}
        async with s.put(f"/v2/{name}/manifests/t{i}", data=image.manifest, headers=headers) as r:
            return r.status

    statuses = await asyncio.gather(*(push(s, i) for i, s in enumerate(sessions)))
    assert statuses == [201] * CLIENTS
    for r in (0, 1):
        resp = await client.get(f"/v2/fanout/r{r}/tags/list")
        tags = (await resp.json())["tags"]
        assert tags == sorted(f"t{i}" for i in range(r, CLIENTS, 2))
        for tag in tags:
            resp = await client.get(f"/v2/fanout/r{r}/manifests/{tag}")
            assert await resp.read() == image.manifest
    assert len(blob_files(config.registry_storage)) == 1 + len(image.blobs)
    _no_leftovers(config)


async def test_concurrent_patches_to_one_session(
    client: TestClient, sessions: list[aiohttp.ClientSession]
) -> None:
    """Racing chunks for the same offset: exactly one lands, the session stays consistent."""
    resp = await client.post("/v2/onesession/blobs/uploads/")
    location = resp.headers["Location"]
    chunks = [os.urandom(512 * 1024) for _ in sessions]

    async def patch(s: aiohttp.ClientSession, chunk: bytes) -> int:
        headers = {"Content-Range": f"0-{len(chunk) - 1}"}
        async with s.patch(location, data=chunk, headers=headers) as r:
            return r.status

    statuses = await asyncio.gather(*(patch(s, c) for s, c in zip(sessions, chunks, strict=True)))
    assert statuses.count(202) == 1, statuses
    assert set(statuses) <= {202, 400, 416}, statuses
    winner = chunks[statuses.index(202)]
    resp = await client.get(location)
    assert resp.headers["Range"] == f"0-{len(winner) - 1}"
    resp = await client.put(f"{location}?digest={sha256(winner)}")
    assert resp.status == 201, await resp.text()


async def test_pulls_during_pushes(
    client: TestClient, sessions: list[aiohttp.ClientSession]
) -> None:
    """Readers never see a partial blob while writers push it."""
    data = os.urandom(2 * 1024 * 1024)
    digest = sha256(data)
    seen: list[int] = []

    async def reader(s: aiohttp.ClientSession) -> None:
        for _ in range(20):
            async with s.get(f"/v2/live/blobs/{digest}") as r:
                if r.status == 200:
                    assert sha256(await r.read()) == digest
                else:
                    assert r.status == 404
                seen.append(r.status)
            await asyncio.sleep(0.002)

    half = CLIENTS // 2
    writers = [_chunked(s, "live", data) for s in sessions[:half]]
    readers = [reader(s) for s in sessions[half:]]
    results = await asyncio.gather(*writers, *readers)
    assert results[:half] == [201] * half
    resp = await client.get(f"/v2/live/blobs/{digest}")
    assert await resp.read() == data
    assert seen


async def test_put_manifest_same_tag_while_deleting(
    client: TestClient, sessions: list[aiohttp.ClientSession]
) -> None:
    """Tag writes racing tag deletes leave either a valid tag or none, never a broken one."""
    image = make_image(layer_sizes=(10,))
    for blob in image.blobs:
        await _monolithic(sessions[0], "flip", blob)
    resp = await put_manifest(client, "flip", "t", image.manifest, image.media_type)
    assert resp.status == 201

    async def flip(s: aiohttp.ClientSession, i: int) -> None:
        for _ in range(10):
            if i % 2:
                async with s.delete("/v2/flip/manifests/t") as r:
                    assert r.status in (202, 404)
            else:
                headers = {"Content-Type": image.media_type}
                async with s.put("/v2/flip/manifests/t", data=image.manifest, headers=headers) as r:
                    assert r.status == 201

    await asyncio.gather(*(flip(s, i) for i, s in enumerate(sessions)))
    resp = await client.get("/v2/flip/manifests/t")
    if resp.status == 200:
        assert await resp.read() == image.manifest
    else:
        assert resp.status == 404
    resp = await client.get("/v2/flip/tags/list")
    assert (await resp.json())["tags"] in ([], ["t"])


async def test_concurrent_puts_to_one_session(
    client: TestClient, config: Config, sessions: list[aiohttp.ClientSession]
) -> None:
    """Retried PUTs racing on one session: one 201, the others BLOB_UPLOAD_UNKNOWN."""
    data = os.urandom(1024 * 1024)
    resp = await client.post("/v2/oneput/blobs/uploads/")
    location = resp.headers["Location"]

    async def put(s: aiohttp.ClientSession) -> tuple[int, str]:
        async with s.put(f"{location}?digest={sha256(data)}", data=data) as r:
            return r.status, await r.text()

    results = await asyncio.gather(*(put(s) for s in sessions[:6]))
    statuses = [status for status, _ in results]
    assert statuses.count(201) == 1, results
    for status, text in results:
        if status != 201:
            assert status == 404 and "BLOB_UPLOAD_UNKNOWN" in text, (status, text)
    resp = await client.get(f"/v2/oneput/blobs/{sha256(data)}")
    assert await resp.read() == data
    _no_leftovers(config)
