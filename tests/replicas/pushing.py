"""Pushing and checking images over HTTP through the load balancer, as a registry client
does: blobs chunk by chunk (POST, PATCHes, PUT), then the manifest; a push that fails
is started again from scratch. `Ledger` keeps what the registry acknowledged (a 201 to
the manifest PUT), which must stay pullable whatever happens afterwards."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import aiohttp

from tests.support.digests import sha256
from tests.support.oci import OCI_CONFIG, OCI_LAYER, descriptor
from tests.support.replicas import REPLICA_HEADER, Replica

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MiB = 1024 * 1024


@dataclass
class PushedImage:
    manifest: bytes
    blobs: list[bytes]

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


def new_image(*layer_sizes: int) -> PushedImage:
    """An image of random layers and a config unique to it."""
    layers = [os.urandom(size) for size in layer_sizes]
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": os.urandom(8).hex()})
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config.encode()),
        "layers": [descriptor(OCI_LAYER, layer) for layer in layers],
    }
    return PushedImage(json.dumps(doc).encode(), [config.encode(), *layers])


class PushFailed(Exception):
    """A request of the push was refused or its connection broke: start again."""


@dataclass
class Trace:
    """(request, status, replica) of each request of a push, for failure messages."""

    steps: list[tuple[str, int, str]] = field(default_factory=list)

    def add(self, what: str, resp: aiohttp.ClientResponse) -> None:
        self.steps.append((what, resp.status, resp.headers.get(REPLICA_HEADER, "-")))


async def _expect(
    resp: aiohttp.ClientResponse, status: int, what: str, trace: Trace | None
) -> aiohttp.ClientResponse:
    if trace is not None:
        trace.add(what, resp)
    if resp.status != status:
        body = (await resp.read())[:300]
        raise PushFailed(f"{what}: {resp.status} from {resp.headers.get(REPLICA_HEADER)}: {body!r}")
    await resp.read()
    return resp


async def push_blob_chunked(
    http: aiohttp.ClientSession, name: str, blob: bytes, chunk: int, trace: Trace | None = None
) -> None:
    """POST, one PATCH per `chunk` bytes, PUT ?digest= (raises PushFailed)."""
    try:
        async with http.post(f"/v2/{name}/blobs/uploads/") as resp:
            location = (await _expect(resp, 202, "POST", trace)).headers["Location"]
        for start in range(0, len(blob), chunk):
            piece = blob[start : start + chunk]
            headers = {
                "Content-Range": f"{start}-{start + len(piece) - 1}",
                "Content-Type": "application/octet-stream",
            }
            async with http.patch(location, data=piece, headers=headers) as resp:
                location = (await _expect(resp, 202, f"PATCH@{start}", trace)).headers["Location"]
        async with http.put(f"{location}?digest={sha256(blob)}") as resp:
            await _expect(resp, 201, "PUT", trace)
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
        raise PushFailed(f"{type(exc).__name__}: {exc}") from exc


async def put_manifest(
    http: aiohttp.ClientSession, name: str, ref: str, image: PushedImage, trace: Trace | None = None
) -> int:
    """PUT the manifest; its status (201: acknowledged). Raises PushFailed on a cut."""
    try:
        headers = {"Content-Type": OCI_MANIFEST}
        url = f"/v2/{name}/manifests/{ref}"
        async with http.put(url, data=image.manifest, headers=headers) as resp:
            if trace is not None:
                trace.add("PUT manifest", resp)
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
        raise PushFailed(f"{type(exc).__name__}: {exc}") from exc


async def push_image(
    http: aiohttp.ClientSession,
    name: str,
    tag: str,
    image: PushedImage,
    chunk: int,
    trace: Trace | None = None,
) -> None:
    """Every blob chunked, then the manifest under `tag`; PushFailed unless it got 201."""
    for blob in image.blobs:
        await push_blob_chunked(http, name, blob, chunk, trace)
    status = await put_manifest(http, name, tag, image, trace)
    if status != 201:
        raise PushFailed(f"manifest PUT: {status}")


@dataclass
class Ledger:
    acked: list[tuple[str, str, PushedImage]] = field(default_factory=list)  # (name, tag, image)
    failures: list[str] = field(default_factory=list)


async def assert_pullable(
    http: aiohttp.ClientSession, name: str, ref: str, image: PushedImage
) -> None:
    """The manifest by `ref` and by digest, and every blob, with their exact bytes."""
    for reference in (ref, image.digest):
        url = f"/v2/{name}/manifests/{reference}"
        async with http.get(url, headers={"Accept": OCI_MANIFEST}) as resp:
            body = await resp.read()
            assert resp.status == 200, (name, reference, resp.status, body[:200])
            assert body == image.manifest, (name, reference)
    for blob in image.blobs:
        async with http.get(f"/v2/{name}/blobs/{sha256(blob)}") as resp:
            assert resp.status == 200, (name, sha256(blob), resp.status)
            assert await resp.read() == blob, (name, sha256(blob))


def busiest_upload(replicas: list[Replica]) -> tuple[Replica, int] | None:
    """The replica holding the largest upload session in its temporary folder."""
    best = None
    for replica in replicas:
        for size in replica.growing_uploads().values():
            if best is None or size > best[1]:
                best = (replica, size)
    return best
