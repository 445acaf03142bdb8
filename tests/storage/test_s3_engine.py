"""What SeaweedFS 4.48's S3 gateway honours, pinned with boto3 against a real `weed mini`.

The S3 backend leans on exactly these behaviours (put-if-absent, compare-and-swap, ranged
reads, paged listings, multipart, server-side copy, presigned URLs, signature checks); a
SeaweedFS upgrade that changes one fails here first. Where SeaweedFS differs from AWS S3,
the test asserts what SeaweedFS does and its docstring says how AWS differs.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.support.seaweed import (
    READONLY_ACCESS_KEY,
    READONLY_SECRET_KEY,
    SeaweedS3,
)

MiB = 1024 * 1024
#: S3's smallest part but the last
MIN_PART = 5 * MiB


@pytest.fixture
def s3(seaweed: SeaweedS3) -> Any:
    return seaweed.client(max_pool_connections=32)


def refusal(call: Callable[[], Any]) -> tuple[int, str]:
    """(HTTP status, S3 error code) of a call that must fail."""
    with pytest.raises(ClientError) as info:
        call()
    response = info.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"].get("Code", "")


def body(s3: Any, bucket: str, key: str, **kwargs: Any) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key, **kwargs)["Body"].read()


def with_headers(s3: Any, operation: str, headers: dict[str, str]) -> None:
    """Send extra headers on every `operation` call (conditions botocore does not model)."""

    def add(request: Any, **_: Any) -> None:
        for name, value in headers.items():
            request.headers[name] = value

    s3.meta.events.register(f"before-sign.s3.{operation}", add)


# ---- conditional writes -------------------------------------------------------------------


def test_put_if_none_match_creates_once(s3: Any, s3_bucket: str) -> None:
    """`If-None-Match: *`: the first create wins, a second one is 412 PreconditionFailed and
    leaves the first one's bytes."""
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"first", IfNoneMatch="*")
    assert refusal(
        lambda: s3.put_object(Bucket=s3_bucket, Key="k", Body=b"second", IfNoneMatch="*")
    ) == (412, "PreconditionFailed")
    assert body(s3, s3_bucket, "k") == b"first"


def test_concurrent_creates_exactly_one_wins(s3: Any, s3_bucket: str) -> None:
    """16 racing creates of one key: one succeeds, the rest are 412 (atomic, not
    check-then-write). AWS may also answer 409 ConditionalRequestConflict to a loser."""

    def create(i: int) -> str:
        try:
            s3.put_object(Bucket=s3_bucket, Key="race", Body=b"%d" % i, IfNoneMatch="*")
        except ClientError as exc:
            return exc.response["Error"]["Code"]
        return "won"

    for _ in range(5):
        s3.delete_object(Bucket=s3_bucket, Key="race")
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(create, range(16)))
        assert results.count("won") == 1, results
        assert set(results) == {"won", "PreconditionFailed"}, results


def test_put_if_match_is_compare_and_swap(s3: Any, s3_bucket: str) -> None:
    """`If-Match: <etag>` replaces only the version it names; a stale ETag is 412.

    On a key that does not exist SeaweedFS answers 412 PreconditionFailed; AWS answers 404
    NoSuchKey there, so a backend must read both as "not swapped"."""
    first = s3.put_object(Bucket=s3_bucket, Key="tag", Body=b"v1")["ETag"]
    second = s3.put_object(Bucket=s3_bucket, Key="tag", Body=b"v2", IfMatch=first)["ETag"]
    assert second != first
    assert refusal(
        lambda: s3.put_object(Bucket=s3_bucket, Key="tag", Body=b"v3", IfMatch=first)
    ) == (412, "PreconditionFailed")
    assert body(s3, s3_bucket, "tag") == b"v2"
    # the ETag unquoted is the same condition
    s3.put_object(Bucket=s3_bucket, Key="tag", Body=b"v4", IfMatch=second.strip('"'))
    assert refusal(
        lambda: s3.put_object(Bucket=s3_bucket, Key="absent", Body=b"x", IfMatch=first)
    ) == (412, "PreconditionFailed")


def test_concurrent_swaps_exactly_one_wins(s3: Any, s3_bucket: str) -> None:
    """16 racing compare-and-swaps from one ETag: one succeeds, the rest are 412."""
    etag = s3.put_object(Bucket=s3_bucket, Key="tag", Body=b"start")["ETag"]

    def swap(i: int) -> str:
        try:
            s3.put_object(Bucket=s3_bucket, Key="tag", Body=b"by %d" % i, IfMatch=etag)
        except ClientError as exc:
            return exc.response["Error"]["Code"]
        return "won"

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(swap, range(16)))
    assert results.count("won") == 1, results
    assert set(results) == {"won", "PreconditionFailed"}, results


def test_etag_of_a_simple_put_is_the_quoted_md5(s3: Any, s3_bucket: str) -> None:
    """PutObject answers `"<md5 hex>"` and HeadObject/ListObjectsV2 repeat it exactly."""
    etag = s3.put_object(Bucket=s3_bucket, Key="k", Body=b"abc")["ETag"]
    assert etag == '"900150983cd24fb0d6963f7d28e17f72"'
    assert s3.head_object(Bucket=s3_bucket, Key="k")["ETag"] == etag
    assert s3.list_objects_v2(Bucket=s3_bucket)["Contents"][0]["ETag"] == etag


# ---- reads --------------------------------------------------------------------------------


def test_get_ranges(s3: Any, s3_bucket: str) -> None:
    """Range GETs are 206 with Content-Range; a range past the end is 416 InvalidRange, one
    that runs over the end is cut to the object."""
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"0123456789")
    got = s3.get_object(Bucket=s3_bucket, Key="k", Range="bytes=2-4")
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert got["ContentRange"] == "bytes 2-4/10"
    assert got["Body"].read() == b"234"
    assert body(s3, s3_bucket, "k", Range="bytes=7-") == b"789"
    assert body(s3, s3_bucket, "k", Range="bytes=-3") == b"789"
    assert body(s3, s3_bucket, "k", Range="bytes=8-30") == b"89"
    assert refusal(lambda: s3.get_object(Bucket=s3_bucket, Key="k", Range="bytes=20-30")) == (
        416,
        "InvalidRange",
    )


def test_head_and_missing_keys(s3: Any, s3_bucket: str) -> None:
    """HeadObject gives size, ETag and Last-Modified; a missing key is 404 NoSuchKey on GET
    and a bare 404 on HEAD (a HEAD answer has no body to carry a code)."""
    before = datetime.now(UTC).replace(microsecond=0)
    etag = s3.put_object(Bucket=s3_bucket, Key="k", Body=b"12345")["ETag"]
    head = s3.head_object(Bucket=s3_bucket, Key="k")
    assert head["ContentLength"] == 5
    assert head["ETag"] == etag
    assert before <= head["LastModified"] <= datetime.now(UTC) + timedelta(seconds=1)
    assert refusal(lambda: s3.head_object(Bucket=s3_bucket, Key="nope")) == (404, "404")
    assert refusal(lambda: s3.get_object(Bucket=s3_bucket, Key="nope")) == (404, "NoSuchKey")


def test_conditional_reads(s3: Any, s3_bucket: str) -> None:
    """GET/HEAD honour If-Match (412 when stale) and If-None-Match (304 when current)."""
    etag = s3.put_object(Bucket=s3_bucket, Key="k", Body=b"x")["ETag"]
    assert body(s3, s3_bucket, "k", IfMatch=etag) == b"x"
    assert refusal(lambda: s3.get_object(Bucket=s3_bucket, Key="k", IfMatch='"0"')) == (
        412,
        "PreconditionFailed",
    )
    assert refusal(lambda: s3.head_object(Bucket=s3_bucket, Key="k", IfMatch='"0"')) == (
        412,
        "412",
    )
    assert refusal(lambda: s3.get_object(Bucket=s3_bucket, Key="k", IfNoneMatch=etag)) == (
        304,
        "304",
    )


# ---- deletes ------------------------------------------------------------------------------


def test_delete_and_conditional_delete(s3: Any, s3_bucket: str) -> None:
    """DeleteObject is 204 whether or not the key exists. With If-Match it deletes only the
    named version: stale is 412, and a missing key is 412 too (AWS: 404 NoSuchKey)."""
    assert (
        s3.delete_object(Bucket=s3_bucket, Key="never")["ResponseMetadata"]["HTTPStatusCode"] == 204
    )
    old = s3.put_object(Bucket=s3_bucket, Key="k", Body=b"1")["ETag"]
    new = s3.put_object(Bucket=s3_bucket, Key="k", Body=b"2")["ETag"]
    assert refusal(lambda: s3.delete_object(Bucket=s3_bucket, Key="k", IfMatch=old)) == (
        412,
        "PreconditionFailed",
    )
    assert body(s3, s3_bucket, "k") == b"2"
    s3.delete_object(Bucket=s3_bucket, Key="k", IfMatch=new)
    assert refusal(lambda: s3.head_object(Bucket=s3_bucket, Key="k"))[0] == 404
    assert refusal(lambda: s3.delete_object(Bucket=s3_bucket, Key="k", IfMatch=new)) == (
        412,
        "PreconditionFailed",
    )


# ---- listings -----------------------------------------------------------------------------

KEYS = ["p/a", "p/b", "p/c/1", "p/c/2", "p/d", "p/e/f/g", "p/sp ace+plus%é", "q/x"]


def list_all(s3: Any, bucket: str, **kwargs: Any) -> tuple[list[str], list[str], int]:
    """Every key and common prefix of a listing, page by page; and the number of pages."""
    keys: list[str] = []
    prefixes: list[str] = []
    pages = 0
    token: dict[str, str] = {}
    while True:
        page = s3.list_objects_v2(Bucket=bucket, **kwargs, **token)
        pages += 1
        keys += [c["Key"] for c in page.get("Contents", [])]
        prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        assert page["KeyCount"] == len(page.get("Contents", [])) + len(
            page.get("CommonPrefixes", [])
        )
        if not page["IsTruncated"]:
            return keys, prefixes, pages
        token = {"ContinuationToken": page["NextContinuationToken"]}


def test_list_objects_v2_pages(s3: Any, s3_bucket: str) -> None:
    """ListObjectsV2 in key order, with prefix, delimiter (common prefixes count against
    MaxKeys), StartAfter and continuation tokens; keys with spaces, `+`, `%` and non-ASCII
    come back intact (boto3 asks for url encoding and decodes)."""
    for key in KEYS:
        s3.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
    under_p = sorted(k for k in KEYS if k.startswith("p/"))
    assert list_all(s3, s3_bucket, Prefix="p/") == (under_p, [], 1)
    assert list_all(s3, s3_bucket, Prefix="p/", MaxKeys=3) == (under_p, [], 3)
    keys, prefixes, pages = list_all(s3, s3_bucket, Prefix="p/", Delimiter="/", MaxKeys=2)
    assert keys == ["p/a", "p/b", "p/d", "p/sp ace+plus%é"]
    assert prefixes == ["p/c/", "p/e/"]
    assert pages == 3
    assert list_all(s3, s3_bucket, Prefix="p/", StartAfter="p/c/1")[0] == [
        "p/c/2",
        "p/d",
        "p/e/f/g",
        "p/sp ace+plus%é",
    ]
    assert list_all(s3, s3_bucket, Prefix="nothing/") == ([], [], 1)


# ---- multipart ----------------------------------------------------------------------------


def upload_parts(s3: Any, bucket: str, key: str, upload_id: str, parts: list[bytes]) -> Any:
    done = []
    for number, data in enumerate(parts, start=1):
        etag = s3.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
        )["ETag"]
        done.append({"PartNumber": number, "ETag": etag})
    return {"Parts": done}


def test_multipart_upload(s3: Any, s3_bucket: str) -> None:
    """Create, upload parts (all but the last at least 5 MiB, else EntityTooSmall on
    complete), list parts, complete: one object whose ETag ends in `-<parts>`."""
    data = [b"a" * MIN_PART, b"b" * 100]
    upload = s3.create_multipart_upload(Bucket=s3_bucket, Key="big")["UploadId"]
    parts = upload_parts(s3, s3_bucket, "big", upload, data)
    listed = s3.list_parts(Bucket=s3_bucket, Key="big", UploadId=upload)["Parts"]
    assert [(p["PartNumber"], p["Size"]) for p in listed] == [(1, MIN_PART), (2, 100)]
    done = s3.complete_multipart_upload(
        Bucket=s3_bucket, Key="big", UploadId=upload, MultipartUpload=parts
    )
    assert done["ETag"].endswith('-2"')
    assert body(s3, s3_bucket, "big") == b"".join(data)
    assert body(s3, s3_bucket, "big", Range=f"bytes={MIN_PART - 1}-{MIN_PART}") == b"ab"
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []

    small = s3.create_multipart_upload(Bucket=s3_bucket, Key="small")["UploadId"]
    parts = upload_parts(s3, s3_bucket, "small", small, [b"a" * 100, b"b" * 100])
    assert refusal(
        lambda: s3.complete_multipart_upload(
            Bucket=s3_bucket, Key="small", UploadId=small, MultipartUpload=parts
        )
    ) == (400, "EntityTooSmall")
    wrong = {"Parts": [{"PartNumber": 1, "ETag": '"' + "0" * 32 + '"'}]}
    assert refusal(
        lambda: s3.complete_multipart_upload(
            Bucket=s3_bucket, Key="small", UploadId=small, MultipartUpload=wrong
        )
    ) == (400, "InvalidPart")


def test_abort_and_list_multipart_uploads(s3: Any, s3_bucket: str) -> None:
    """ListMultipartUploads shows open uploads with their Initiated time (whole seconds,
    UTC); abort is 204, and 204 again for an upload already aborted (AWS: 404 NoSuchUpload
    after a while); a part sent to an aborted upload, or an abort of an id that never
    existed, is 404 NoSuchUpload."""
    before = datetime.now(UTC).replace(microsecond=0)
    upload = s3.create_multipart_upload(Bucket=s3_bucket, Key="k")["UploadId"]
    [listed] = s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]
    assert (listed["Key"], listed["UploadId"]) == ("k", upload)
    assert before <= listed["Initiated"] <= datetime.now(UTC) + timedelta(seconds=1)
    assert (
        s3.abort_multipart_upload(Bucket=s3_bucket, Key="k", UploadId=upload)["ResponseMetadata"][
            "HTTPStatusCode"
        ]
        == 204
    )
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    s3.abort_multipart_upload(Bucket=s3_bucket, Key="k", UploadId=upload)
    assert refusal(
        lambda: s3.upload_part(Bucket=s3_bucket, Key="k", UploadId=upload, PartNumber=1, Body=b"x")
    ) == (404, "NoSuchUpload")
    assert refusal(
        lambda: s3.abort_multipart_upload(Bucket=s3_bucket, Key="k", UploadId="deadbeef")
    ) == (404, "NoSuchUpload")


def test_list_multipart_uploads_pages_by_upload_id(s3: Any, s3_bucket: str) -> None:
    """ListMultipartUploads is ordered by upload id, not by key, and a truncated page names
    only NextUploadIdMarker (no NextKeyMarker). Paging with UploadIdMarker alone reaches
    every upload; adding the last key as KeyMarker, as AWS paging does, skips the rest. A
    backend pages with NextKeyMarker only when the answer has one."""
    uploads = {
        s3.create_multipart_upload(Bucket=s3_bucket, Key=f"up/{i}")["UploadId"]: f"up/{i}"
        for i in range(5)
    }
    first = s3.list_multipart_uploads(Bucket=s3_bucket, Prefix="up/", MaxUploads=2)
    assert first["IsTruncated"] and "NextKeyMarker" not in first
    ids = [u["UploadId"] for u in first["Uploads"]]
    assert ids == sorted(ids)
    with_key = s3.list_multipart_uploads(
        Bucket=s3_bucket,
        Prefix="up/",
        MaxUploads=2,
        KeyMarker=first["Uploads"][-1]["Key"],
        UploadIdMarker=first["NextUploadIdMarker"],
    )
    assert len(with_key.get("Uploads", [])) < len(uploads) - 2

    seen: dict[str, str] = {}
    markers: dict[str, str] = {}
    while True:
        page = s3.list_multipart_uploads(Bucket=s3_bucket, Prefix="up/", MaxUploads=2, **markers)
        seen |= {u["UploadId"]: u["Key"] for u in page.get("Uploads", [])}
        if not page["IsTruncated"]:
            break
        markers = {"UploadIdMarker": page["NextUploadIdMarker"]}
        if page.get("NextKeyMarker"):
            markers["KeyMarker"] = page["NextKeyMarker"]
    assert seen == uploads


def test_complete_multipart_if_none_match(s3: Any, s3_bucket: str) -> None:
    """CompleteMultipartUpload with `If-None-Match: *` onto an existing key is 412 and keeps
    the object; the upload stays open (listed) until it is aborted."""
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"there")
    upload = s3.create_multipart_upload(Bucket=s3_bucket, Key="k")["UploadId"]
    parts = upload_parts(s3, s3_bucket, "k", upload, [b"late"])
    assert refusal(
        lambda: s3.complete_multipart_upload(
            Bucket=s3_bucket, Key="k", UploadId=upload, MultipartUpload=parts, IfNoneMatch="*"
        )
    ) == (412, "PreconditionFailed")
    assert body(s3, s3_bucket, "k") == b"there"
    assert [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]] == [
        upload
    ]
    s3.abort_multipart_upload(Bucket=s3_bucket, Key="k", UploadId=upload)

    fresh = s3.create_multipart_upload(Bucket=s3_bucket, Key="fresh")["UploadId"]
    parts = upload_parts(s3, s3_bucket, "fresh", fresh, [b"first"])
    s3.complete_multipart_upload(
        Bucket=s3_bucket, Key="fresh", UploadId=fresh, MultipartUpload=parts, IfNoneMatch="*"
    )
    assert body(s3, s3_bucket, "fresh") == b"first"


# ---- server-side copy ---------------------------------------------------------------------


def test_copy_object(s3: Any, s3_bucket: str) -> None:
    """CopyObject copies server-side and honours `If-None-Match: *` on the target (412 when
    it exists). Its CopyObjectResult ETag comes unquoted (AWS quotes it): compare ETags
    with the quotes stripped."""
    s3.put_object(Bucket=s3_bucket, Key="src", Body=b"content")
    done = s3.copy_object(
        Bucket=s3_bucket, Key="dst", CopySource={"Bucket": s3_bucket, "Key": "src"}
    )
    head = s3.head_object(Bucket=s3_bucket, Key="dst")
    assert done["CopyObjectResult"]["ETag"] == head["ETag"].strip('"')
    assert not done["CopyObjectResult"]["ETag"].startswith('"')
    assert body(s3, s3_bucket, "dst") == b"content"
    with_headers(s3, "CopyObject", {"If-None-Match": "*"})
    assert refusal(
        lambda: s3.copy_object(
            Bucket=s3_bucket, Key="dst", CopySource={"Bucket": s3_bucket, "Key": "src"}
        )
    ) == (412, "PreconditionFailed")
    s3.copy_object(Bucket=s3_bucket, Key="dst2", CopySource={"Bucket": s3_bucket, "Key": "src"})
    assert body(s3, s3_bucket, "dst2") == b"content"


def test_upload_part_copy(s3: Any, s3_bucket: str) -> None:
    """UploadPartCopy builds a multipart object from byte ranges of existing objects (how a
    large blob moves without passing through regproxy); its part ETags come unquoted."""
    source = b"a" * MIN_PART + b"b" * 100
    s3.put_object(Bucket=s3_bucket, Key="src", Body=source)
    upload = s3.create_multipart_upload(Bucket=s3_bucket, Key="dst")["UploadId"]
    parts = []
    for number, span in enumerate([(0, MIN_PART - 1), (MIN_PART, len(source) - 1)], start=1):
        result = s3.upload_part_copy(
            Bucket=s3_bucket,
            Key="dst",
            UploadId=upload,
            PartNumber=number,
            CopySource={"Bucket": s3_bucket, "Key": "src"},
            CopySourceRange=f"bytes={span[0]}-{span[1]}",
        )["CopyPartResult"]
        assert not result["ETag"].startswith('"')
        parts.append({"PartNumber": number, "ETag": result["ETag"]})
    s3.complete_multipart_upload(
        Bucket=s3_bucket, Key="dst", UploadId=upload, MultipartUpload={"Parts": parts}
    )
    assert body(s3, s3_bucket, "dst") == source


# ---- presigned URLs -----------------------------------------------------------------------


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Status and body of a plain GET (no signing: what a redirected client does)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_presigned_get(s3: Any, s3_bucket: str) -> None:
    """A SigV4 presigned GET serves the object (and ranges of it) to a client with no
    credentials; an altered URL is 403 SignatureDoesNotMatch; X-Amz-Expires past a week
    is 400 AuthorizationQueryParametersError."""
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"0123456789")
    url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": s3_bucket, "Key": "k"}, ExpiresIn=300
    )
    assert "X-Amz-Signature=" in url and f"/{s3_bucket}/k?" in url
    assert fetch(url) == (200, b"0123456789")
    assert fetch(url, {"Range": "bytes=3-5"}) == (206, b"345")
    status, error = fetch(url.replace("/k?", "/j?"))
    assert (status, b"<Code>SignatureDoesNotMatch</Code>" in error) == (403, True)
    week = s3.generate_presigned_url(
        "get_object", Params={"Bucket": s3_bucket, "Key": "k"}, ExpiresIn=8 * 86400
    )
    status, error = fetch(week)
    assert (status, b"<Code>AuthorizationQueryParametersError</Code>" in error) == (400, True)


def test_presigned_get_expires(s3: Any, s3_bucket: str) -> None:
    """Past its X-Amz-Expires a presigned URL is 403 AccessDenied "Request has expired".

    3 s: X-Amz-Date has whole seconds, so the URL is good for at least 2 s."""
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"x")
    url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": s3_bucket, "Key": "k"}, ExpiresIn=3
    )
    assert fetch(url) == (200, b"x")
    deadline = time.monotonic() + 15
    while (answer := fetch(url))[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    status, error = answer
    assert status == 403
    assert b"<Code>AccessDenied</Code>" in error and b"Request has expired" in error


def test_presigned_url_is_bound_to_its_host(seaweed: SeaweedS3, s3_bucket: str) -> None:
    """The signature covers the Host header: a URL signed for `localhost:<port>` works
    there and is 403 SignatureDoesNotMatch at `127.0.0.1:<port>`, the same server. So
    presigned URLs must be signed with the endpoint the client will use
    (`s3.public_endpoint`)."""
    seaweed.client().put_object(Bucket=s3_bucket, Key="k", Body=b"x")
    public = seaweed.endpoint.replace("127.0.0.1", "localhost")
    signer = seaweed.client(endpoint=public)
    url = signer.generate_presigned_url(
        "get_object", Params={"Bucket": s3_bucket, "Key": "k"}, ExpiresIn=60
    )
    assert url.startswith(public)
    assert fetch(url) == (200, b"x")
    status, error = fetch(url.replace("localhost", "127.0.0.1"))
    assert (status, b"<Code>SignatureDoesNotMatch</Code>" in error) == (403, True)


# ---- authentication and buckets -----------------------------------------------------------


def test_wrong_secret_is_refused(seaweed: SeaweedS3, s3_bucket: str) -> None:
    """A wrong secret key is 403 SignatureDoesNotMatch (HEAD: a bare 403), an unknown
    access key 403 InvalidAccessKeyId, an unsigned request 403 AccessDenied."""
    seaweed.client().put_object(Bucket=s3_bucket, Key="k", Body=b"x")
    wrong = seaweed.client(secret_key="not-the-secret")
    assert refusal(lambda: wrong.get_object(Bucket=s3_bucket, Key="k")) == (
        403,
        "SignatureDoesNotMatch",
    )
    assert refusal(lambda: wrong.list_objects_v2(Bucket=s3_bucket)) == (
        403,
        "SignatureDoesNotMatch",
    )
    assert refusal(lambda: wrong.head_object(Bucket=s3_bucket, Key="k")) == (403, "403")
    assert refusal(lambda: wrong.head_bucket(Bucket=s3_bucket)) == (403, "403")
    unknown = seaweed.client(access_key="NO-SUCH-KEY")
    assert refusal(lambda: unknown.list_objects_v2(Bucket=s3_bucket)) == (
        403,
        "InvalidAccessKeyId",
    )
    status, error = fetch(f"{seaweed.endpoint}/{s3_bucket}/k")
    assert (status, b"<Code>AccessDenied</Code>" in error) == (403, True)


def test_read_only_identity_cannot_write(seaweed: SeaweedS3, s3_bucket: str) -> None:
    """An identity without Write reads, lists and HEADs the bucket but PUT and DELETE are
    403 AccessDenied (the probe must write to tell this apart)."""
    seaweed.client().put_object(Bucket=s3_bucket, Key="k", Body=b"x")
    reader = seaweed.client(access_key=READONLY_ACCESS_KEY, secret_key=READONLY_SECRET_KEY)
    reader.head_bucket(Bucket=s3_bucket)
    assert body(reader, s3_bucket, "k") == b"x"
    assert refusal(lambda: reader.put_object(Bucket=s3_bucket, Key="j", Body=b"y")) == (
        403,
        "AccessDenied",
    )
    assert refusal(lambda: reader.delete_object(Bucket=s3_bucket, Key="k")) == (
        403,
        "AccessDenied",
    )


def test_missing_bucket(s3: Any) -> None:
    """A bucket that does not exist: HeadBucket a bare 404, everything else 404
    NoSuchBucket; a write does not create it (`-s3.autoCreateBucket=false`; SeaweedFS's
    default would create it for an admin identity)."""
    assert refusal(lambda: s3.head_bucket(Bucket="no-such-bucket")) == (404, "404")
    for call in (
        lambda: s3.list_objects_v2(Bucket="no-such-bucket"),
        lambda: s3.get_object(Bucket="no-such-bucket", Key="k"),
        lambda: s3.put_object(Bucket="no-such-bucket", Key="k", Body=b"", IfNoneMatch="*"),
    ):
        assert refusal(call) == (404, "NoSuchBucket")


def test_bucket_with_objects_cannot_be_deleted(s3: Any, s3_bucket: str) -> None:
    """`-s3.allowDeleteBucketNotEmpty=false`: DeleteBucket on a bucket holding objects is
    409 BucketNotEmpty, as on AWS (SeaweedFS's default deletes them all)."""
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"x")
    assert refusal(lambda: s3.delete_bucket(Bucket=s3_bucket)) == (409, "BucketNotEmpty")


def test_clients_are_thread_safe_with_a_big_pool(s3: Any, s3_bucket: str) -> None:
    """One boto3 client shared by 16 threads (the storage pool's size) writes and reads
    back 64 objects without errors."""
    errors: list[BaseException] = []
    lock = threading.Lock()

    def round_trip(i: int) -> None:
        try:
            s3.put_object(Bucket=s3_bucket, Key=f"t/{i}", Body=b"%d" % i, IfNoneMatch="*")
            assert body(s3, s3_bucket, f"t/{i}") == b"%d" % i
        except BaseException as exc:  # collected: a failure in a worker must fail the test
            with lock:
                errors.append(exc)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(round_trip, range(64)))
    assert errors == []
