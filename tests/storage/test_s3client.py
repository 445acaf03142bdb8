"""regproxy.storage.s3client: the client built from `[s3]`, and the start-up probe.

Against a real SeaweedFS: the probe passes on a good store and leaves nothing behind,
and names the cause, in one line, for a wrong secret, an unknown key, a missing bucket,
a read-only identity and a closed port. An endpoint that ignores conditional writes is a
small fake on 127.0.0.1 (SeaweedFS honours them).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from regproxy.config import S3Config
from regproxy.errors import ConfigError
from regproxy.storage import s3client
from regproxy.storage.s3 import S3Backend
from regproxy.storage.s3client import (
    POOL_CONNECTIONS,
    build_client,
    crc32_header,
    parse_s3_url,
    probe,
)
from tests.support.processes import free_port
from tests.support.seaweed import (
    ACCESS_KEY,
    READONLY_ACCESS_KEY,
    READONLY_SECRET_KEY,
    SECRET_KEY,
    SeaweedS3,
)


@pytest.fixture(autouse=True)
def no_ambient_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The AWS chain must not find this machine's credentials, profile or region, nor ask
    an instance metadata service (that would leave 127.0.0.1)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


def settings(
    endpoint: str,
    tmp_path: Path,
    *,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    **more: Any,
) -> S3Config:
    secret = tmp_path / f"secret-{access_key}-{len(secret_key)}"
    secret.write_text(secret_key + "\n")
    return S3Config(
        endpoint=endpoint,
        access_key_id=access_key,
        secret_access_key_file=secret,
        **more,
    )


def probe_error(client: Any, bucket: str, prefix: str = "registry") -> str:
    with pytest.raises(ConfigError) as info:
        probe(client, bucket, prefix)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- parse_s3_url -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
        ("s3://my-bucket.example/registry", ("my-bucket.example", "registry")),
        ("s3://bucket/a/b/", ("bucket", "a/b")),
        ("s3://b0b/team one/é", ("b0b", "team one/é")),
    ],
)
def test_parse_s3_url(url: str, parsed: tuple[str, str]) -> None:
    assert parse_s3_url(url) == parsed


@pytest.mark.parametrize(
    "url",
    [
        "http://bucket/x",
        "s3:/bucket",
        "S3://bucket",
        "s3://",
        "s3://ab",
        "s3://Bucket",
        "s3://my..bucket",
        "s3://-bucket",
        "s3://127.0.0.1:5311/bucket",
        "s3://bucket//x",
        "s3://bucket/a/../b",
        "s3://bucket/./b",
        "s3://bucket/a?b",
        "s3://bucket/" + "x" * 256,
    ],
)
def test_parse_s3_url_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        parse_s3_url(url)


# ---- build_client -------------------------------------------------------------------------


def test_client_settings(tmp_path: Path) -> None:
    """Path style and SigV4 (presigned URLs too) for a custom endpoint, us-east-1 when
    nothing names a region, a pool for every storage thread, checksums only when
    required, bounded retries and timeouts. Building sends nothing."""
    client = build_client(settings("http://127.0.0.1:9", tmp_path))
    config = client.meta.config
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    assert client.meta.region_name == "us-east-1"
    assert config.s3["addressing_style"] == "path"
    assert config.signature_version == "s3v4"
    assert config.max_pool_connections == POOL_CONNECTIONS >= 16 + 32
    assert config.request_checksum_calculation == "when_required"
    assert config.retries["total_max_attempts"] == 3
    assert (config.connect_timeout, config.read_timeout) == (5.0, 60.0)
    url = client.generate_presigned_url("get_object", Params={"Bucket": "bkt", "Key": "k/1"})
    assert url.startswith("http://127.0.0.1:9/bkt/k/1?") and "X-Amz-Signature=" in url


def test_no_plain_url_for_an_https_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A splice relay speaks plain HTTP only: an HTTPS endpoint (AWS itself) goes through
    the S3 client, which verifies the certificate."""
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    backend = S3Backend(
        build_client(settings("https://127.0.0.1:9", tmp_path)), "bkt", "registry", tmp_path
    )
    assert backend.plain_http_url(tmp_path / "blobs/sha256/ab/x", 60) is None
    plain = S3Backend(
        build_client(settings("http://127.0.0.1:9", tmp_path)), "bkt", "registry", tmp_path
    )
    url = plain.plain_http_url(tmp_path / "blobs/sha256/ab/x", 60)
    assert url is not None and url.startswith("http://127.0.0.1:9/bkt/registry/blobs/sha256/ab/x?")


def test_region_and_aws_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """No endpoint: AWS with boto3's addressing; the region from s3.region, else from
    AWS_DEFAULT_REGION or the profile, else AWS_REGION (ECS, EKS); no static keys: the AWS
    chain's credentials."""
    client = build_client(S3Config(region="eu-west-1"))
    assert client.meta.region_name == "eu-west-1"
    assert "amazonaws.com" in client.meta.endpoint_url
    assert client.meta.config.s3["addressing_style"] == "auto"
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDFROMENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env")
    client = build_client(S3Config(endpoint="http://127.0.0.1:9"))
    assert client.meta.region_name == "ap-south-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "sa-east-1")
    assert build_client(S3Config()).meta.region_name == "sa-east-1"
    assert "AKIDFROMENV" in client.generate_presigned_url(
        "get_object", Params={"Bucket": "bkt", "Key": "k"}
    )


def test_public_client_signs_for_the_public_endpoint(tmp_path: Path) -> None:
    """`public=True`: presigned URLs name `public_endpoint` (the signature covers the host);
    without one, the endpoint itself."""
    both = settings("http://127.0.0.1:9", tmp_path, public_endpoint="https://s3.example:8443")
    url = build_client(both, public=True).generate_presigned_url(
        "get_object", Params={"Bucket": "bkt", "Key": "k"}
    )
    assert url.startswith("https://s3.example:8443/bkt/k?")
    plain = settings("http://127.0.0.1:9", tmp_path)
    assert build_client(plain, public=True).meta.endpoint_url == "http://127.0.0.1:9"


def test_secret_from_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The secret comes from its variable or file; a missing one is a ConfigError naming
    the key, raised while building (before any request)."""
    monkeypatch.setenv("RP_S3_SECRET", "from-variable")
    client = build_client(
        S3Config(
            endpoint="http://127.0.0.1:9", access_key_id="AK", secret_access_key_env="RP_S3_SECRET"
        )
    )
    assert client._request_signer._credentials.secret_key == "from-variable"
    with pytest.raises(ConfigError, match=r"s3\.secret_access_key_env: .*RP_S3_UNSET"):
        build_client(S3Config(access_key_id="AK", secret_access_key_env="RP_S3_UNSET"))
    with pytest.raises(ConfigError, match=r"s3\.secret_access_key_file: cannot read"):
        build_client(S3Config(access_key_id="AK", secret_access_key_file=tmp_path / "none"))


def test_client_round_trip_with_a_crc32_header_and_no_trailers(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    """The built client writes and reads SeaweedFS with the payload unsigned (botocore
    would hash every byte for SigV4) and a CRC32 header in its place, for byte and file
    bodies alike; never the `aws-chunked` trailers some S3-compatible servers refuse."""
    client = build_client(settings(seaweed.endpoint, tmp_path))
    sent: list[dict[str, str]] = []
    client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(dict(request.headers))
    )
    client.put_object(Bucket=s3_bucket, Key="k", Body=b"payload", IfNoneMatch="*")
    assert client.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"payload"
    source = tmp_path / "body"
    source.write_bytes(b"head" + os.urandom(3 * 1024 * 1024 + 5))
    with open(source, "rb") as handle:
        handle.seek(4)  # a file body is checksummed from where it stands, and put back
        client.put_object(Bucket=s3_bucket, Key="f", Body=handle)
    got = client.get_object(Bucket=s3_bucket, Key="f")["Body"].read()
    assert got == source.read_bytes()[4:]
    for headers, body in zip(sent, (b"payload", got), strict=True):
        checksums = {h.lower(): v for h, v in headers.items() if "checksum" in h.lower()}
        assert checksums == {"x-amz-checksum-crc32": crc32_header(body).encode()}, headers
        assert headers["X-Amz-Content-SHA256"] in ("UNSIGNED-PAYLOAD", b"UNSIGNED-PAYLOAD")
        assert b"aws-chunked" not in bytes(headers.get("Content-Encoding", b""))


def test_a_body_damaged_on_the_way_is_refused(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    """With the payload unsigned, the CRC32 is what makes S3 refuse bytes that do not
    match: a whole object and a multipart part (the two ways regproxy writes)."""
    client = build_client(settings(seaweed.endpoint, tmp_path))
    wrong = crc32_header(b"other bytes")
    with pytest.raises(ClientError, match="BadDigest"):
        client.put_object(Bucket=s3_bucket, Key="bad", Body=b"payload", ChecksumCRC32=wrong)
    upload = client.create_multipart_upload(
        Bucket=s3_bucket, Key="parts", ChecksumAlgorithm="CRC32"
    )["UploadId"]
    with pytest.raises(ClientError, match="BadDigest"):
        client.upload_part(
            Bucket=s3_bucket, Key="parts", UploadId=upload, PartNumber=1, Body=b"x" * 100,
            ChecksumCRC32=wrong,
        )  # fmt: skip
    client.abort_multipart_upload(Bucket=s3_bucket, Key="parts", UploadId=upload)
    assert "Contents" not in client.list_objects_v2(Bucket=s3_bucket, Prefix="bad")


# ---- probe against SeaweedFS --------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["registry", "", "deep/er"])
def test_probe_passes_and_leaves_nothing(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path, prefix: str
) -> None:
    client = build_client(settings(seaweed.endpoint, tmp_path))
    probe(client, s3_bucket, prefix)
    probe(client, s3_bucket, prefix)  # again: nothing left from the first run trips it
    assert seaweed.client().list_objects_v2(Bucket=s3_bucket).get("Contents", []) == []


def test_probe_wrong_secret(seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path) -> None:
    client = build_client(settings(seaweed.endpoint, tmp_path, secret_key="not-it"))
    message = probe_error(client, s3_bucket)
    assert message == (
        f"s3://{s3_bucket}/registry: wrong secret access key (S3 answered SignatureDoesNotMatch)"
    )


def test_probe_unknown_access_key(seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path) -> None:
    client = build_client(settings(seaweed.endpoint, tmp_path, access_key="NOBODY"))
    assert probe_error(client, s3_bucket) == (
        f"s3://{s3_bucket}/registry: the S3 endpoint {seaweed.endpoint} "
        "does not know this access key id"
    )


def test_probe_missing_bucket(seaweed: SeaweedS3, tmp_path: Path) -> None:
    client = build_client(settings(seaweed.endpoint, tmp_path))
    assert probe_error(client, "no-such-bucket", "") == (
        f"s3://no-such-bucket: no such bucket 'no-such-bucket' at {seaweed.endpoint}"
    )


def test_probe_read_only_identity(seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path) -> None:
    """Listing is allowed, writing is not: access denied, naming the step."""
    client = build_client(
        settings(
            seaweed.endpoint,
            tmp_path,
            access_key=READONLY_ACCESS_KEY,
            secret_key=READONLY_SECRET_KEY,
        )
    )
    assert probe_error(client, s3_bucket) == (
        f"s3://{s3_bucket}/registry: access denied while writing "
        "(regproxy lists, reads, writes and deletes)"
    )


def test_probe_closed_port(tmp_path: Path) -> None:
    """Nothing listens: one line naming the endpoint, after the retries (a few seconds)."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    client = build_client(settings(endpoint, tmp_path))
    started = time.monotonic()
    message = probe_error(client, "bucket")
    assert message == (
        f"s3://bucket/registry: cannot reach the S3 endpoint {endpoint}: "
        "[Errno 111] Connection refused"
    )
    assert time.monotonic() - started < 15


def test_probe_silent_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A port that accepts connections and never answers: a read timeout, named."""
    monkeypatch.setattr(s3client, "READ_TIMEOUT", 0.3)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes handshakes; nobody ever reads or answers
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        client = build_client(settings(endpoint, tmp_path))
        assert probe_error(client, "bucket") == (
            f"s3://bucket/registry: cannot reach the S3 endpoint {endpoint}: no answer within 0.3 s"
        )


def test_probe_without_credentials(seaweed: SeaweedS3, s3_bucket: str) -> None:
    """No static keys and an empty AWS chain: say where credentials come from."""
    client = build_client(S3Config(endpoint=seaweed.endpoint))
    message = probe_error(client, s3_bucket)
    assert message.startswith(f"s3://{s3_bucket}/registry: no S3 credentials: set s3.access_key_id")


# ---- probe against endpoints without conditional writes -----------------------------------

_EMPTY_LISTING = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
    b"<Name>bucket</Name><Prefix></Prefix><KeyCount>0</KeyCount><MaxKeys>1</MaxKeys>"
    b"<IsTruncated>false</IsTruncated></ListBucketResult>"
)
_NOT_IMPLEMENTED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code>'
    b"<Message>A header you provided implies functionality that is not implemented"
    b"</Message></Error>"
)


class _NaiveS3(BaseHTTPRequestHandler):
    """Lists nothing, stores nothing; PUT answers as `server.conditions` says:
    "ignored" (200 whatever the headers) or "unsupported" (501 to a conditional PUT)."""

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(200, _EMPTY_LISTING, Content_Type="application/xml")

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        conditional = "If-None-Match" in self.headers or "If-Match" in self.headers
        if conditional and self.server.conditions == "unsupported":  # type: ignore[attr-defined]
            self._answer(501, _NOT_IMPLEMENTED, Content_Type="application/xml")
        else:
            self._answer(200, ETag='"d41d8cd98f00b204e9800998ecf8427e"')

    def do_DELETE(self) -> None:
        self._answer(204)


@pytest.fixture
def naive_s3() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NaiveS3)
    server.conditions = "ignored"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_probe_refuses_an_endpoint_that_ignores_conditions(
    naive_s3: ThreadingHTTPServer, tmp_path: Path
) -> None:
    endpoint = f"http://127.0.0.1:{naive_s3.server_address[1]}"
    client = build_client(settings(endpoint, tmp_path))
    assert probe_error(client, "bucket") == (
        f"s3://bucket/registry: the S3 endpoint {endpoint} does not honour conditional "
        "writes: If-None-Match: * (create if absent) overwrote an existing object; regproxy "
        "needs them to share a store safely (AWS S3 and SeaweedFS 4.48 do)"
    )


def test_probe_refuses_an_endpoint_that_rejects_conditions(
    naive_s3: ThreadingHTTPServer, tmp_path: Path
) -> None:
    naive_s3.conditions = "unsupported"  # type: ignore[attr-defined]
    endpoint = f"http://127.0.0.1:{naive_s3.server_address[1]}"
    client = build_client(settings(endpoint, tmp_path))
    assert probe_error(client, "bucket") == (
        f"s3://bucket/registry: the S3 endpoint {endpoint} does not honour conditional "
        "writes: 501 NotImplemented while writing (If-None-Match / If-Match)"
    )
