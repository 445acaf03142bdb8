"""The S3 client of stores on S3: built from `[s3]`, and probed once before serving.

boto3 is imported inside `build_client` only, so `serve` and the offline commands on
filesystem stores never load it (importing it and building a client costs ~0.33 s and
~40 MiB). Its blocking client suits the synchronous storage core: one client is
thread-safe and is shared by every thread that touches the store.

Settings that matter on S3-compatible servers (SeaweedFS, MinIO, Ceph…) as much as on AWS:
- path-style addressing for a custom endpoint (`http://host:port/bucket/key`): such
  servers rarely have a wildcard DNS name per bucket; AWS itself gets boto3's default;
- SigV4 always, presigned URLs included (boto3 would presign with SigV2 otherwise);
- no SHA-256 of the payload in the signature (`UNSIGNED-PAYLOAD`, over plain HTTP too):
  botocore would hash every byte sent (~0.8 ms per MiB of CPU, a quarter of a large
  commit's), and the server would hash it again to check. Every body carries a CRC32 in
  an `x-amz-checksum-crc32` header instead (`_checksum_body`, and the multipart uploads
  of `S3Backend`), which S3 checks (BadDigest otherwise) at a third of the cost: bytes
  damaged on the way are refused as before. Over plain HTTP neither protects from
  somebody on the path (who could change answers anyway): use HTTPS for S3 off the host;
- no other checksums (boto3 1.36+ adds CRC32 *trailers* to every upload, in
  `aws-chunked` bodies, which several S3-compatible servers reject; regproxy checks
  sha256 itself);
- a connection pool for every thread that may call S3 at once (`POOL_CONNECTIONS`).
"""

from __future__ import annotations

import base64
import os
import uuid
import zlib
from typing import Any

from regproxy import __version__
from regproxy.config import S3Config, S3Location
from regproxy.errors import ConfigError

#: seconds to open a connection; an S3 endpoint that takes longer is down
CONNECT_TIMEOUT = 5.0
#: seconds without a byte while a response arrives (a large GET streams)
READ_TIMEOUT = 60.0
#: tries per call in botocore's "standard" retry mode: throttling (503 SlowDown), 5xx and
#: broken connections are retried with jittered backoff; the rest fail at once
ATTEMPTS = 3
#: pooled connections: the storage pool's 16 threads, sockbody's 32 body pumps that drive
#: storage writes, and room for presigning and the offline commands' workers; a thread
#: beyond the pool would open and drop a connection per call
POOL_CONNECTIONS = 64
#: bytes read at a time to checksum a file body
CHECKSUM_BLOCK = 1024 * 1024
#: probe objects, under a store's prefix: `_` never starts a repository name (layout.py)
PROBE_FOLDER = "_probe"
#: what a write refused by its condition answers: 412, or 409 when AWS loses a race
_CONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket[/prefix]` → (bucket, prefix without slashes at the ends); ValueError."""
    location = S3Location.parse(url)
    return location.bucket, location.prefix


def build_client(
    settings: S3Config, *, public: bool = False, max_connections: int = POOL_CONNECTIONS
) -> Any:
    """A boto3 S3 client for `settings`; `public`: one that names `public_endpoint` (to
    presign URLs for clients that reach S3 by another address: the signature covers it).

    Credentials: `access_key_id` with its secret from the environment or a file, else the
    standard AWS chain. Nothing is sent until the first call; a missing
    `secret_access_key_env` variable or unreadable file is a ConfigError here.
    """
    import boto3.session  # only here: a store is on S3
    from botocore.config import Config as BotoConfig

    endpoint = settings.endpoint
    if public and settings.public_endpoint:
        endpoint = settings.public_endpoint
    secret = settings.resolved_secret_access_key()
    session = boto3.session.Session(
        aws_access_key_id=settings.access_key_id if secret is not None else None,
        aws_secret_access_key=secret,
        region_name=settings.region,
    )
    # boto3 reads AWS_DEFAULT_REGION and the profile; ECS and EKS set AWS_REGION
    region = session.region_name or os.environ.get("AWS_REGION") or "us-east-1"
    config = BotoConfig(
        region_name=region,
        signature_version="s3v4",
        s3={"addressing_style": "path" if endpoint else "auto", "payload_signing_enabled": False},
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        retries={"mode": "standard", "total_max_attempts": ATTEMPTS},
        max_pool_connections=max_connections,
        tcp_keepalive=True,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        user_agent_appid=f"regproxy-{__version__}",
    )
    client = session.client("s3", endpoint_url=endpoint, config=config)
    for operation in ("PutObject", "UploadPart"):
        client.meta.events.register(f"before-parameter-build.s3.{operation}", _checksum_body)
    return client


def crc32_header(data: bytes | bytearray | memoryview, crc: int = 0) -> str:
    """The value of `x-amz-checksum-crc32` for `data` (following `crc`'s bytes)."""
    return base64.b64encode(zlib.crc32(data, crc).to_bytes(4, "big")).decode()


def _checksum_body(params: dict[str, Any], **_: Any) -> None:
    """Give a `PutObject` or `UploadPart` without one the CRC32 of its body: with the
    payload unsigned, that is what lets S3 refuse damaged bytes. A file body is read to
    its end and put back where it was."""
    if "ChecksumCRC32" in params:
        return
    body = params.get("Body", b"")
    if isinstance(body, str):
        body = body.encode()
    if isinstance(body, bytes | bytearray | memoryview):
        params["ChecksumCRC32"] = crc32_header(body)
        return
    start = body.tell()
    crc = 0
    buf = bytearray(CHECKSUM_BLOCK)
    while count := body.readinto(buf):
        crc = zlib.crc32(memoryview(buf)[:count], crc)
    body.seek(start)
    params["ChecksumCRC32"] = base64.b64encode(crc.to_bytes(4, "big")).decode()


def probe(client: Any, bucket: str, prefix: str) -> None:
    """Check that the store at s3://bucket/prefix is usable before serving from it.

    Lists the prefix (endpoint reachable, credentials valid, bucket there, listing
    allowed), then creates one object twice with `If-None-Match: *` (the second must be
    refused: without put-if-absent, processes sharing a store overwrite each other),
    swaps it with a stale `If-Match` (must be refused too: tags are compare-and-swapped),
    and deletes it. Raises ConfigError with one line naming the cause.
    """
    from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, NoCredentialsError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    where = S3Location(bucket, prefix).url
    endpoint = client.meta.endpoint_url
    folder = f"{prefix}/{PROBE_FOLDER}" if prefix else PROBE_FOLDER
    key = f"{folder}/{uuid.uuid4().hex}"
    step = "listing"
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", MaxKeys=1)
        step = "writing"  # with If-None-Match: *, as every write of content is
        client.put_object(Bucket=bucket, Key=key, Body=b"", IfNoneMatch="*")
        try:
            step = "a second conditional create"
            refused = _refusal(client.put_object, Bucket=bucket, Key=key, Body=b"", IfNoneMatch="*")
            _require_condition(refused, where, endpoint, "If-None-Match: * (create if absent)")
            step = "a conditional replace"
            stale = '"' + "0" * 32 + '"'
            refused = _refusal(client.put_object, Bucket=bucket, Key=key, Body=b"", IfMatch=stale)
            _require_condition(refused, where, endpoint, "If-Match (compare-and-swap)")
        finally:
            step = "deleting"
            client.delete_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        raise ConfigError(_explain(exc.response, where, endpoint, bucket, step)) from None
    except NoCredentialsError:
        raise ConfigError(
            f"{where}: no S3 credentials: set s3.access_key_id with s3.secret_access_key_env "
            "or s3.secret_access_key_file, or give the AWS chain some (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance or pod role)"
        ) from None
    except (BotoConnectionError, HTTPClientError) as exc:
        reason = _network_reason(exc)
        raise ConfigError(f"{where}: cannot reach the S3 endpoint {endpoint}: {reason}") from None
    except BotoCoreError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _network_reason(exc: Exception) -> str:
    """A short cause of a failed connection: `[Errno 111] Connection refused`, a timeout,
    or the TLS error in full."""
    from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError, SSLError

    if isinstance(exc, ConnectTimeoutError):
        return f"no connection within {CONNECT_TIMEOUT:g} s"
    if isinstance(exc, ReadTimeoutError):
        return f"no answer within {READ_TIMEOUT:g} s"
    cause = getattr(exc, "kwargs", {}).get("error")
    if cause is None:
        return str(exc)
    if isinstance(exc, SSLError):
        return f"TLS: {cause}"
    return str(cause).rsplit(": ", 1)[-1]


def _refusal(call: Any, **kwargs: Any) -> dict[str, Any] | None:
    """The error response of a call expected to be refused; None when it succeeded."""
    from botocore.exceptions import ClientError

    try:
        call(**kwargs)
    except ClientError as exc:
        return exc.response
    return None


def _require_condition(
    refused: dict[str, Any] | None, where: str, endpoint: str, condition: str
) -> None:
    """ConfigError unless `refused` is a condition failure (412, or AWS's race 409)."""
    if refused is None:
        raise ConfigError(
            f"{where}: the S3 endpoint {endpoint} does not honour conditional writes: "
            f"{condition} overwrote an existing object; regproxy needs them to share a store "
            "safely (AWS S3 and SeaweedFS 4.48 do)"
        )
    code = refused.get("Error", {}).get("Code", "")
    if code not in _CONDITION_FAILED:
        status = refused.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        raise ConfigError(
            f"{where}: the S3 endpoint {endpoint} does not honour conditional writes: "
            f"{condition} was answered {status} {code}, not 412 PreconditionFailed"
        )


def _explain(response: dict[str, Any], where: str, endpoint: str, bucket: str, step: str) -> str:
    """One line naming the cause of an S3 error answer during the probe."""
    error = response.get("Error", {})
    code = error.get("Code", "")
    message = error.get("Message", "")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    if code in ("NoSuchBucket", "404") or (status == 404 and step == "listing"):
        return f"{where}: no such bucket {bucket!r} at {endpoint}"
    if code == "InvalidAccessKeyId":
        return f"{where}: the S3 endpoint {endpoint} does not know this access key id"
    if code == "SignatureDoesNotMatch":
        return f"{where}: wrong secret access key (S3 answered SignatureDoesNotMatch)"
    if code in ("ExpiredToken", "InvalidToken", "TokenRefreshRequired"):
        return f"{where}: the S3 credentials have expired or are invalid ({code})"
    if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "301") or status == 301:
        region = headers.get("x-amz-bucket-region")
        found = f" (it is in {region})" if region else ""
        return f"{where}: the bucket is in another region than s3.region{found}"
    if code == "NotImplemented" or status == 501:
        return (
            f"{where}: the S3 endpoint {endpoint} does not honour conditional writes: "
            f"{status} {code} while {step} (If-None-Match / If-Match)"
        )
    if code == "InvalidBucketName":
        return f"{where}: the S3 endpoint {endpoint} refuses the bucket name {bucket!r}"
    if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
        return f"{where}: access denied while {step} (regproxy lists, reads, writes and deletes)"
    detail = f": {message}" if message else ""
    return f"{where}: S3 answered {status} {code} while {step}{detail}"
