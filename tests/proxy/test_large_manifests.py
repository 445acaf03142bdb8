"""Upstream manifests are read to the end, and a short one is never cached (issue 11, item 2).

A single `read(n)` returns what has arrived so far: every manifest from ~140 KB to
3 MB pulled from Debian's docker-registry failed with 503, and an upstream that
sent no `Docker-Content-Digest` could have a truncated prefix that still parses
stored under the tag.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from regproxy import manifest as mf
from tests.support.digests import sha256
from tests.support.inprocess import make_config, start_client
from tests.support.processes import ReferenceRegistry

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def big_manifest(config: bytes, layer: bytes, padding: int) -> bytes:
    """An image manifest made large by an annotation (as SBOM and attestation ones are)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": sha256(layer), "size": len(layer)}],
        "annotations": {"org.example.padding": "x" * padding},
    }
    return json.dumps(doc).encode()


@pytest.fixture
def reference(tmp_path: Path) -> Iterator[ReferenceRegistry]:
    registry = ReferenceRegistry(tmp_path / "upstream")
    registry.start()
    try:
        yield registry
    finally:
        registry.stop()


async def push_to(session: aiohttp.ClientSession, url: str, name: str, blobs: list[bytes]) -> None:
    for blob in blobs:
        async with session.post(f"{url}/v2/{name}/blobs/uploads/") as resp:
            assert resp.status == 202
            location = resp.headers["Location"]
        separator = "&" if "?" in location else "?"
        target = location if location.startswith("http") else f"{url}{location}"
        async with session.put(f"{target}{separator}digest={sha256(blob)}", data=blob) as resp:
            assert resp.status == 201, await resp.text()


@pytest.mark.parametrize("size", [140_000, 1_000_000, 3_000_000])
async def test_large_manifests_from_docker_registry(
    tmp_path: Path, reference: ReferenceRegistry, size: int
) -> None:
    config, layer = b'{"architecture":"amd64","os":"linux"}', os.urandom(2000)
    manifest = big_manifest(config, layer, size)
    async with aiohttp.ClientSession() as session:
        await push_to(session, reference.url, "big/app", [config, layer])
        headers = {"Content-Type": mf.OCI_MANIFEST}
        put = f"{reference.url}/v2/big/app/manifests/v1"
        async with session.put(put, data=manifest, headers=headers) as resp:
            assert resp.status == 201, await resp.text()
    proxy = {"upstreams": {"up": {"url": reference.url}}}
    client = await start_client(make_config(tmp_path / "cache", proxy=proxy))
    try:
        for path in (
            "/v2/p/up/big/app/manifests/v1",
            f"/v2/p/up/big/app/manifests/{sha256(manifest)}",
        ):
            async with client.get(path, headers={"Accept": mf.OCI_MANIFEST}) as resp:
                assert resp.status == 200, await resp.text()
                assert await resp.read() == manifest
    finally:
        await client.close()


class Misbehaving:
    """An upstream that sends one manifest in slow pieces, without Docker-Content-Digest,
    and, while `truncate` is set, only the first half of it before closing."""

    def __init__(self, manifest: bytes) -> None:
        self.manifest = manifest
        self.truncate = False
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/v2/":
            return web.json_response({})
        if not request.path.startswith("/v2/evil/app/manifests/"):
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN"}]}, status=404)
        response = web.StreamResponse(headers={"Content-Type": mf.OCI_MANIFEST})
        response.content_length = len(self.manifest)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        body = self.manifest[: len(self.manifest) // 2] if self.truncate else self.manifest
        for start in range(0, len(body), 16 * 1024):
            await response.write(body[start : start + 16 * 1024])
            await asyncio.sleep(0.002)
        if self.truncate:
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write_eof()
        return response

    async def __aenter__(self) -> Misbehaving:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.fixture
async def evil(tmp_path: Path) -> AsyncIterator[Misbehaving]:
    # trailing whitespace is valid JSON: the first half of this body parses, and is a
    # different manifest (other bytes, other digest) than the upstream's
    config, layer = b"{}", b"layer"
    doc = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": sha256(layer), "size": len(layer)}],
    }
    async with Misbehaving(json.dumps(doc).encode() + b" " * 300_000) as server:
        yield server


async def test_split_body_without_digest_is_read_whole(tmp_path: Path, evil: Misbehaving) -> None:
    proxy = {"upstreams": {"up": {"url": f"http://127.0.0.1:{evil.port}"}}}
    client = await start_client(make_config(tmp_path, proxy=proxy))
    try:
        async with client.get("/v2/p/up/evil/app/manifests/v1") as resp:
            assert resp.status == 200, await resp.text()
            assert await resp.read() == evil.manifest
    finally:
        await client.close()


async def test_truncated_body_without_digest_is_never_cached(
    tmp_path: Path, evil: Misbehaving
) -> None:
    proxy = {"upstreams": {"up": {"url": f"http://127.0.0.1:{evil.port}"}}}
    client = await start_client(make_config(tmp_path, proxy=proxy))
    try:
        evil.truncate = True
        async with client.get("/v2/p/up/evil/app/manifests/v1") as resp:
            assert resp.status in (502, 503), resp.status
            assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
        tags = list((tmp_path / "storage/proxy/repositories").rglob("_tags/*"))
        assert tags == []
        evil.truncate = False
        async with client.get("/v2/p/up/evil/app/manifests/v1") as resp:
            assert resp.status == 200
            assert await resp.read() == evil.manifest
    finally:
        await client.close()
