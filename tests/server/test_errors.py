"""Bad input: malformed names, tags, digests, Content-Range and manifests.

Each is refused with the right 4xx status and OCI error code, never a 500, and
nothing reaches the storage directories.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient

from regproxy import manifest as mf
from regproxy.config import Config
from tests.support.digests import sha256
from tests.support.oci import (
    EMPTY_BYTES,
    EMPTY_CONFIG,
    RawResponse,
    assert_error,
    descriptor,
    envelope_codes,
    error_codes,
    make_image,
    push_blob,
    put_manifest,
    raw_request,
    stored_files,
)

DIGEST = sha256(b"payload")


def _doc(**fields: object) -> bytes:
    return json.dumps({"schemaVersion": 2, **fields}).encode()


CONFIG_DESC = descriptor(EMPTY_CONFIG, EMPTY_BYTES)


@pytest.fixture
async def snapshot(client: TestClient, config: Config) -> AsyncIterator[set[str]]:
    """A repository `ok` with one image, and a check that the test stored nothing more."""
    image = make_image()
    for blob in image.blobs:
        await push_blob(client, "ok", blob)
    await push_blob(client, "ok", EMPTY_BYTES)
    resp = await put_manifest(client, "ok", "v1", image.manifest, image.media_type)
    assert resp.status == 201
    before = stored_files(config)
    yield before
    assert stored_files(config) == before, "a refused request left files behind"


async def _raw(client: TestClient, head: str, body: bytes = b"") -> RawResponse:
    assert client.server.host is not None and client.server.port is not None
    return await raw_request(client.server.host, client.server.port, head, body)


BAD_NAMES = [
    "Upper",
    "a/Upper",
    "_leading",
    "a/_meta",
    ".hidden",
    "-dash",
    "dash-",
    "a..b",
    "a__b__",
    "a" * 256,
    "/".join(["abcdefg"] * 40),
]


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_bad_names(client: TestClient, snapshot: set[str], name: str) -> None:
    """Every endpoint refuses a malformed name with 400 NAME_INVALID."""
    requests = [
        ("GET", f"/v2/{name}/tags/list", None),
        ("GET", f"/v2/{name}/manifests/v1", None),
        ("HEAD", f"/v2/{name}/manifests/v1", None),
        ("PUT", f"/v2/{name}/manifests/v1", b"{}"),
        ("DELETE", f"/v2/{name}/manifests/v1", None),
        ("GET", f"/v2/{name}/blobs/{DIGEST}", None),
        ("DELETE", f"/v2/{name}/blobs/{DIGEST}", None),
        ("POST", f"/v2/{name}/blobs/uploads/", None),
        ("POST", f"/v2/{name}/blobs/uploads/?digest={DIGEST}", b"payload"),
        ("PATCH", f"/v2/{name}/blobs/uploads/{'0' * 32}", b"x"),
        ("GET", f"/v2/{name}/referrers/{DIGEST}", None),
    ]
    for method, path, body in requests:
        resp = await client.request(method, path, data=body)
        await assert_error(resp, 400, "NAME_INVALID")


async def test_name_length_limit(client: TestClient, snapshot: set[str]) -> None:
    """255 characters is the longest valid name."""
    name = "a" * 255
    resp = await client.get(f"/v2/{name}/tags/list")
    await assert_error(resp, 404, "NAME_UNKNOWN")
    resp = await client.get(f"/v2/{name}a/tags/list")
    await assert_error(resp, 400, "NAME_INVALID")


TRAVERSALS = [
    "/v2/%2e%2e/tags/list",
    "/v2/a/%2e%2e/b/tags/list",
    "/v2/a/%2E%2E/%2e%2e/etc/tags/list",
    "/v2/..%2fetc/tags/list",
    "/v2/a%2F..%2F..%2Fetc/tags/list",
    "/v2/a//b/tags/list",
    "/v2/a/./b/tags/list",
    "/v2/%00/tags/list",
    "/v2/a%20b/tags/list",
    "/v2/../v2/ok/tags/list",
    "/v2/ok/../../etc/tags/list",
]


@pytest.mark.parametrize("path", TRAVERSALS)
async def test_traversal_and_encoded_names(
    client: TestClient, snapshot: set[str], path: str
) -> None:
    """Encoded or literal dots, slashes and empty components are NAME_INVALID, sent raw."""
    manifest = path.replace("tags/list", "manifests/v1")
    requests = [
        (f"GET {path} HTTP/1.1", b""),
        (f"DELETE {manifest} HTTP/1.1", b""),
        (f"PUT {manifest} HTTP/1.1\r\nContent-Type: {mf.OCI_MANIFEST}", b"{}"),
        (f"POST {path.replace('tags/list', 'blobs/uploads/')}?digest={DIGEST} HTTP/1.1", b"x"),
        (f"GET {path.replace('tags/list', 'blobs/' + DIGEST)} HTTP/1.1", b""),
    ]
    for head, body in requests:
        resp = await _raw(client, head, body)
        assert resp.status == 400, (head, resp)
        assert envelope_codes(resp.body) == ["NAME_INVALID"], (head, resp)


BAD_TAGS = ["-dash", ".dot", "a" * 129, "tag+plus", "tag%20space", "tag!", "t%C3%A4g", "a%2Fb"]


@pytest.mark.parametrize("tag", BAD_TAGS)
async def test_bad_tags(client: TestClient, snapshot: set[str], tag: str) -> None:
    manifest = _doc(mediaType=mf.OCI_MANIFEST, config=CONFIG_DESC, layers=[])
    for method, body in (("PUT", manifest), ("GET", None), ("HEAD", None), ("DELETE", None)):
        resp = await _raw(
            client,
            f"{method} /v2/ok/manifests/{tag} HTTP/1.1\r\nContent-Type: {mf.OCI_MANIFEST}",
            body or b"",
        )
        assert resp.status == 400, (method, tag, resp)
        if method != "HEAD":
            assert envelope_codes(resp.body) == ["TAG_INVALID"]


async def test_longest_tag(client: TestClient) -> None:
    image = make_image(layer_sizes=())
    await push_blob(client, "long", image.config)
    tag = "a" * 128
    resp = await put_manifest(client, "long", tag, image.manifest, mf.OCI_MANIFEST)
    assert resp.status == 201
    resp = await client.get("/v2/long/tags/list")
    assert (await resp.json())["tags"] == [tag]


BAD_DIGESTS = [
    "sha256:abc",
    "sha256:" + "A" * 64,
    "sha256:" + "0" * 63,
    "sha256:" + "0" * 65,
    "sha256:" + "g" * 64,
    "md5:" + "0" * 32,
    "sha1:" + "0" * 40,
    "sha256:",
    ":" + "0" * 64,
    "sha256::" + "0" * 64,
    "sha512:" + "0" * 64,
]


@pytest.mark.parametrize("digest", BAD_DIGESTS)
async def test_bad_digests(client: TestClient, snapshot: set[str], digest: str) -> None:
    """Every place a digest appears refuses a malformed one with 400 DIGEST_INVALID."""
    from urllib.parse import quote

    q = quote(digest, safe=":")
    resp = await client.post("/v2/ok/blobs/uploads/")
    assert resp.status == 202
    location = resp.headers["Location"]
    requests = [
        ("GET", f"/v2/ok/blobs/{q}", None),
        ("HEAD", f"/v2/ok/blobs/{q}", None),
        ("DELETE", f"/v2/ok/blobs/{q}", None),
        ("GET", f"/v2/ok/manifests/{q}", None),
        ("DELETE", f"/v2/ok/manifests/{q}", None),
        ("PUT", f"/v2/ok/manifests/{q}", make_image().manifest),
        ("GET", f"/v2/ok/referrers/{q}", None),
        ("POST", f"/v2/ok/blobs/uploads/?digest={q}", b"payload"),
        ("POST", f"/v2/ok/blobs/uploads/?mount={q}&from=ok", None),
        ("PUT", f"{location}?digest={q}", b"payload"),
    ]
    for method, path, body in requests:
        resp = await client.request(method, path, data=body)
        if method == "HEAD":
            assert resp.status == 400, (path, resp.status)
        else:
            await assert_error(resp, 400, "DIGEST_INVALID")
    resp = await client.delete(location)
    assert resp.status == 204


async def test_sha512_digests_are_supported(client: TestClient) -> None:
    """A sha512 digest is valid: an unknown one is 404, a right one is stored."""
    import hashlib

    data = b"sha512 payload"
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    resp = await client.get(f"/v2/ok512/blobs/{digest}")
    await assert_error(resp, 404, "BLOB_UNKNOWN")
    resp = await client.post(f"/v2/ok512/blobs/uploads/?digest={digest}", data=data)
    assert resp.status == 201, await resp.text()
    resp = await client.get(f"/v2/ok512/blobs/{digest}")
    assert await resp.read() == data


BAD_RANGES = ["garbage", "bytes=abc", "0-", "-5", "10-5", "0-99999999999999999999", "1-0/*", ""]


async def test_bad_content_range(client: TestClient, config: Config) -> None:
    """Malformed or misplaced Content-Range is 416; the session is unharmed."""
    resp = await client.post("/v2/cr/blobs/uploads/")
    location = resp.headers["Location"]
    resp = await client.patch(location, data=b"12345", headers={"Content-Range": "0-4"})
    assert resp.status == 202
    for bad in BAD_RANGES:
        resp = await client.patch(location, data=b"678", headers={"Content-Range": bad})
        await assert_error(resp, 416, "BLOB_UPLOAD_INVALID")
        assert resp.headers["Range"] == "0-4"
    # a length that disagrees with the range is SIZE_INVALID, and nothing is appended
    resp = await client.patch(location, data=b"678", headers={"Content-Range": "5-9"})
    await assert_error(resp, 400, "SIZE_INVALID")
    resp = await client.get(location)
    assert resp.headers["Range"] == "0-4"
    resp = await client.put(
        f"{location}?digest={sha256(b'12345678')}",
        data=b"678",
        headers={"Content-Range": "5-7"},
    )
    assert resp.status == 201, await resp.text()


BAD_MANIFESTS: dict[str, tuple[bytes, str | None]] = {
    "not json": (b"this is not json", mf.OCI_MANIFEST),
    "truncated": (b'{"schemaVersion": 2, "config": {', mf.OCI_MANIFEST),
    "array": (b"[]", mf.OCI_MANIFEST),
    "string": (b'"manifest"', mf.OCI_MANIFEST),
    "empty object": (b"{}", mf.OCI_MANIFEST),
    "not utf-8": (b'{"schemaVersion": 2, "x": "\xff\xfe"}', mf.OCI_MANIFEST),
    "deeply nested": (b'{"schemaVersion": 2, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    "schema 1": (
        json.dumps(
            {"schemaVersion": 1, "name": "ok", "tag": "v1", "fsLayers": [], "history": []}
        ).encode(),
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    ),
    "schema 1 no type": (json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(), None),
    "schemaVersion as string": (
        json.dumps({"schemaVersion": "2", "config": CONFIG_DESC, "layers": []}).encode(),
        mf.OCI_MANIFEST,
    ),
    "content type mismatch": (
        _doc(mediaType=mf.OCI_MANIFEST, config=CONFIG_DESC, layers=[]),
        mf.DOCKER_MANIFEST,
    ),
    "index type on manifest": (
        _doc(mediaType=mf.OCI_MANIFEST, config=CONFIG_DESC, layers=[]),
        mf.OCI_INDEX,
    ),
    "unknown media type": (
        _doc(mediaType="application/vnd.example+json", config=CONFIG_DESC, layers=[]),
        None,
    ),
    "unknown content type": (_doc(config=CONFIG_DESC, layers=[]), "application/vnd.example"),
    "mediaType not a string": (_doc(mediaType=5, config=CONFIG_DESC, layers=[]), None),
    "no config": (_doc(mediaType=mf.OCI_MANIFEST, layers=[]), mf.OCI_MANIFEST),
    "config not an object": (_doc(mediaType=mf.OCI_MANIFEST, config="x"), mf.OCI_MANIFEST),
    "layers not a list": (
        _doc(mediaType=mf.OCI_MANIFEST, config=CONFIG_DESC, layers={}),
        mf.OCI_MANIFEST,
    ),
    "bad layer digest": (
        _doc(
            mediaType=mf.OCI_MANIFEST,
            config=CONFIG_DESC,
            layers=[{"mediaType": "x/y", "digest": "sha256:zz", "size": 1}],
        ),
        mf.OCI_MANIFEST,
    ),
    "negative size": (
        _doc(mediaType=mf.OCI_MANIFEST, config={**CONFIG_DESC, "size": -1}, layers=[]),
        mf.OCI_MANIFEST,
    ),
    "fractional size": (
        _doc(mediaType=mf.OCI_MANIFEST, config={**CONFIG_DESC, "size": 2.5}, layers=[]),
        mf.OCI_MANIFEST,
    ),
    "boolean size": (
        _doc(mediaType=mf.OCI_MANIFEST, config={**CONFIG_DESC, "size": True}, layers=[]),
        mf.OCI_MANIFEST,
    ),
    "descriptor without mediaType": (
        _doc(
            mediaType=mf.OCI_MANIFEST,
            config={"digest": CONFIG_DESC["digest"], "size": 2},
            layers=[],
        ),
        mf.OCI_MANIFEST,
    ),
    "index without manifests": (_doc(mediaType=mf.OCI_INDEX), mf.OCI_INDEX),
    "index manifests not a list": (_doc(mediaType=mf.OCI_INDEX, manifests="x"), mf.OCI_INDEX),
    "index entry not an object": (_doc(mediaType=mf.OCI_INDEX, manifests=[1]), mf.OCI_INDEX),
    "bad subject": (
        _doc(mediaType=mf.OCI_MANIFEST, config=CONFIG_DESC, layers=[], subject="x"),
        mf.OCI_MANIFEST,
    ),
    "artifactType not a string": (
        _doc(mediaType=mf.OCI_MANIFEST, config=CONFIG_DESC, layers=[], artifactType=1),
        mf.OCI_MANIFEST,
    ),
    "annotations not an object": (
        _doc(mediaType=mf.OCI_MANIFEST, config=CONFIG_DESC, layers=[], annotations="x"),
        mf.OCI_MANIFEST,
    ),
    "empty body": (b"", mf.OCI_MANIFEST),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
async def test_bad_manifests(client: TestClient, snapshot: set[str], case: str) -> None:
    """Invalid manifests are 400 MANIFEST_INVALID, by tag and by digest."""
    data, content_type = BAD_MANIFESTS[case]
    for reference in ("bad", sha256(data)):
        resp = await put_manifest(client, "ok", reference, data, content_type)
        await assert_error(resp, 400, "MANIFEST_INVALID")
    resp = await client.get("/v2/ok/manifests/bad")
    assert resp.status == 404


async def test_minimal_artifact_is_accepted(client: TestClient) -> None:
    """The valid counterpart of the cases above: empty config, no layers."""
    await push_blob(client, "fine", EMPTY_BYTES)
    data = _doc(mediaType=mf.OCI_MANIFEST, config=CONFIG_DESC, layers=[])
    resp = await put_manifest(client, "fine", "v1", data, mf.OCI_MANIFEST)
    assert resp.status == 201, await resp.text()


async def test_unknown_endpoints(client: TestClient) -> None:
    # "/" is the web page (tests/ui); everything else unknown is the API's JSON 404
    for path in ("/v1/", "/v3/", "/v2/ok/unknown", "/v2/ok/blobs", "/v2/ok/manifests/"):
        resp = await client.get(path)
        assert resp.status == 404, path
        assert resp.headers["Content-Type"].startswith("application/json"), path
        assert len(await error_codes(resp)) == 1


WRONG_METHODS = [
    ("POST", "/v2/"),
    ("PUT", "/v2/"),
    ("DELETE", "/v2/"),
    ("POST", "/v2/_catalog"),
    ("DELETE", "/v2/_catalog"),
    ("POST", "/v2/ok/tags/list"),
    ("PUT", "/v2/ok/tags/list"),
    ("POST", "/v2/ok/manifests/v1"),
    ("PATCH", "/v2/ok/manifests/v1"),
    ("POST", f"/v2/ok/blobs/{DIGEST}"),
    ("PUT", f"/v2/ok/blobs/{DIGEST}"),
    ("PATCH", f"/v2/ok/blobs/{DIGEST}"),
    ("PUT", "/v2/ok/blobs/uploads/"),
    ("GET", "/v2/ok/blobs/uploads/"),
    ("DELETE", "/v2/ok/blobs/uploads/"),
    ("POST", f"/v2/ok/blobs/uploads/{'0' * 32}"),
    ("HEAD", f"/v2/ok/blobs/uploads/{'0' * 32}"),
    ("POST", f"/v2/ok/referrers/{DIGEST}"),
    ("DELETE", f"/v2/ok/referrers/{DIGEST}"),
]


@pytest.mark.parametrize(("method", "path"), WRONG_METHODS)
async def test_wrong_methods(
    client: TestClient, snapshot: set[str], method: str, path: str
) -> None:
    resp = await client.request(method, path, data=b"{}")
    await assert_error(resp, 405, "UNSUPPORTED")


async def test_oversized_request_line(client: TestClient) -> None:
    """A URL beyond the parser's limits is 400 from aiohttp's parser, not a crash."""
    resp = await _raw(client, f"GET /v2/{'a/' * 5000}x/tags/list HTTP/1.1")
    assert resp.status == 400, resp.body[:200]
    resp = await client.get("/v2/")
    assert resp.status == 200


async def test_odd_pagination_numbers(client: TestClient) -> None:
    """Non-ASCII digits are 400; huge numbers are capped; neither crashes the listing."""
    await push_blob(client, "nums", b"x")
    for path in ("/v2/_catalog", "/v2/nums/tags/list"):
        for n in ("%C2%B2", "%D9%A3", "%EF%BC%91"):
            resp = await client.get(f"{path}?n={n}")
            await assert_error(resp, 400, "PAGINATION_NUMBER_INVALID")
        for n in ("99999999999999999999999999", "9" * 5000):
            resp = await client.get(f"{path}?n={n}")
            assert resp.status == 200, await resp.text()
            assert "Link" not in resp.headers


async def test_garbage_headers_on_manifest_get(client: TestClient, snapshot: set[str]) -> None:
    """A garbled Accept still gets the manifest; a garbled Range on a blob is 416.

    416 names the blob's length (`Content-Range: bytes */<size>`, RFC 9110 15.5.17), so a
    client that sent a bad resume offset can start over.
    """
    resp = await client.get(
        "/v2/ok/manifests/v1", headers={"Accept": "garbage;;;q=abc, */*;q=x, \xff"}
    )
    assert resp.status == 200
    resp = await client.get(
        f"/v2/ok/blobs/{sha256(EMPTY_BYTES)}", headers={"Range": "bytes=garbage"}
    )
    assert resp.status == 416, await resp.text()
    assert resp.headers["Content-Range"] == f"bytes */{len(EMPTY_BYTES)}"


@pytest.mark.parametrize(
    "name", ["p", "p/docker.io", "p/unconfigured.example/lib/x", "p/docker.io/library/alpine"]
)
async def test_proxy_names_without_upstream(client: TestClient, name: str) -> None:
    """Reads under the proxy prefix that name no configured upstream image are NAME_UNKNOWN.

    The test configuration has no upstreams at all, so nothing is ever dialled.
    """
    for path in (
        f"/v2/{name}/tags/list",
        f"/v2/{name}/manifests/latest",
        f"/v2/{name}/blobs/{DIGEST}",
        f"/v2/{name}/referrers/{DIGEST}",
    ):
        for method in ("GET", "HEAD"):
            resp = await client.request(method, path)
            await assert_error(resp, 404, "NAME_UNKNOWN")
