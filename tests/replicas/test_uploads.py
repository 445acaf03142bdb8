"""A chunked upload whose requests land on different replicas (issue 14).

Each replica keeps its upload sessions in its own temporary folder, as on separate
hosts; the load balancer sends every request of the push to the next replica. POST,
the PATCHes, the status GETs and the PUT must work wherever they land, and every
replica must report the same offset for the session in between.
"""

from __future__ import annotations

import json
import os

import aiohttp
import pytest

from tests.support.digests import sha256
from tests.support.oci import OCI_CONFIG, OCI_LAYER, descriptor
from tests.support.replicas import REPLICA_HEADER, Cluster

pytestmark = pytest.mark.timeout(120)

KiB = 1024
MiB = 1024 * KiB
#: chunk sizes of the PATCHes: small ones (read by aiohttp) and some above its in-memory
#: limit (read from the socket by worker threads)
CHUNKS = (300 * KiB, 2 * MiB + 7, 64 * KiB, 3 * MiB, 1)


def offset_of(resp: aiohttp.ClientResponse) -> int:
    """The session's offset from `Range: 0-<last byte>` (0-0 counts as nothing here: no
    test sends a first chunk of one byte)."""
    end = int(resp.headers["Range"].split("-")[1])
    return 0 if end == 0 else end + 1


async def status_everywhere(cluster: Cluster, location: str) -> dict[str, int]:
    """{replica: offset it reports} for a GET of the session sent to each replica directly."""
    found = {}
    async with aiohttp.ClientSession() as session:
        for replica in cluster.replicas:
            async with session.get(f"{replica.url}{location}") as resp:
                assert resp.status == 204, (replica.replica_name, resp.status, await resp.text())
                found[replica.replica_name] = offset_of(resp)
    return found


async def test_chunked_upload_across_replicas(cluster: Cluster) -> None:
    data = b"".join(os.urandom(size) for size in CHUNKS)
    digest = sha256(data)
    name = "uploads/across"
    took: list[tuple[str, str]] = []  # (request, replica that answered)
    # one keep-alive connection to HAProxy, as a client pushing a layer holds
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(cluster.url, connector=connector) as http:
        async with http.post(f"/v2/{name}/blobs/uploads/") as resp:
            assert resp.status == 202, await resp.text()
            location = resp.headers["Location"]
            took.append(("POST", resp.headers[REPLICA_HEADER]))
        offset = 0
        for size in CHUNKS:
            chunk = data[offset : offset + size]
            headers = {
                "Content-Range": f"{offset}-{offset + size - 1}",
                "Content-Type": "application/octet-stream",
            }
            async with http.patch(location, data=chunk, headers=headers) as resp:
                answer = await resp.text()
                assert resp.status == 202, (took, resp.headers.get(REPLICA_HEADER), answer)
                took.append(("PATCH", resp.headers[REPLICA_HEADER]))
                location = resp.headers["Location"]
                offset += size
                assert offset_of(resp) == offset
            # every replica knows the session and where it stands
            assert await status_everywhere(cluster, location) == dict.fromkeys(
                cluster.names, offset
            ), took
            async with http.get(location) as resp:
                assert resp.status == 204
                assert offset_of(resp) == offset
                took.append(("GET", resp.headers[REPLICA_HEADER]))
        async with http.put(f"{location}?digest={digest}") as resp:
            assert resp.status == 201, (took, resp.headers.get(REPLICA_HEADER), await resp.text())
            took.append(("PUT", resp.headers[REPLICA_HEADER]))
            assert resp.headers["Docker-Content-Digest"] == digest

    patches = [replica for request, replica in took if request == "PATCH"]
    assert set(patches) == set(cluster.names), f"the PATCHes did not spread: {took}"
    # the blob is whole on every replica (a HEAD and a full GET on each)
    async with aiohttp.ClientSession() as session:
        for replica in cluster.replicas:
            url = f"{replica.url}/v2/{name}/blobs/{digest}"
            async with session.get(url) as resp:
                assert resp.status == 200, replica.replica_name
                assert await resp.read() == data


async def test_an_image_pushed_chunk_by_chunk_pulls_back_everywhere(cluster: Cluster) -> None:
    """Config, two layers and the manifest through the balancer; then the manifest by tag
    and by digest, and every blob, from each replica directly."""
    name = "uploads/image"
    layers = [os.urandom(1_500_000), os.urandom(70_000)]
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}'
    async with aiohttp.ClientSession(cluster.url) as http:
        for blob in (config, *layers):
            async with http.post(f"/v2/{name}/blobs/uploads/") as resp:
                assert resp.status == 202
                location = resp.headers["Location"]
            half = len(blob) // 2
            for start, end in ((0, half), (half, len(blob))):
                headers = {"Content-Range": f"{start}-{end - 1}"}
                async with http.patch(location, data=blob[start:end], headers=headers) as resp:
                    assert resp.status == 202, await resp.text()
                    location = resp.headers["Location"]
            async with http.put(f"{location}?digest={sha256(blob)}") as resp:
                assert resp.status == 201, await resp.text()
        manifest = (
            b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
            b'"config":'
            + _json(descriptor(OCI_CONFIG, config))
            + b',"layers":['
            + b",".join(_json(descriptor(OCI_LAYER, layer)) for layer in layers)
            + b"]}"
        )
        headers = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
        async with http.put(f"/v2/{name}/manifests/v1", data=manifest, headers=headers) as resp:
            assert resp.status == 201, await resp.text()
    async with aiohttp.ClientSession() as session:
        for replica in cluster.replicas:
            for ref in ("v1", sha256(manifest)):
                async with session.get(f"{replica.url}/v2/{name}/manifests/{ref}") as resp:
                    assert resp.status == 200
                    assert await resp.read() == manifest
            for blob in (config, *layers):
                async with session.get(f"{replica.url}/v2/{name}/blobs/{sha256(blob)}") as resp:
                    assert await resp.read() == blob


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
