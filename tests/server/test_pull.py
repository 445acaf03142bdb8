"""Pull: `GET /v2/`, manifests by tag and digest for every media type, blobs with Range."""

from __future__ import annotations

import json
import os

import pytest
from aiohttp.test_utils import TestClient

from regproxy import manifest as mf
from tests.support.digests import sha256
from tests.support.oci import (
    EMPTY_BYTES,
    EMPTY_CONFIG,
    Image,
    assert_error,
    make_artifact,
    make_docker_image,
    make_image,
    make_index,
    push_blob,
    push_image,
    put_manifest,
)


async def test_version_check(client: TestClient) -> None:
    """`GET /v2/` answers 200 with the API version header; so does `/v2` and HEAD."""
    for path in ("/v2/", "/v2"):
        resp = await client.get(path)
        assert resp.status == 200
        assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        assert await resp.json() == {}
    resp = await client.head("/v2/")
    assert resp.status == 200
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_errors_carry_api_version(client: TestClient) -> None:
    """Error answers carry the API version header too."""
    resp = await client.get("/v2/nothing/manifests/latest")
    await assert_error(resp, 404, "MANIFEST_UNKNOWN")
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def _check_manifest(client: TestClient, name: str, ref: str, image: Image) -> None:
    """GET and HEAD of `ref` answer the exact bytes, media type, length and digest."""
    resp = await client.get(f"/v2/{name}/manifests/{ref}", headers={"Accept": "*/*"})
    assert resp.status == 200, await resp.text()
    assert await resp.read() == image.manifest
    assert resp.headers["Content-Type"] == image.media_type
    assert int(resp.headers["Content-Length"]) == len(image.manifest)
    assert resp.headers["Docker-Content-Digest"] == image.digest
    head = await client.head(f"/v2/{name}/manifests/{ref}")
    assert head.status == 200
    assert await head.read() == b""
    assert head.headers["Content-Type"] == image.media_type
    assert int(head.headers["Content-Length"]) == len(image.manifest)
    assert head.headers["Docker-Content-Digest"] == image.digest


@pytest.mark.parametrize("kind", ["oci", "docker"])
async def test_image_manifest_by_tag_and_digest(client: TestClient, kind: str) -> None:
    image = make_image() if kind == "oci" else make_docker_image()
    await push_image(client, "lib/img", image, "v1")
    await _check_manifest(client, "lib/img", "v1", image)
    await _check_manifest(client, "lib/img", image.digest, image)


@pytest.mark.parametrize("media_type", [mf.OCI_INDEX, mf.DOCKER_MANIFEST_LIST])
async def test_index_manifest(client: TestClient, media_type: str) -> None:
    """An OCI index and a Docker manifest list over pushed children round-trip exactly."""
    children = [make_image(), make_docker_image()]
    for i, child in enumerate(children):
        await push_image(client, "multi", child, child.digest if i else f"child{i}")
    data, digest = make_index(children, media_type)
    index = Image(data, digest, b"", [], media_type)
    resp = await put_manifest(client, "multi", "latest", data, media_type)
    assert resp.status == 201, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == digest
    await _check_manifest(client, "multi", "latest", index)
    await _check_manifest(client, "multi", digest, index)
    for child in children:
        await _check_manifest(client, "multi", child.digest, child)


async def test_artifact_with_empty_config(client: TestClient) -> None:
    """An OCI artifact: `artifactType` and the empty config `{}` are stored and served."""
    artifact = make_artifact("application/vnd.example.sbom+json", payload=b'{"sbom": true}')
    await push_image(client, "art", artifact, "sbom")
    await _check_manifest(client, "art", "sbom", artifact)
    doc = json.loads(await (await client.get("/v2/art/manifests/sbom")).read())
    assert doc["artifactType"] == "application/vnd.example.sbom+json"
    assert doc["config"]["mediaType"] == EMPTY_CONFIG
    resp = await client.get(f"/v2/art/blobs/{sha256(EMPTY_BYTES)}")
    assert resp.status == 200
    assert await resp.read() == b"{}"
    assert resp.headers["Content-Length"] == "2"


async def test_accept_never_converts(client: TestClient) -> None:
    """Whatever the Accept header asks for, the stored bytes and media type are served."""
    image = make_docker_image()
    await push_image(client, "conv", image, "v1")
    resp = await client.get(
        "/v2/conv/manifests/v1", headers={"Accept": mf.OCI_MANIFEST + ", " + mf.OCI_INDEX}
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == mf.DOCKER_MANIFEST
    assert await resp.read() == image.manifest


async def test_unknown_manifest(client: TestClient) -> None:
    image = make_image()
    await push_image(client, "known", image, "v1")
    resp = await client.get("/v2/known/manifests/v2")
    await assert_error(resp, 404, "MANIFEST_UNKNOWN")
    resp = await client.head("/v2/known/manifests/v2")
    assert resp.status == 404
    assert await resp.read() == b""
    resp = await client.get(f"/v2/known/manifests/{sha256(b'nope')}")
    await assert_error(resp, 404, "MANIFEST_UNKNOWN")
    # a layer is a blob, never a manifest
    resp = await client.get(f"/v2/known/manifests/{sha256(image.layers[0])}")
    await assert_error(resp, 404, "MANIFEST_UNKNOWN")
    # a manifest of another repository is not visible here
    resp = await client.get(f"/v2/other/manifests/{image.digest}")
    assert resp.status == 404
    assert (await resp.json())["errors"][0]["code"] in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN")


async def test_blob_get_and_head(client: TestClient) -> None:
    data = os.urandom(100_000)
    digest = await push_blob(client, "blobs/repo", data)
    resp = await client.get(f"/v2/blobs/repo/blobs/{digest}")
    assert resp.status == 200
    assert await resp.read() == data
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Content-Length"] == str(len(data))
    assert resp.headers["Content-Type"] == "application/octet-stream"
    head = await client.head(f"/v2/blobs/repo/blobs/{digest}")
    assert head.status == 200
    assert await head.read() == b""
    assert head.headers["Content-Length"] == str(len(data))
    assert head.headers["Docker-Content-Digest"] == digest


async def test_blob_ranges(client: TestClient) -> None:
    """Range reads answer 206 with Content-Range; unsatisfiable ranges 416."""
    data = os.urandom(10_000)
    digest = await push_blob(client, "ranges", data)
    url = f"/v2/ranges/blobs/{digest}"
    cases = {
        "bytes=0-0": (0, 0),
        "bytes=100-199": (100, 199),
        "bytes=9990-": (9990, 9999),
        "bytes=-10": (9990, 9999),
        "bytes=9000-20000": (9000, 9999),
    }
    for header, (start, end) in cases.items():
        resp = await client.get(url, headers={"Range": header})
        assert resp.status == 206, header
        assert await resp.read() == data[start : end + 1], header
        assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{len(data)}", header
        assert resp.headers["Content-Length"] == str(end - start + 1)
    resp = await client.get(url, headers={"Range": "bytes=10000-"})
    assert resp.status == 416
    assert resp.headers["Content-Range"] == f"bytes */{len(data)}"
    resp = await client.get(url, headers={"Range": "bytes=20000-30000"})
    assert resp.status == 416


async def test_blob_visible_only_where_pushed(client: TestClient) -> None:
    """A blob is visible in repositories it was pushed or mounted into, nowhere else."""
    data = os.urandom(5000)
    digest = await push_blob(client, "owner", data)
    for method in ("GET", "HEAD"):
        resp = await client.request(method, f"/v2/stranger/blobs/{digest}")
        assert resp.status == 404
        if method == "GET":
            await assert_error(resp, 404, "BLOB_UNKNOWN")
    resp = await client.post(f"/v2/friend/blobs/uploads/?mount={digest}&from=owner")
    assert resp.status == 201
    resp = await client.get(f"/v2/friend/blobs/{digest}")
    assert resp.status == 200
    assert await resp.read() == data


async def test_unknown_blob(client: TestClient) -> None:
    resp = await client.get(f"/v2/none/blobs/{sha256(b'missing')}")
    await assert_error(resp, 404, "BLOB_UNKNOWN")
    resp = await client.head(f"/v2/none/blobs/{sha256(b'missing')}")
    assert resp.status == 404


async def test_manifest_is_readable_as_blob(client: TestClient) -> None:
    """A manifest's bytes are a blob of its repository (what skopeo and ctr rely on)."""
    image = make_image()
    await push_image(client, "asblob", image, "v1")
    resp = await client.get(f"/v2/asblob/blobs/{image.digest}")
    assert resp.status == 200
    assert await resp.read() == image.manifest


async def test_large_blob_streams(client: TestClient) -> None:
    """A blob of several MiB is served whole and byte-exact."""
    data = os.urandom(6 * 1024 * 1024 + 123)
    digest = await push_blob(client, "big", data)
    resp = await client.get(f"/v2/big/blobs/{digest}")
    assert resp.status == 200
    assert sha256(await resp.read()) == digest
