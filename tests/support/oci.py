"""Small helpers that speak the registry protocol from tests (push blobs and manifests)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from regproxy import manifest as mf
from regproxy.config import Config

from .digests import sha256

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
EMPTY_BYTES = b"{}"
ARCHES = ("amd64", "arm64", "s390x", "ppc64le", "riscv64", "386")


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    """An OCI descriptor for `data`."""
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


async def error_codes(resp: ClientResponse) -> list[str]:
    """The OCI error codes of a response's JSON envelope."""
    body = await resp.json(content_type=None)
    assert isinstance(body, dict) and isinstance(body.get("errors"), list), body
    return [entry["code"] for entry in body["errors"]]


async def assert_error(resp: ClientResponse, status: int, code: str) -> None:
    """The response is `status` with `code` in an OCI error envelope."""
    text = await resp.text()
    assert resp.status == status, f"{resp.method} {resp.url}: {resp.status} {text}"
    if resp.method == "HEAD":
        return
    assert resp.headers["Content-Type"].startswith("application/json"), resp.headers
    assert code in await error_codes(resp), text


async def push_blob(
    client: TestClient, name: str, data: bytes, *, headers: Mapping[str, str] | None = None
) -> str:
    """Monolithic push (POST ?digest=); returns the digest. `headers`: e.g. credentials."""
    digest = sha256(data)
    url = f"/v2/{name}/blobs/uploads/?digest={digest}"
    async with client.post(url, data=data, headers=headers) as resp:
        assert resp.status == 201, await resp.text()
    return digest


async def push_blob_chunked(client: TestClient, name: str, data: bytes, chunk: int) -> str:
    """POST, PATCH per chunk (with Content-Range), PUT ?digest=; returns the digest."""
    digest = sha256(data)
    resp = await client.post(f"/v2/{name}/blobs/uploads/")
    assert resp.status == 202, await resp.text()
    location = resp.headers["Location"]
    for start in range(0, len(data), chunk):
        piece = data[start : start + chunk]
        resp = await client.patch(
            location,
            data=piece,
            headers={"Content-Range": f"{start}-{start + len(piece) - 1}"},
        )
        assert resp.status == 202, await resp.text()
        location = resp.headers["Location"]
    resp = await client.put(f"{location}?digest={digest}")
    assert resp.status == 201, await resp.text()
    return digest


async def put_manifest(
    client: TestClient,
    name: str,
    reference: str,
    data: bytes,
    media_type: str | None,
    *,
    headers: Mapping[str, str] | None = None,
) -> ClientResponse:
    """PUT a manifest and return the (unchecked) response."""
    sent = {**(headers or {}), **({"Content-Type": media_type} if media_type else {})}
    return await client.put(f"/v2/{name}/manifests/{reference}", data=data, headers=sent)


@dataclass
class Image:
    manifest: bytes
    digest: str
    config: bytes
    layers: list[bytes]
    media_type: str = mf.OCI_MANIFEST
    blobs: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.blobs:
            self.blobs = [self.config, *self.layers]


def make_image(layer_sizes: tuple[int, ...] = (1000, 2000), **extra: Any) -> Image:
    """A random OCI image manifest; `extra` adds top-level fields (e.g. `subject`)."""
    layers = [os.urandom(size) for size in layer_sizes]
    config = json.dumps({"architecture": "amd64", "os": "linux", "rnd": os.urandom(4).hex()})
    config_bytes = config.encode()
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config_bytes),
        "layers": [descriptor(OCI_LAYER, layer) for layer in layers],
        **extra,
    }
    data = json.dumps(doc).encode()
    return Image(data, sha256(data), config_bytes, layers)


def make_docker_image(layer_sizes: tuple[int, ...] = (1500,)) -> Image:
    """A random Docker v2 schema 2 manifest."""
    layers = [os.urandom(size) for size in layer_sizes]
    config_bytes = json.dumps({"os": "linux", "rnd": os.urandom(4).hex()}).encode()
    doc = {
        "schemaVersion": 2,
        "mediaType": mf.DOCKER_MANIFEST,
        "config": descriptor(DOCKER_CONFIG, config_bytes),
        "layers": [descriptor(DOCKER_LAYER, layer) for layer in layers],
    }
    data = json.dumps(doc, indent=3).encode()
    return Image(data, sha256(data), config_bytes, layers, mf.DOCKER_MANIFEST)


def make_artifact(
    artifact_type: str,
    subject: Image | None = None,
    payload: bytes | None = None,
    annotations: dict[str, str] | None = None,
) -> Image:
    """An OCI artifact: `artifactType`, the empty config `{}`, one layer, optional subject."""
    layer = payload if payload is not None else os.urandom(300)
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": descriptor(EMPTY_CONFIG, EMPTY_BYTES),
        "layers": [descriptor("application/octet-stream", layer)],
    }
    if subject is not None:
        doc["subject"] = descriptor(subject.media_type, subject.manifest)
    if annotations:
        doc["annotations"] = annotations
    data = json.dumps(doc).encode()
    return Image(data, sha256(data), EMPTY_BYTES, [layer])


async def push_image(
    client: TestClient,
    name: str,
    image: Image,
    reference: str,
    *more_tags: str,
    headers: Mapping[str, str] | None = None,
) -> str:
    """Push the blobs, then the manifest under `reference` and every one of `more_tags`.

    Returns the manifest digest; `headers` go with every request (e.g. a user's credentials).
    """
    for blob in image.blobs:
        await push_blob(client, name, blob, headers=headers)
    for tag in (reference, *more_tags):
        resp = await put_manifest(
            client, name, tag, image.manifest, image.media_type, headers=headers
        )
        text = await resp.text()
        assert resp.status == 201, text
        assert resp.headers["Docker-Content-Digest"] == image.digest
    return image.digest


async def list_referrers(
    client: TestClient, name: str, digest: str, query: str = ""
) -> dict[str, Any]:
    """The referrers index of `digest` in `name` (`query`: e.g. `?artifactType=...`),
    checked to be a 200 OCI image index."""
    resp = await client.get(f"/v2/{name}/referrers/{digest}{query}")
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == mf.OCI_INDEX
    body = await resp.json(content_type=None)
    assert body["schemaVersion"] == 2
    assert body["mediaType"] == mf.OCI_INDEX
    return body


def make_index(children: list[Image], media_type: str = mf.OCI_INDEX) -> tuple[bytes, str]:
    """An index (or Docker manifest list) over `children`; returns (bytes, digest)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            {
                **descriptor(child.media_type, child.manifest),
                "platform": {"architecture": arch, "os": "linux"},
            }
            for child, arch in zip(children, ARCHES, strict=False)
        ],
    }
    data = json.dumps(doc).encode()
    return data, sha256(data)


def stored_files(config: Config) -> set[str]:
    """Every file in the registry store and the upload area, minus the server's own
    bookkeeping (the lock file, this host's replica id and its record, `storage.replicas`).

    Compare snapshots before and after a refused request to prove nothing was stored.
    """
    found: set[str] = set()
    for label, root in (
        ("registry", config.registry_storage),
        ("tmp", config.temporary_registry_storage),
    ):
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                rel = Path(dirpath, name).relative_to(root)
                if str(rel) not in ("lock", "replica-id") and rel.parts[0] != "replicas":
                    found.add(f"{label}/{rel}")
    return found


def blob_files(root: Path) -> dict[str, Path]:
    """`digest → path` of every file under a store's `blobs/` folder."""
    out: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(root / "blobs"):
        for name in files:
            path = Path(dirpath, name)
            out[f"{path.parent.parent.name}:{name}"] = path
    return out


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


async def raw_request(host: str, port: int, head: str, body: bytes = b"") -> RawResponse:
    """Send a request byte-exactly (no client-side URL normalisation) and read the answer.

    `head` is the request line plus header lines without the final blank line;
    `Host`, `Content-Length` (when a body is given) and `Connection: close` are added.
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        lines = [head.rstrip("\r\n"), f"Host: {host}:{port}", "Connection: close"]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    header_blob, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = header_blob.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return RawResponse(int(status_line.split()[1]), headers, payload)


def envelope_codes(body: bytes) -> list[str]:
    """Error codes of a raw response body."""
    return [entry["code"] for entry in json.loads(body)["errors"]]
