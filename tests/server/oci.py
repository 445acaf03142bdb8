"""Small helpers that speak the registry protocol from tests (push blobs and manifests)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestClient

from regproxy import manifest as mf


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def push_blob(client: TestClient, name: str, data: bytes) -> str:
    """Monolithic push (POST ?digest=); returns the digest."""
    digest = sha256(data)
    resp = await client.post(f"/v2/{name}/blobs/uploads/?digest={digest}", data=data)
    assert resp.status == 201, await resp.text()
    return digest


async def push_blob_chunked(client: TestClient, name: str, data: bytes, chunk: int) -> str:
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


@dataclass
class Image:
    manifest: bytes
    digest: str
    config: bytes
    layers: list[bytes]
    media_type: str = mf.OCI_MANIFEST


def make_image(layer_sizes: tuple[int, ...] = (1000, 2000), **extra: Any) -> Image:
    layers = [os.urandom(size) for size in layer_sizes]
    config = json.dumps({"architecture": "amd64", "os": "linux", "rnd": os.urandom(4).hex()})
    config_bytes = config.encode()
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha256(layer),
                "size": len(layer),
            }
            for layer in layers
        ],
        **extra,
    }
    data = json.dumps(doc).encode()
    return Image(data, sha256(data), config_bytes, layers)


async def push_image(client: TestClient, name: str, image: Image, reference: str) -> str:
    for blob in (image.config, *image.layers):
        await push_blob(client, name, blob)
    resp = await client.put(
        f"/v2/{name}/manifests/{reference}",
        data=image.manifest,
        headers={"Content-Type": image.media_type},
    )
    assert resp.status == 201, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == image.digest
    return image.digest


def make_index(children: list[Image]) -> tuple[bytes, str]:
    doc = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_INDEX,
        "manifests": [
            {
                "mediaType": child.media_type,
                "digest": child.digest,
                "size": len(child.manifest),
                "platform": {"architecture": arch, "os": "linux"},
            }
            for child, arch in zip(children, ["amd64", "arm64", "s390x", "ppc64le"], strict=False)
        ],
    }
    data = json.dumps(doc).encode()
    return data, sha256(data)
