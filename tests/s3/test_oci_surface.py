"""The whole OCI distribution surface with both stores on S3, answered exactly as on disk.

One scripted session of requests (every way to push a blob, every Range shape, mounts,
manifests by tag and digest, an index, tags and catalog pages, referrers, deletes and
the errors around them) runs against a filesystem-backed app and an S3-backed app with
the same bytes. Each step checks its own expectations, and the two recordings (status,
the headers that carry meaning, body) must be identical, upload ids aside.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from regproxy import manifest as mf
from tests.support.digests import sha256
from tests.support.inprocess import make_config, start_client
from tests.support.oci import (
    EMPTY_BYTES,
    EMPTY_CONFIG,
    OCI_CONFIG,
    OCI_LAYER,
    descriptor,
)
from tests.support.s3store import blob_key, bucket_keys, s3_config
from tests.support.seaweed import SeaweedS3

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
#: headers whose values are part of the API (Date, Server and the like are not)
COMPARED = (
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Docker-Content-Digest",
    "ETag",
    "Accept-Ranges",
    "Range",
    "Location",
    "Link",
    "OCI-Subject",
    "OCI-Filters-Applied",
    "Docker-Upload-UUID",
    "Blob-Upload-Session-ID",
)
#: an upload session id (32 hex digits, never part of a 64-digit sha256)
_UPLOAD_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")
_UPLOAD_BYTES = re.compile(_UPLOAD_ID.pattern.encode())


@dataclass
class Step:
    what: str
    method: str
    path: str
    status: int
    headers: dict[str, str]
    body: bytes
    #: the Location as sent (upload ids and all), not compared
    location: str | None = None


@dataclass
class Session:
    """Sends requests, checks each one's status, and records what came back."""

    client: TestClient
    steps: list[Step] = field(default_factory=list)

    async def __call__(
        self,
        what: str,
        method: str,
        path: str,
        expect: int,
        *,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Step:
        async with self.client.request(
            method, path, data=data, headers=headers, allow_redirects=False
        ) as resp:
            body = await resp.read()
            kept = {
                name: _UPLOAD_ID.sub("<id>", resp.headers[name])
                for name in COMPARED
                if name in resp.headers
            }
        is_json = resp.headers.get("Content-Type", "").startswith("application/json")
        body_seen = _UPLOAD_BYTES.sub(b"<id>", body) if is_json else body
        location = resp.headers.get("Location")
        step = Step(what, method, path, resp.status, kept, body_seen, location)
        assert resp.status == expect, f"{what}: {method} {path} → {resp.status} {body[:300]!r}"
        self.steps.append(step)
        return step

    async def upload_url(self, name: str) -> str:
        async with self.client.post(f"/v2/{name}/blobs/uploads/") as resp:
            assert resp.status == 202, await resp.text()
            return resp.headers["Location"]


def error_code(step: Step) -> str:
    return json.loads(step.body)["errors"][0]["code"]


async def _stream(data: bytes, piece: int) -> AsyncIterator[bytes]:
    """A body without Content-Length: aiohttp sends it with chunked transfer encoding."""
    for start in range(0, len(data), piece):
        yield data[start : start + piece]


def _image(config: bytes, layers: list[bytes], **extra: Any) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": [descriptor(OCI_LAYER, layer) for layer in layers],
        **extra,
    }
    return json.dumps(doc).encode()


def _artifact(artifact_type: str, payload: bytes, subject: bytes) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": descriptor(EMPTY_CONFIG, EMPTY_BYTES),
        "layers": [descriptor("application/octet-stream", payload)],
        "subject": descriptor(mf.OCI_MANIFEST, subject),
    }
    return json.dumps(doc).encode()


@dataclass
class Content:
    """The bytes both runs push (random once, shared by the two apps)."""

    a: bytes = field(default_factory=lambda: os.urandom(12_345))
    b: bytes = field(default_factory=lambda: os.urandom(70_001))
    c: bytes = field(default_factory=lambda: os.urandom(2 * MiB + 333))
    d: bytes = field(default_factory=lambda: os.urandom(300_007))
    e: bytes = field(default_factory=lambda: os.urandom(150_001))
    small: bytes = field(default_factory=lambda: os.urandom(77))
    cfg1: bytes = field(default_factory=lambda: json.dumps({"os": "linux", "n": 1}).encode())
    cfg2: bytes = field(default_factory=lambda: json.dumps({"os": "linux", "n": 2}).encode())
    cfg3: bytes = field(default_factory=lambda: json.dumps({"os": "linux", "n": 3}).encode())
    sig: bytes = field(default_factory=lambda: os.urandom(64))
    sbom: bytes = field(default_factory=lambda: os.urandom(99))
    never_pushed: bytes = field(default_factory=lambda: os.urandom(10))

    @property
    def image1(self) -> bytes:
        return _image(self.cfg1, [self.c, self.d])

    @property
    def image2(self) -> bytes:
        return _image(self.cfg2, [self.a, self.b])

    @property
    def image3(self) -> bytes:
        return _image(self.cfg3, [self.e])

    @property
    def index(self) -> bytes:
        doc = {
            "schemaVersion": 2,
            "mediaType": mf.OCI_INDEX,
            "manifests": [
                {**descriptor(mf.OCI_MANIFEST, m), "platform": {"os": "linux", "architecture": a}}
                for m, a in ((self.image1, "amd64"), (self.image2, "arm64"))
            ],
        }
        return json.dumps(doc).encode()

    @property
    def signature(self) -> bytes:
        return _artifact("application/vnd.example.sig", self.sig, self.image1)

    @property
    def sbom_artifact(self) -> bytes:
        return _artifact("application/spdx+json", self.sbom, self.image1)


async def push_blobs(s: Session, c: Content) -> None:
    """Every way to push a blob."""
    app = "team/app"
    await s("version check", "GET", "/v2/", 200)

    # monolithic POST ?digest=
    await s("monolithic", "POST", f"/v2/{app}/blobs/uploads/?digest={sha256(c.a)}", 201, data=c.a)

    # POST, then PUT ?digest= with the whole body
    url = await s.upload_url(app)
    await s("put whole", "PUT", f"{url}?digest={sha256(c.b)}", 201, data=c.b)

    # chunked PATCHes of odd sizes with Content-Range, a wrong range, status in between
    url = await s.upload_url(app)
    pos = 0
    for size in (1, 7):
        piece = c.c[pos : pos + size]
        step = await s(
            f"patch {size}",
            "PATCH",
            url,
            202,
            data=piece,
            headers={"Content-Range": f"{pos}-{pos + size - 1}"},
        )
        pos += size
        assert step.location == url
    bad = await s(
        "patch out of order",
        "PATCH",
        url,
        416,
        data=b"x" * 100,
        headers={"Content-Range": "100-199"},
    )
    assert bad.headers["Range"] == "0-7", bad.headers
    status = await s("upload status", "GET", url, 204)
    assert status.headers["Range"] == "0-7"
    for size in (65_537, MiB + 3):
        piece = c.c[pos : pos + size]
        await s(
            f"patch {size}",
            "PATCH",
            url,
            202,
            data=piece,
            headers={"Content-Range": f"{pos}-{pos + size - 1}"},
        )
        pos += size
    rest = c.c[pos:]
    await s(
        "put with the last chunk",
        "PUT",
        f"{url}?digest={sha256(c.c)}",
        201,
        data=rest,
        headers={"Content-Range": f"{pos}-{len(c.c) - 1}"},
    )

    # streamed PATCH (chunked transfer encoding, no Content-Range), then an empty PUT
    url = await s.upload_url(app)
    await s("streamed patch", "PATCH", url, 202, data=_stream(c.d, 4093))
    await s("streamed status", "GET", url, 204)
    await s("put after stream", "PUT", f"{url}?digest={sha256(c.d)}", 201)

    # streamed monolithic POST
    await s(
        "streamed monolithic",
        "POST",
        f"/v2/{app}/blobs/uploads/?digest={sha256(c.e)}",
        201,
        data=_stream(c.e, 8191),
    )

    # an empty blob, and the same bytes pushed twice (the second commit finds the first)
    empty = sha256(b"")
    await s("empty blob", "POST", f"/v2/{app}/blobs/uploads/?digest={empty}", 201, data=b"")
    await s(
        "same blob again", "POST", f"/v2/{app}/blobs/uploads/?digest={sha256(c.a)}", 201, data=c.a
    )

    # a wrong digest: refused, nothing stored
    url = await s.upload_url(app)
    wrong = await s("wrong digest", "PUT", f"{url}?digest={sha256(b'other')}", 400, data=c.small)
    assert error_code(wrong) == "DIGEST_INVALID"
    await s("wrong digest stored nothing", "HEAD", f"/v2/{app}/blobs/{sha256(c.small)}", 404)
    gone = await s("session gone after a wrong digest", "PATCH", url, 404, data=b"x")
    assert error_code(gone) == "BLOB_UPLOAD_UNKNOWN"
    await s("cancel unknown", "DELETE", url, 404)

    # a cancelled session
    url = await s.upload_url(app)
    await s("patch then cancel", "PATCH", url, 202, data=c.small)
    await s("cancel", "DELETE", url, 204)
    await s("cancelled", "GET", url, 404)

    for name in ("cfg1", "cfg2", "cfg3", "sig", "sbom"):
        data = getattr(c, name)
        await s(
            f"push {name}",
            "POST",
            f"/v2/{app}/blobs/uploads/?digest={sha256(data)}",
            201,
            data=data,
        )
    await s(
        "push {}",
        "POST",
        f"/v2/{app}/blobs/uploads/?digest={sha256(EMPTY_BYTES)}",
        201,
        data=EMPTY_BYTES,
    )

    # cross-repository mount, and the fallbacks to a normal upload
    other = "team/other"
    mounted = await s(
        "mount", "POST", f"/v2/{other}/blobs/uploads/?mount={sha256(c.a)}&from={app}", 201
    )
    assert mounted.headers["Location"] == f"/v2/{other}/blobs/{sha256(c.a)}"
    await s("mounted blob", "HEAD", f"/v2/{other}/blobs/{sha256(c.a)}", 200)
    unknown = sha256(b"never pushed")
    fallback = await s(
        "mount unknown", "POST", f"/v2/{other}/blobs/uploads/?mount={unknown}&from={app}", 202
    )
    assert fallback.location is not None
    await s("cancel fallback", "DELETE", fallback.location, 204)
    foreign = await s(
        "mount from a repo without it",
        "POST",
        f"/v2/{other}/blobs/uploads/?mount={sha256(c.b)}&from=nobody/here",
        202,
    )
    assert foreign.location is not None
    assert foreign.location.startswith(f"/v2/{other}/blobs/uploads/")
    await s("cancel the other fallback", "DELETE", foreign.location, 204)
    await s("not linked", "HEAD", f"/v2/{other}/blobs/{sha256(c.b)}", 404)


async def pull_blobs(s: Session, c: Content) -> None:
    """HEAD, GET and every shape of Range."""
    app = "team/app"
    for name in ("a", "b", "c", "d", "e"):
        data = getattr(c, name)
        head = await s(f"head {name}", "HEAD", f"/v2/{app}/blobs/{sha256(data)}", 200)
        assert head.headers["Content-Length"] == str(len(data))
        assert head.headers["Docker-Content-Digest"] == sha256(data)
        got = await s(f"get {name}", "GET", f"/v2/{app}/blobs/{sha256(data)}", 200)
        assert got.body == data
    empty = f"/v2/{app}/blobs/{sha256(b'')}"
    head = await s("head empty", "HEAD", empty, 200)
    assert head.headers["Content-Length"] == "0"
    got = await s("get empty", "GET", empty, 200)
    assert got.body == b""
    await s("range of empty", "GET", empty, 416, headers={"Range": "bytes=0-0"})
    url = f"/v2/{app}/blobs/{sha256(c.c)}"
    size = len(c.c)
    digest = sha256(c.c)
    ranges: list[tuple[str, int, bytes | None]] = [
        ("bytes=0-0", 206, c.c[:1]),
        ("bytes=10-19", 206, c.c[10:20]),
        ("bytes=-5", 206, c.c[-5:]),
        (f"bytes={size - 100}-", 206, c.c[-100:]),
        (f"bytes={MiB - 3}-{MiB + 2}", 206, c.c[MiB - 3 : MiB + 3]),  # across a relay chunk
        ("bytes=0-99999999", 206, c.c),  # clipped at the end
        (f"bytes=-{size + 10}", 206, c.c),  # a suffix longer than the blob
        (f"bytes={size}-", 416, None),
        ("bytes=5-2", 416, None),
        ("bytes=-0", 416, None),
        ("bytes=abc", 416, None),
        ("bytes=0-1,5-6", 200, c.c),  # a list of ranges: the whole blob
        ("items=0-1", 200, c.c),  # another unit: ignored
    ]
    for header, status, body in ranges:
        got = await s(f"range {header}", "GET", url, status, headers={"Range": header})
        if body is not None:
            assert got.body == body, header
        if status == 416:
            assert got.headers["Content-Range"] == f"bytes */{size}"
    got = await s(
        "if-range other", "GET", url, 200, headers={"Range": "bytes=0-9", "If-Range": '"x"'}
    )
    assert got.body == c.c
    got = await s(
        "if-range same", "GET", url, 206, headers={"Range": "bytes=0-9", "If-Range": f'"{digest}"'}
    )
    assert got.body == c.c[:10]
    await s("if-none-match", "GET", url, 304, headers={"If-None-Match": f'"{digest}"'})
    await s("if-match other", "GET", url, 412, headers={"If-Match": '"sha256:00"'})
    await s("head with range", "HEAD", url, 200, headers={"Range": "bytes=0-9"})
    got = await s(
        "range small",
        "GET",
        f"/v2/{app}/blobs/{sha256(c.a)}",
        206,
        headers={"Range": "bytes=100-200"},
    )
    assert got.body == c.a[100:201]
    missing = await s("unknown blob", "GET", f"/v2/{app}/blobs/{sha256(b'nope')}", 404)
    assert error_code(missing) == "BLOB_UNKNOWN"
    await s("blob of another repo", "GET", f"/v2/alpha/blobs/{sha256(c.a)}", 404)
    bad = await s("bad digest", "GET", f"/v2/{app}/blobs/sha256:xyz", 400)
    assert error_code(bad) == "DIGEST_INVALID"


async def manifests(s: Session, c: Content) -> None:
    """Manifests by tag and by digest, an index with children, referrers."""
    app = "team/app"
    oci = {"Content-Type": mf.OCI_MANIFEST}
    put = await s("put by tag", "PUT", f"/v2/{app}/manifests/v1", 201, data=c.image1, headers=oci)
    assert put.headers["Docker-Content-Digest"] == sha256(c.image1)
    await s("put second tag", "PUT", f"/v2/{app}/manifests/latest", 201, data=c.image1, headers=oci)
    await s(
        "put by digest",
        "PUT",
        f"/v2/{app}/manifests/{sha256(c.image2)}",
        201,
        data=c.image2,
        headers=oci,
    )
    await s("put image3", "PUT", f"/v2/{app}/manifests/three", 201, data=c.image3, headers=oci)
    got = await s("get by tag", "GET", f"/v2/{app}/manifests/v1", 200)
    assert got.body == c.image1 and got.headers["Content-Type"] == mf.OCI_MANIFEST
    got = await s("get by digest", "GET", f"/v2/{app}/manifests/{sha256(c.image2)}", 200)
    assert got.body == c.image2
    head = await s("head by tag", "HEAD", f"/v2/{app}/manifests/latest", 200)
    assert head.headers["Content-Length"] == str(len(c.image1))
    await s("head by digest", "HEAD", f"/v2/{app}/manifests/{sha256(c.image1)}", 200)
    unknown = await s("unknown tag", "GET", f"/v2/{app}/manifests/nope", 404)
    assert error_code(unknown) == "MANIFEST_UNKNOWN"
    missing = _image(c.cfg1, [c.never_pushed])
    refused = await s(
        "missing blob", "PUT", f"/v2/{app}/manifests/broken", 400, data=missing, headers=oci
    )
    assert error_code(refused) == "MANIFEST_BLOB_UNKNOWN"
    mismatch = await s(
        "digest mismatch",
        "PUT",
        f"/v2/{app}/manifests/{sha256(b'x')}",
        400,
        data=c.image1,
        headers=oci,
    )
    assert error_code(mismatch) == "DIGEST_INVALID"
    elsewhere = await s(
        "manifest of another repo", "GET", f"/v2/team/other/manifests/{sha256(c.image1)}", 404
    )
    assert error_code(elsewhere) == "MANIFEST_UNKNOWN"

    index = {"Content-Type": mf.OCI_INDEX}
    await s("put index", "PUT", f"/v2/{app}/manifests/multi", 201, data=c.index, headers=index)
    got = await s("get index", "GET", f"/v2/{app}/manifests/multi", 200)
    assert got.body == c.index and got.headers["Content-Type"] == mf.OCI_INDEX
    for child in (c.image1, c.image2):
        await s("index child", "GET", f"/v2/{app}/manifests/{sha256(child)}", 200)
    orphan_index = json.loads(c.index)
    orphan_index["manifests"][0]["digest"] = sha256(b"no such child")
    refused = await s(
        "index with a missing child",
        "PUT",
        f"/v2/{app}/manifests/orphans",
        400,
        data=json.dumps(orphan_index).encode(),
        headers=index,
    )
    assert error_code(refused) == "MANIFEST_BLOB_UNKNOWN"

    # referrers: two artifacts whose subject is image1
    for data in (c.signature, c.sbom_artifact):
        put = await s(
            "put referrer",
            "PUT",
            f"/v2/{app}/manifests/{sha256(data)}",
            201,
            data=data,
            headers=oci,
        )
        assert put.headers["OCI-Subject"] == sha256(c.image1)
    listed = await s("referrers", "GET", f"/v2/{app}/referrers/{sha256(c.image1)}", 200)
    found = json.loads(listed.body)["manifests"]
    assert sorted(d["digest"] for d in found) == sorted(
        [sha256(c.signature), sha256(c.sbom_artifact)]
    )
    assert {d["artifactType"] for d in found} == {
        "application/vnd.example.sig",
        "application/spdx+json",
    }
    filtered = await s(
        "referrers filtered",
        "GET",
        f"/v2/{app}/referrers/{sha256(c.image1)}?artifactType=application/spdx%2Bjson",
        200,
    )
    assert [d["digest"] for d in json.loads(filtered.body)["manifests"]] == [
        sha256(c.sbom_artifact)
    ]
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"
    none = await s("referrers of nothing", "GET", f"/v2/{app}/referrers/{sha256(b'z')}", 200)
    assert json.loads(none.body)["manifests"] == []


async def listings(s: Session, c: Content) -> None:
    """tags/list and _catalog with n/last and Link."""
    app = "team/app"
    oci = {"Content-Type": mf.OCI_MANIFEST}
    for tag in ("t1", "t2", "t3", "t4", "t5"):
        await s(f"tag {tag}", "PUT", f"/v2/{app}/manifests/{tag}", 201, data=c.image3, headers=oci)
    everything = await s("tags", "GET", f"/v2/{app}/tags/list", 200)
    tags = json.loads(everything.body)["tags"]
    assert tags == sorted(["latest", "multi", "t1", "t2", "t3", "t4", "t5", "three", "v1"])
    seen: list[str] = []
    url = f"/v2/{app}/tags/list?n=3"
    while True:
        page = await s("tags page", "GET", url, 200)
        seen += json.loads(page.body)["tags"]
        link = page.headers.get("Link")
        if link is None:
            break
        url = re.fullmatch(r'<([^>]+)>; rel="next"', link).group(1)  # type: ignore[union-attr]
    assert seen == tags
    page = await s("tags after last", "GET", f"/v2/{app}/tags/list?n=2&last=t3", 200)
    assert json.loads(page.body)["tags"] == ["t4", "t5"]
    empty = await s("tags n=0", "GET", f"/v2/{app}/tags/list?n=0", 200)
    assert json.loads(empty.body)["tags"] == []
    await s("tags past the end", "GET", f"/v2/{app}/tags/list?last=zzz", 200)
    unknown = await s("tags of unknown repo", "GET", "/v2/no/such/tags/list", 404)
    assert error_code(unknown) == "NAME_UNKNOWN"
    bad = await s("bad n", "GET", f"/v2/{app}/tags/list?n=-1", 400)
    assert error_code(bad) == "PAGINATION_NUMBER_INVALID"

    for repo in ("alpha", "zeta/x", "team/app/sub", "mid"):
        await s(
            f"blob in {repo}",
            "POST",
            f"/v2/{repo}/blobs/uploads/?digest={sha256(c.cfg1)}",
            201,
            data=c.cfg1,
        )
        doc = _image(c.cfg1, [])
        await s(
            f"manifest in {repo}", "PUT", f"/v2/{repo}/manifests/only", 201, data=doc, headers=oci
        )
    catalog = await s("catalog", "GET", "/v2/_catalog", 200)
    names = json.loads(catalog.body)["repositories"]
    assert names == ["alpha", "mid", "team/app", "team/app/sub", "team/other", "zeta/x"]
    seen = []
    url = "/v2/_catalog?n=2"
    while True:
        page = await s("catalog page", "GET", url, 200)
        seen += json.loads(page.body)["repositories"]
        link = page.headers.get("Link")
        if link is None:
            break
        url = re.fullmatch(r'<([^>]+)>; rel="next"', link).group(1)  # type: ignore[union-attr]
    assert seen == names
    page = await s("catalog after last", "GET", "/v2/_catalog?n=2&last=team/app", 200)
    assert json.loads(page.body)["repositories"] == ["team/app/sub", "team/other"]


async def deletes(s: Session, c: Content) -> None:
    app = "team/app"
    await s("delete tag", "DELETE", f"/v2/{app}/manifests/latest", 202)
    await s("deleted tag", "GET", f"/v2/{app}/manifests/latest", 404)
    await s("other tag stays", "GET", f"/v2/{app}/manifests/v1", 200)
    await s("delete unknown tag", "DELETE", f"/v2/{app}/manifests/latest", 404)
    await s("delete referrer", "DELETE", f"/v2/{app}/manifests/{sha256(c.sbom_artifact)}", 202)
    listed = await s(
        "referrers after delete", "GET", f"/v2/{app}/referrers/{sha256(c.image1)}", 200
    )
    assert [d["digest"] for d in json.loads(listed.body)["manifests"]] == [sha256(c.signature)]
    await s("delete by digest", "DELETE", f"/v2/{app}/manifests/{sha256(c.image3)}", 202)
    await s("deleted by digest", "GET", f"/v2/{app}/manifests/{sha256(c.image3)}", 404)
    for tag in ("three", "t1"):  # tags of a deleted revision go with it
        await s(f"tag {tag} of deleted", "GET", f"/v2/{app}/manifests/{tag}", 404)
    tags = await s("tags after deletes", "GET", f"/v2/{app}/tags/list", 200)
    assert json.loads(tags.body)["tags"] == ["multi", "v1"]
    await s("delete again", "DELETE", f"/v2/{app}/manifests/{sha256(c.image3)}", 404)
    await s("delete blob", "DELETE", f"/v2/{app}/blobs/{sha256(c.b)}", 202)
    gone = await s("deleted blob", "GET", f"/v2/{app}/blobs/{sha256(c.b)}", 404)
    assert error_code(gone) == "BLOB_UNKNOWN"
    await s("deleted blob head", "HEAD", f"/v2/{app}/blobs/{sha256(c.b)}", 404)
    await s("delete blob again", "DELETE", f"/v2/{app}/blobs/{sha256(c.b)}", 404)
    await s("mounted copy stays", "GET", f"/v2/team/other/blobs/{sha256(c.a)}", 200)
    await s("blob of a kept image", "GET", f"/v2/{app}/blobs/{sha256(c.c)}", 200)


async def run_session(client: TestClient, content: Content) -> list[Step]:
    s = Session(client)
    await push_blobs(s, content)
    await pull_blobs(s, content)
    await manifests(s, content)
    await listings(s, content)
    await deletes(s, content)
    return s.steps


async def test_the_oci_surface_on_s3_is_answered_as_on_disk(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    content = Content()
    disk_config = make_config(tmp_path / "disk")
    s3_conf = s3_config(seaweed, s3_bucket, tmp_path / "s3")
    recordings = []
    for config in (disk_config, s3_conf):
        client = await start_client(config)
        try:
            recordings.append(await run_session(client, content))
        finally:
            await client.close()
    on_disk, on_s3 = recordings
    assert len(on_disk) == len(on_s3)
    for disk, s3 in zip(on_disk, on_s3, strict=True):
        assert (s3.what, s3.status, s3.headers) == (disk.what, disk.status, disk.headers)
        assert s3.body == disk.body, f"{s3.what}: bodies differ"

    # the S3 app kept nothing on disk, and every upload session is finished or cancelled
    assert not any((tmp_path / "s3" / "storage" / "registry").rglob("*"))
    assert not any((tmp_path / "s3" / "storage" / "proxy").rglob("*"))
    for base in ("disk", "s3"):
        assert not list((tmp_path / base / "storage" / "_tmp" / "uploads").iterdir())
    keys = bucket_keys(seaweed, s3_bucket)
    for data in (content.a, content.c, content.d, content.e, content.image1, content.index):
        assert blob_key("registry", sha256(data)) in keys
    assert not [k for k in keys if k.startswith("proxy/")], "a push wrote to the proxy store"
    assert not [k for k in keys if "/_probe/" in k], "the probe left its object behind"


async def test_a_blob_past_the_single_put_size_round_trips(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    """A blob stored by a multipart upload (over 64 MiB) pulls back whole and in ranges
    that cross its parts."""
    from regproxy.storage import s3 as s3_mod

    size = s3_mod.SINGLE_PUT_MAX + 3 * MiB + 7
    data = os.urandom(size)
    digest = sha256(data)
    client = await start_client(s3_config(seaweed, s3_bucket, tmp_path))
    try:
        async with client.post(
            f"/v2/big/blobs/uploads/?digest={digest}", data=_stream(data, 4 * MiB)
        ) as resp:
            assert resp.status == 201, await resp.text()
        assert blob_key("registry", digest) in bucket_keys(seaweed, s3_bucket, "registry/blobs/")
        async with client.get(f"/v2/big/blobs/{digest}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(size)
            got = await resp.read()
        assert got == data
        part = s3_mod.PART_SIZE
        for start, end in ((part - 5, part + 5), (3 * part - 1, 3 * part), (size - 9, size - 1)):
            headers = {"Range": f"bytes={start}-{end}"}
            async with client.get(f"/v2/big/blobs/{digest}", headers=headers) as resp:
                assert resp.status == 206
                assert await resp.read() == data[start : end + 1]
    finally:
        await client.close()
    assert not seaweed.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
