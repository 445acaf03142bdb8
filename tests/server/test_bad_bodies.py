"""Bad request bodies get a clear 4xx at once (issue 11, items 7, 8 and 12).

Content codings are refused before a byte of the body is read (a gzip body that
does not inflate was a 500; a deflate stream that never ends held the request for
60 s). Manifests with NaN/Infinity or sizes beyond int64 are refused: clients in
Go and Java cannot parse them.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from regproxy import manifest as mf
from tests.support.digests import sha256
from tests.support.inprocess import make_config, start_client


@pytest.fixture
async def client(tmp_path: Path):
    client = await start_client(make_config(tmp_path))
    try:
        yield client
    finally:
        await client.close()


async def _upload_url(client: TestClient) -> str:
    async with client.post("/v2/bad/app/blobs/uploads/") as resp:
        assert resp.status == 202
        return resp.headers["Location"]


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "x-unknown"])
@pytest.mark.parametrize("body", [b"not compressed at all", zlib.compress(b"{}")])
async def test_content_codings_are_refused(client: TestClient, coding: str, body: bytes) -> None:
    headers = {"Content-Encoding": coding}
    upload = await _upload_url(client)
    requests = [
        ("PUT", "/v2/bad/app/manifests/v1", {"Content-Type": mf.OCI_MANIFEST}),
        ("PATCH", upload, {}),
        ("POST", "/v2/bad/app/blobs/uploads/", {}),
        ("POST", f"/v2/bad/app/blobs/uploads/?digest={sha256(body)}", {}),
        ("PUT", f"{upload}?digest={sha256(body)}", {}),
    ]
    for method, path, extra in requests:
        async with client.request(method, path, data=body, headers={**headers, **extra}) as resp:
            assert resp.status == 400, (method, path, resp.status)
            error = (await resp.json())["errors"][0]
            assert error["code"] == "UNSUPPORTED"
            assert "Content-Encoding" in error["message"]


async def test_a_deflate_stream_that_never_ends_is_answered_at_once(client: TestClient) -> None:
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    head = (
        "PUT /v2/bad/app/manifests/v1 HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: {mf.OCI_MANIFEST}\r\nContent-Encoding: deflate\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    writer.write(head.encode())
    compressor = zlib.compressobj()
    piece = compressor.compress(b"[" * 300_000) + compressor.flush(zlib.Z_SYNC_FLUSH)
    writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")  # and never the last chunk
    await writer.drain()
    started = time.monotonic()
    status = await asyncio.wait_for(reader.readline(), 5)
    assert status.startswith(b"HTTP/1.1 400"), status
    assert time.monotonic() - started < 5
    writer.close()


async def test_the_token_form_with_a_content_coding_is_refused(tmp_path: Path) -> None:
    from tests.support.auth import auth_config

    client = await start_client(make_config(tmp_path, auth=auth_config(tmp_path, "token")))
    try:
        headers = {
            "Content-Encoding": "gzip",
            "Content-Type": "application/x-www-form-urlencoded",
        }
        async with client.post("/auth/token", data=b"\x1f\x8b garbage", headers=headers) as resp:
            assert resp.status == 400
            assert (await resp.json())["errors"][0]["code"] == "UNSUPPORTED"
    finally:
        await client.close()


def _manifest(**overrides: object) -> bytes:
    config = b"{}"
    doc: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(config),
            "size": len(config),
        },
        "layers": [],
        **overrides,
    }
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "body",
    [
        _manifest(extra=float("nan")),
        _manifest(extra=float("inf")),
        _manifest(extra=float("-inf")),
        _manifest().replace(b'"size": 2', b'"size": 9223372036854775808'),
        _manifest().replace(b'"size": 2', b'"size": 1e30'),
        _manifest().replace(b'"size": 2', b'"size": ' + b"9" * 5000),
        b"[" * 100_000 + b"]" * 100_000,
        b"[" + b"{}," * 150_000 + b"{}]",
        b'{"schemaVersion": 2, "layers": [' + b"1," * 300_000 + b"1]}",
    ],
    ids=["nan", "inf", "-inf", "int64+1", "float", "5000 digits", "nested", "dense", "flat"],
)
async def test_manifests_clients_cannot_parse_are_refused(client: TestClient, body: bytes) -> None:
    headers = {"Content-Type": mf.OCI_MANIFEST}
    async with client.put("/v2/bad/app/manifests/v1", data=body, headers=headers) as resp:
        assert resp.status == 400, resp.status
        assert (await resp.json())["errors"][0]["code"] == "MANIFEST_INVALID"


def test_the_largest_int64_size_is_still_a_size() -> None:
    body = _manifest().replace(b'"size": 2', b'"size": 9223372036854775807')
    assert mf.parse(body).blobs[0].size == 2**63 - 1
