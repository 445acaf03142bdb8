"""Push: upload sessions (chunked, streamed, monolithic, mount), manifests, the proxy prefix."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

from aiohttp.test_utils import TestClient

from regproxy import manifest as mf
from regproxy.config import Config
from tests.support.digests import sha256
from tests.support.oci import (
    assert_error,
    descriptor,
    list_referrers,
    make_artifact,
    make_image,
    make_index,
    push_blob,
    push_blob_chunked,
    push_image,
    put_manifest,
    stored_files,
)


async def _start(client: TestClient, name: str) -> str:
    """POST a new session; check its answer; return its Location."""
    resp = await client.post(f"/v2/{name}/blobs/uploads/")
    assert resp.status == 202, await resp.text()
    location = resp.headers["Location"]
    assert location.startswith(f"/v2/{name}/blobs/uploads/")
    assert resp.headers["Docker-Upload-UUID"] in location
    assert resp.headers["Range"] == "0-0"
    assert resp.headers["Content-Length"] == "0"
    return location


async def _blob(client: TestClient, name: str, digest: str) -> bytes | None:
    resp = await client.get(f"/v2/{name}/blobs/{digest}")
    if resp.status == 404:
        return None
    assert resp.status == 200
    return await resp.read()


async def test_chunked_upload_with_content_range(client: TestClient) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    digest = await push_blob_chunked(client, "chunky", data, 1024 * 1024)
    assert await _blob(client, "chunky", digest) == data


async def test_patch_progress_and_status(client: TestClient) -> None:
    """Every PATCH answers 202 with Location and Range; GET on the session 204 + Range."""
    data = os.urandom(5000)
    location = await _start(client, "status")
    resp = await client.get(location)
    assert resp.status == 204
    assert resp.headers["Range"] == "0-0"
    resp = await client.patch(location, data=data[:1000], headers={"Content-Range": "0-999"})
    assert resp.status == 202
    assert resp.headers["Range"] == "0-999"
    assert resp.headers["Content-Length"] == "0"
    location = resp.headers["Location"]
    resp = await client.get(location)
    assert resp.status == 204
    assert resp.headers["Range"] == "0-999"
    assert resp.headers["Docker-Upload-UUID"] in location
    resp = await client.patch(location, data=data[1000:], headers={"Content-Range": "1000-4999"})
    assert resp.status == 202
    assert resp.headers["Range"] == "0-4999"
    resp = await client.put(f"{resp.headers['Location']}?digest={sha256(data)}")
    assert resp.status == 201
    assert resp.headers["Docker-Content-Digest"] == sha256(data)
    assert resp.headers["Location"] == f"/v2/status/blobs/{sha256(data)}"
    assert await _blob(client, "status", sha256(data)) == data


async def test_streamed_patch_without_content_range(client: TestClient) -> None:
    """A PATCH with a chunked (streamed) body and no Content-Range appends it all."""
    data = os.urandom(4 * 1024 * 1024 + 3)

    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 65536):
            yield data[start : start + 65536]

    location = await _start(client, "stream")
    resp = await client.patch(location, data=body())
    assert resp.status == 202, await resp.text()
    assert resp.headers["Range"] == f"0-{len(data) - 1}"
    resp = await client.put(f"{resp.headers['Location']}?digest={sha256(data)}")
    assert resp.status == 201
    assert await _blob(client, "stream", sha256(data)) == data


async def test_put_with_final_chunk(client: TestClient) -> None:
    data = os.urandom(3000)
    location = await _start(client, "final")
    resp = await client.patch(location, data=data[:1000])
    assert resp.status == 202
    resp = await client.put(
        f"{resp.headers['Location']}?digest={sha256(data)}",
        data=data[1000:],
        headers={"Content-Range": "1000-2999"},
    )
    assert resp.status == 201, await resp.text()
    assert await _blob(client, "final", sha256(data)) == data


async def test_put_whole_body_single_request(client: TestClient) -> None:
    """POST then one PUT carrying the whole blob (no PATCH at all)."""
    data = os.urandom(2048)
    location = await _start(client, "onestep")
    resp = await client.put(f"{location}?digest={sha256(data)}", data=data)
    assert resp.status == 201, await resp.text()
    assert await _blob(client, "onestep", sha256(data)) == data


async def test_empty_blob(client: TestClient) -> None:
    digest = await push_blob(client, "empty", b"")
    assert digest == sha256(b"")
    assert await _blob(client, "empty", digest) == b""


async def test_monolithic_post(client: TestClient, config: Config) -> None:
    data = os.urandom(70_000)
    resp = await client.post(f"/v2/mono/blobs/uploads/?digest={sha256(data)}", data=data)
    assert resp.status == 201
    assert resp.headers["Location"] == f"/v2/mono/blobs/{sha256(data)}"
    assert resp.headers["Docker-Content-Digest"] == sha256(data)
    assert await _blob(client, "mono", sha256(data)) == data
    assert not any(f.startswith("tmp/uploads/") for f in stored_files(config))


async def test_push_same_blob_twice(client: TestClient) -> None:
    """Pushing an existing blob again (same or other repo) succeeds and links it."""
    data = os.urandom(1000)
    await push_blob(client, "twice/a", data)
    await push_blob(client, "twice/a", data)
    await push_blob(client, "twice/b", data)
    assert await _blob(client, "twice/b", sha256(data)) == data


async def test_mount(client: TestClient) -> None:
    data = os.urandom(1000)
    digest = await push_blob(client, "src/repo", data)
    resp = await client.post(f"/v2/dst/repo/blobs/uploads/?mount={digest}&from=src/repo")
    assert resp.status == 201
    assert resp.headers["Location"] == f"/v2/dst/repo/blobs/{digest}"
    assert resp.headers["Docker-Content-Digest"] == digest
    assert await _blob(client, "dst/repo", digest) == data


async def test_mount_fallback_never_leaks(client: TestClient) -> None:
    """A mount the source cannot satisfy opens a normal session (202) and leaks nothing."""
    data = os.urandom(1000)
    digest = await push_blob(client, "holder", data)
    for source in ("nobody", "HOLDER", "../holder", "holder/..", "_x", "p/docker.io/holder"):
        resp = await client.post(f"/v2/thief/blobs/uploads/?mount={digest}&from={source}")
        assert resp.status == 202, (source, await resp.text())
        assert "/v2/thief/blobs/uploads/" in resp.headers["Location"]
        assert await _blob(client, "thief", digest) is None
    # without `from` it is a plain session too
    resp = await client.post(f"/v2/thief/blobs/uploads/?mount={digest}")
    assert resp.status == 202
    assert await _blob(client, "thief", digest) is None
    # the fallback session is usable
    resp = await client.put(f"{resp.headers['Location']}?digest={digest}", data=data)
    assert resp.status == 201
    assert await _blob(client, "thief", digest) == data


async def test_patch_wrong_start_then_resume(client: TestClient) -> None:
    """A chunk not starting at the offset is 416 with the Range; the session goes on."""
    data = os.urandom(3000)
    location = await _start(client, "resume")
    resp = await client.patch(location, data=data[:1000], headers={"Content-Range": "0-999"})
    assert resp.status == 202
    location = resp.headers["Location"]
    for bad in ("500-1499", "1001-2000", "0-999"):
        resp = await client.patch(location, data=data[1000:2000], headers={"Content-Range": bad})
        await assert_error(resp, 416, "BLOB_UPLOAD_INVALID")
        assert resp.headers["Range"] == "0-999"
        assert resp.headers["Location"] == location
    resp = await client.get(location)
    assert resp.headers["Range"] == "0-999"
    resp = await client.patch(location, data=data[1000:], headers={"Content-Range": "1000-2999"})
    assert resp.status == 202
    resp = await client.put(f"{location}?digest={sha256(data)}")
    assert resp.status == 201
    assert await _blob(client, "resume", sha256(data)) == data


async def test_wrong_digest_nothing_visible(client: TestClient, config: Config) -> None:
    data = os.urandom(4000)
    wrong = sha256(b"something else")
    before = stored_files(config)
    resp = await client.post(f"/v2/wrong/blobs/uploads/?digest={wrong}", data=data)
    await assert_error(resp, 400, "DIGEST_INVALID")
    location = await _start(client, "wrong")
    resp = await client.patch(location, data=data)
    assert resp.status == 202
    resp = await client.put(f"{location}?digest={wrong}")
    await assert_error(resp, 400, "DIGEST_INVALID")
    for digest in (wrong, sha256(data)):
        assert await _blob(client, "wrong", digest) is None
    # the failed session is gone, and nothing else was left behind
    resp = await client.get(location)
    await assert_error(resp, 404, "BLOB_UPLOAD_UNKNOWN")
    assert stored_files(config) == before


async def test_put_without_digest(client: TestClient) -> None:
    location = await _start(client, "nodigest")
    resp = await client.put(location, data=b"abc")
    await assert_error(resp, 400, "DIGEST_INVALID")


async def test_upload_of_other_repository_is_unknown(client: TestClient) -> None:
    location = await _start(client, "mine")
    upload_id = location.rsplit("/", 1)[1]
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        resp = await client.request(method, f"/v2/yours/blobs/uploads/{upload_id}")
        await assert_error(resp, 404, "BLOB_UPLOAD_UNKNOWN")
    resp = await client.get(location)
    assert resp.status == 204


async def test_manifest_put_headers(client: TestClient) -> None:
    image = make_image()
    for blob in image.blobs:
        await push_blob(client, "mput", blob)
    resp = await put_manifest(client, "mput", "v1", image.manifest, image.media_type)
    assert resp.status == 201
    assert resp.headers["Docker-Content-Digest"] == image.digest
    assert resp.headers["Location"] == f"/v2/mput/manifests/{image.digest}"
    assert "OCI-Subject" not in resp.headers


async def test_manifest_put_by_digest(client: TestClient) -> None:
    image = make_image()
    await push_image(client, "bydigest", image, image.digest)
    resp = await client.get("/v2/bydigest/tags/list")
    assert (await resp.json())["tags"] == []
    other = make_image()
    for blob in other.blobs:
        await push_blob(client, "bydigest", blob)
    resp = await put_manifest(client, "bydigest", image.digest, other.manifest, mf.OCI_MANIFEST)
    await assert_error(resp, 400, "DIGEST_INVALID")
    resp = await client.get(f"/v2/bydigest/manifests/{other.digest}")
    assert resp.status == 404


async def test_manifest_put_without_content_type(client: TestClient) -> None:
    """Without a Content-Type the manifest's own mediaType decides what is served."""
    image = make_image()
    for blob in image.blobs:
        await push_blob(client, "notype", blob)
    resp = await put_manifest(client, "notype", "v1", image.manifest, None)
    assert resp.status == 201, await resp.text()
    resp = await client.get("/v2/notype/manifests/v1")
    assert resp.headers["Content-Type"] == mf.OCI_MANIFEST


async def test_manifest_missing_blob(client: TestClient, config: Config) -> None:
    """Every referenced blob must be in the repository; else nothing is stored."""
    image = make_image(layer_sizes=(100, 200))
    await push_blob(client, "missing", image.config)
    await push_blob(client, "missing", image.layers[0])
    await push_blob(client, "elsewhere", image.layers[1])  # not in this repository
    before = stored_files(config)
    resp = await put_manifest(client, "missing", "v1", image.manifest, image.media_type)
    await assert_error(resp, 400, "MANIFEST_BLOB_UNKNOWN")
    assert sha256(image.layers[1]) in json.dumps((await resp.json())["errors"][0]["detail"])
    assert stored_files(config) == before
    resp = await client.get("/v2/missing/manifests/v1")
    assert resp.status == 404
    resp = await client.get(f"/v2/missing/manifests/{image.digest}")
    assert resp.status == 404


async def test_index_missing_child(client: TestClient, config: Config) -> None:
    present, absent = make_image(), make_image()
    await push_image(client, "idx", present, "present")
    data, _ = make_index([present, absent])
    before = stored_files(config)
    resp = await put_manifest(client, "idx", "all", data, mf.OCI_INDEX)
    await assert_error(resp, 400, "MANIFEST_BLOB_UNKNOWN")
    assert stored_files(config) == before
    # a child of another repository does not count either
    await push_image(client, "other", absent, "x")
    resp = await put_manifest(client, "idx", "all", data, mf.OCI_INDEX)
    await assert_error(resp, 400, "MANIFEST_BLOB_UNKNOWN")
    await push_image(client, "idx", absent, absent.digest)
    resp = await put_manifest(client, "idx", "all", data, mf.OCI_INDEX)
    assert resp.status == 201


async def test_manifest_too_large(client: TestClient, config: Config) -> None:
    """A manifest over 4 MiB is 413, with or without a Content-Length; nothing is stored."""
    image = make_image()
    for blob in image.blobs:
        await push_blob(client, "huge", blob)
    doc = json.loads(image.manifest)
    doc["annotations"] = {"pad": "x" * (4 * 1024 * 1024)}
    data = json.dumps(doc).encode()
    before = stored_files(config)
    resp = await put_manifest(client, "huge", "v1", data, mf.OCI_MANIFEST)
    assert resp.status == 413

    async def streamed() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 65536):
            yield data[start : start + 65536]

    resp = await client.put(
        "/v2/huge/manifests/v1", data=streamed(), headers={"Content-Type": mf.OCI_MANIFEST}
    )
    assert resp.status == 413
    assert stored_files(config) == before


async def test_manifest_just_under_limit(client: TestClient) -> None:
    """A manifest of almost 4 MiB is accepted (parsed off the event loop)."""
    image = make_image()
    for blob in image.blobs:
        await push_blob(client, "bigman", blob)
    doc = json.loads(image.manifest)
    doc["annotations"] = {"pad": "x" * (4 * 1024 * 1024 - len(image.manifest) - 100)}
    data = json.dumps(doc).encode()
    assert len(data) <= mf.MAX_MANIFEST_SIZE
    resp = await put_manifest(client, "bigman", "v1", data, mf.OCI_MANIFEST)
    assert resp.status == 201, await resp.text()
    resp = await client.get("/v2/bigman/manifests/v1")
    assert await resp.read() == data


async def test_oci_subject_header(client: TestClient) -> None:
    subject = make_image()
    await push_image(client, "subj", subject, "v1")
    artifact = make_artifact("application/vnd.example.sig", subject=subject)
    for blob in artifact.blobs:
        await push_blob(client, "subj", blob)
    resp = await put_manifest(client, "subj", artifact.digest, artifact.manifest, mf.OCI_MANIFEST)
    assert resp.status == 201
    assert resp.headers["OCI-Subject"] == subject.digest


async def test_subject_need_not_exist(client: TestClient) -> None:
    """The spec lets a referrer be pushed before its subject, and lists it at once."""
    ghost = make_image()
    artifact = make_artifact("application/vnd.example.sig", subject=ghost)
    await push_image(client, "ghost", artifact, artifact.digest)
    resp = await client.get(f"/v2/ghost/manifests/{ghost.digest}")
    await assert_error(resp, 404, "MANIFEST_UNKNOWN")
    body = await list_referrers(client, "ghost", ghost.digest)
    assert body["manifests"] == [
        {
            "mediaType": mf.OCI_MANIFEST,
            "digest": artifact.digest,
            "size": len(artifact.manifest),
            "artifactType": "application/vnd.example.sig",
        }
    ]


async def test_retag(client: TestClient) -> None:
    """PUT of another manifest under an existing tag moves the tag."""
    first, second = make_image(), make_image()
    await push_image(client, "retag", first, "latest")
    await push_image(client, "retag", second, "latest")
    resp = await client.get("/v2/retag/manifests/latest")
    assert resp.headers["Docker-Content-Digest"] == second.digest
    resp = await client.get(f"/v2/retag/manifests/{first.digest}")
    assert resp.status == 200


async def test_same_manifest_bytes_differ_by_whitespace(client: TestClient) -> None:
    """Exact bytes are kept: re-serialised JSON is another digest."""
    image = make_image()
    await push_image(client, "bytes", image, "a")
    pretty = json.dumps(json.loads(image.manifest), indent=2).encode()
    resp = await put_manifest(client, "bytes", "b", pretty, mf.OCI_MANIFEST)
    assert resp.status == 201
    assert resp.headers["Docker-Content-Digest"] == sha256(pretty)
    resp = await client.get("/v2/bytes/manifests/b")
    assert await resp.read() == pretty


async def test_foreign_layers_not_required(client: TestClient) -> None:
    """Non-distributable layers need not be pushed."""
    config_bytes = b'{"os":"windows"}'
    foreign = os.urandom(10)
    doc = {
        "schemaVersion": 2,
        "mediaType": mf.DOCKER_MANIFEST,
        "config": descriptor("application/vnd.docker.container.image.v1+json", config_bytes),
        "layers": [
            descriptor(
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                foreign,
                urls=["https://example.invalid/layer"],
            )
        ],
    }
    await push_blob(client, "win", config_bytes)
    resp = await put_manifest(client, "win", "v1", json.dumps(doc).encode(), mf.DOCKER_MANIFEST)
    assert resp.status == 201, await resp.text()


async def test_proxy_prefix_is_read_only(client: TestClient, config: Config) -> None:
    """Uploads, manifest pushes and deletes under `p/…` are DENIED and store nothing."""
    data = os.urandom(100)
    digest = sha256(data)
    image = make_image()
    upload = "/v2/p/docker.io/library/x/blobs/uploads/"
    session = "/v2/p/docker.io/library/x/blobs/uploads/" + "0" * 32
    before = stored_files(config)
    requests: list[tuple[str, str, bytes | None]] = [
        ("POST", upload, None),
        ("POST", f"{upload}?digest={digest}", data),
        ("POST", f"{upload}?mount={digest}&from=anything", None),
        ("POST", "/v2/p/blobs/uploads/", None),
        ("PATCH", session, data),
        ("PUT", f"{session}?digest={digest}", data),
        ("GET", session, None),
        ("DELETE", session, None),
        ("PUT", "/v2/p/docker.io/library/x/manifests/v1", image.manifest),
        ("DELETE", "/v2/p/docker.io/library/x/manifests/v1", None),
        ("DELETE", f"/v2/p/docker.io/library/x/manifests/{image.digest}", None),
        ("DELETE", f"/v2/p/docker.io/library/x/blobs/{digest}", None),
    ]
    for method, path, body in requests:
        resp = await client.request(
            method, path, data=body, headers={"Content-Type": mf.OCI_MANIFEST}
        )
        await assert_error(resp, 403, "DENIED")
    assert stored_files(config) == before
    # a name merely starting with the prefix letter is an ordinary repository
    await push_blob(client, "pizza", data)
