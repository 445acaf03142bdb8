"""Hostile input: path traversal, oversized headers and pages, slow clients, forwarded headers.

Requests here are written byte for byte on raw sockets where a client library would
normalise or refuse them (`..`, `%2f`, NUL bytes, huge header blocks, stalled bodies).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from regproxy.config import Config
from regproxy.server import listings
from regproxy.server import runner as runner_mod
from regproxy.server.app import create_app
from tests.support.auth import PASSWORDS, Caller, RegistryFactory, auth_config, challenge_params
from tests.support.digests import sha256
from tests.support.inprocess import make_config
from tests.support.tree import all_files, bad_blobs, unexpected_paths

ROOT_AUTH = (
    "Authorization: Basic " + base64.b64encode(f"root:{PASSWORDS['root']}".encode()).decode()
)
DIGEST = sha256(b"x")


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator:
    """Start `create_app(config)` on a `GuardedRunner` (as `serve` does); yields a starter."""
    runners: list[web.AppRunner] = []

    async def start(config: Config) -> int:
        runner = runner_mod.GuardedRunner(
            create_app(config), handle_signals=False, keepalive_timeout=75
        )
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(runner.addresses[0][1])

    try:
        yield start
    finally:
        for runner in runners:
            await runner.cleanup()


async def exchange(
    port: int, head: str | bytes, body: bytes = b"", timeout: float = 10.0
) -> tuple[int, bytes]:
    """Send raw bytes (request head + body), read until the server closes; (status, head)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        data = head.encode("latin-1") if isinstance(head, str) else head
        writer.write(data + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    assert answer.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), answer[:200]
    return int(answer.split(b" ", 2)[1]), answer.partition(b"\r\n\r\n")[0]


def request_head(method: str, target: str, *headers: str, length: int | None = None) -> str:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return "\r\n".join(lines) + "\r\n\r\n"


# ---- path traversal ----------------------------------------------------------------------

BAD_NAMES = [
    "..", "../..", "../../outside", "a/../../../outside", "%2e%2e/%2e%2e/outside",
    "%2E%2E%2F%2E%2E%2Foutside", "a%2f..%2f..%2foutside", "/outside", "//outside",
    "a/%00/b", "a%00b", "x" * 300, "a/" * 130 + "b", "_tags/x", "a/_tags", "a/_manifests/sha256",
    ".hidden", "a/.x", "a\\..\\..\\outside", "A/B", "a//b", "a/b/", "%2froot", "p/../../outside",
    "a%2F..%2F..%2F..%2Foutside", "..%5c..%5coutside", "a/..%00/b", "a%0d%0ab", "a%20b",
]  # fmt: skip
BAD_REFERENCES = [
    "..", "../../x", "%2e%2e", "%2e%2e%2f%2e%2e%2fx", ".x", "x" * 200, "a%00", "a%2fb",
    "sha256:..%2f..%2fx", "sha256:" + "A" * 64, "sha256:" + "0" * 63, "sha512:../../x",
    "../sha256:" + "0" * 64, "%00", "-x", "a%0d%0aSet-Cookie:x",
]  # fmt: skip
BAD_UPLOAD_IDS = ["..", "../../x", "%2e%2e%2f%2e%2e%2fuploads", "0" * 31 + "/", "x%00"]


def traversal_requests() -> list[tuple[str, str, bytes]]:
    out: list[tuple[str, str, bytes]] = []
    for name in BAD_NAMES:
        for method in ("GET", "HEAD", "PUT", "DELETE"):
            out.append((method, f"/v2/{name}/manifests/latest", b"{}" if method == "PUT" else b""))
        out.append(("GET", f"/v2/{name}/blobs/{DIGEST}", b""))
        out.append(("DELETE", f"/v2/{name}/blobs/{DIGEST}", b""))
        out.append(("POST", f"/v2/{name}/blobs/uploads/", b""))
        out.append(("POST", f"/v2/{name}/blobs/uploads/?digest={DIGEST}", b"x"))
        out.append(("POST", f"/v2/ok/blobs/uploads/?mount={DIGEST}&from={name}", b""))
        out.append(("GET", f"/v2/{name}/tags/list", b""))
        out.append(("GET", f"/v2/{name}/referrers/{DIGEST}", b""))
    for ref in BAD_REFERENCES:
        for method in ("GET", "PUT", "DELETE"):
            out.append((method, f"/v2/ok/manifests/{ref}", b"{}" if method == "PUT" else b""))
        out.append(("GET", f"/v2/ok/blobs/{ref}", b""))
        out.append(("DELETE", f"/v2/ok/blobs/{ref}", b""))
        out.append(("POST", f"/v2/ok/blobs/uploads/?digest={ref}", b"x"))
        out.append(("GET", f"/v2/ok/referrers/{ref}", b""))
        out.append(("GET", f"/v2/ok/tags/list?last={ref}", b""))
    for upload_id in BAD_UPLOAD_IDS:
        for method in ("GET", "PATCH", "PUT", "DELETE"):
            query = f"?digest={DIGEST}" if method == "PUT" else ""
            out.append((method, f"/v2/ok/blobs/uploads/{upload_id}{query}", b"x"))
    out.append(("GET", "/v2/../../outside", b""))
    out.append(("GET", "/v2/%2e%2e/%2e%2e/outside/canary", b""))
    out.append(("GET", "/../outside/canary", b""))
    return out


@pytest.mark.parametrize("who", ["open", "admin", "anonymous"])
async def test_path_traversal_never_touches_the_filesystem_outside_the_stores(
    tmp_path: Path, serve, who: str
) -> None:
    """No auth; Basic admin (past every rule); anonymous in token mode (challenged: the
    challenge must survive names with CR/LF or quotes)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_text("canary")
    base = tmp_path / "srv" / "a" / "b"  # deep, so `../..` from a store lands in tmp_path
    mode = "token" if who == "anonymous" else "basic"
    keys = {} if who == "open" else {"auth": auth_config(tmp_path, mode)}
    config = make_config(base, **keys)
    port = await serve(config)
    before = all_files(tmp_path)
    headers = (ROOT_AUTH,) if who == "admin" else ()
    wrong: list[str] = []
    for method, target, body in traversal_requests():
        head = request_head(method, target, *headers, length=len(body))
        status, answer = await exchange(port, head, body)
        # a mount from an invalid source is a plain new upload session (202), as the spec says
        expected = (202,) if "?mount=" in target and who != "anonymous" else range(400, 500)
        if status not in expected:
            wrong.append(f"{status} {method} {target[:100]}")
        if status == 401 and b"\r\nWWW-Authenticate: " not in answer:
            wrong.append(f"401 without a challenge: {method} {target[:100]}")
    assert wrong == []
    assert (outside / "canary").read_text() == "canary"
    assert sorted(os.listdir(outside)) == ["canary"]
    assert unexpected_paths(config, tmp_path, allowed=frozenset(before)) == []
    assert bad_blobs(config.registry_storage) == []


# ---- oversized requests --------------------------------------------------------------------


async def test_huge_headers_are_refused_with_4xx(tmp_path: Path, serve) -> None:
    config = make_config(tmp_path, auth=auth_config(tmp_path, "token"))
    port = await serve(config)
    cases = {
        "one 64 KiB header": request_head("GET", "/v2/", "X-Big: " + "a" * 65536),
        "one 17 KiB header": request_head("GET", "/v2/", "X-Big: " + "a" * 17000),
        "1000 headers": request_head("GET", "/v2/", *(f"X-H{i}: v" for i in range(1000))),
        "64 KiB request line": request_head("GET", "/v2/" + "a" * 65536 + "/tags/list"),
        "huge Authorization": request_head("GET", "/v2/", "Authorization: Basic " + "A" * 60000),
        "huge bearer token": request_head("GET", "/v2/", "Authorization: Bearer " + "a." * 7000),
        "huge Content-Length": request_head("PUT", "/v2/a/manifests/x", length=10**30),
        "negative Content-Length": request_head("PUT", "/v2/a/manifests/x", "Content-Length: -1"),
        "huge Content-Range": request_head(
            "PATCH", "/v2/a/blobs/uploads/" + "0" * 32, "Content-Range: 0-" + "9" * 5000
        ),
    }
    for what, head in cases.items():
        status, _ = await exchange(port, head)
        assert 400 <= status < 500, (what, status)
    # the server is fine afterwards
    status, _ = await exchange(port, request_head("GET", "/v2/"))
    assert status == 401


async def test_page_size_is_capped(tmp_path: Path, serve, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(tmp_path)
    port = await serve(config)
    manifest = (
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        b'"config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":'
        b'"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},'
        b'"layers":[]}'
    )
    empty = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    content_type = "Content-Type: application/vnd.oci.image.manifest.v1+json"
    for repo in ("r1", "r2", "r3", "r4", "r5"):
        head = request_head("POST", f"/v2/{repo}/blobs/uploads/?digest={empty}", length=2)
        assert (await exchange(port, head, b"{}"))[0] == 201
        for tag in ("t1", "t2", "t3", "t4", "t5"):
            head = request_head(
                "PUT", f"/v2/{repo}/manifests/{tag}", content_type, length=len(manifest)
            )
            assert (await exchange(port, head, manifest))[0] == 201
    monkeypatch.setattr(listings, "MAX_PAGE", 3)
    for target in ("/v2/r1/tags/list", "/v2/_catalog"):
        for n in ("4", "99999999", "9" * 40, "9" * 5000):
            status, head = await exchange(port, request_head("GET", f"{target}?n={n}"))
            assert status == 200, (target, n[:20], status)
            assert b'rel="next"' in head and b"n=3" in head, head
        for n in ("-1", "1e9", "0x10", "%C2%B2", "1.5"):
            status, _ = await exchange(port, request_head("GET", f"{target}?n={n}"))
            assert status == 400, (target, n)


async def test_proxy_tag_pages_are_checked_and_capped_before_the_upstream(
    registry_factory: RegistryFactory,
) -> None:
    """`n` on a proxied tags/list is validated and capped here, not passed on as sent (an
    upstream refusing a silly `n` would otherwise look like an outage: 503)."""
    registry = await registry_factory("basic", seed=False)
    root = Caller("root")
    for n in ("-1", "1e3", "%C2%B2", "0x10"):
        path = f"/v2/p/up/lib/app/tags/list?n={n}"
        result = await root.request(registry.client, "basic", "GET", path)
        assert result.status == 400, (n, result)
        assert result.codes() == ["PAGINATION_NUMBER_INVALID"]
    for n in ("1", "99999999", "9" * 60):
        path = f"/v2/p/up/lib/app/tags/list?n={n}"
        result = await root.request(registry.client, "basic", "GET", path)
        assert result.status == 200, (n, result)
        assert result.json()["tags"] == ["v1"]


# ---- slow clients --------------------------------------------------------------------------


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before closing; fails if it is still open after `seconds`."""
    try:
        return await asyncio.wait_for(reader.read(), seconds)
    except asyncio.TimeoutError:
        pytest.fail(f"the server kept a stalled connection open for {seconds} s")


async def test_slow_loris_connections_are_closed(
    tmp_path: Path, serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner_mod, "HEADER_TIMEOUT", 1.0)
    port = await serve(make_config(tmp_path))

    async def stalled(first: bytes, trickle: bytes = b"") -> float:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(first)
            await writer.drain()
            for byte in trickle:  # one byte every 0.2 s: never completes the head in time
                await asyncio.sleep(0.2)
                if reader.at_eof():
                    break
                writer.write(bytes([byte]))
            await _closed_within(reader, 4.0)
        finally:
            writer.close()
        return time.monotonic() - started

    elapsed = await asyncio.gather(
        stalled(b""),  # connects, sends nothing
        stalled(b"GET /v2/ HT"),  # a partial request line
        stalled(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-A: "),  # partial headers
        stalled(b"G", b"ET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: a\r\n" * 20),
    )
    assert all(0.9 <= e < 4.0 for e in elapsed), elapsed
    # meanwhile, and afterwards, a normal client is served at once
    status, _ = await exchange(port, request_head("GET", "/v2/"), timeout=2)
    assert status == 200


@pytest.mark.parametrize(
    "kind", ["patch", "monolithic", "manifest", "chunked-patch"]
)  # fmt: skip
async def test_a_stalled_request_body_is_cut_after_body_timeout(
    tmp_path: Path, serve, kind: str
) -> None:
    config = make_config(tmp_path, server={"body_timeout": "1s"})
    port = await serve(config)
    status, head = await exchange(port, request_head("POST", "/v2/slow/blobs/uploads/"))
    assert status == 202
    location = next(
        line.split(b": ", 1)[1].decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"location:")
    )
    heads = {
        "patch": request_head("PATCH", location, length=1000),
        "monolithic": request_head("POST", f"/v2/slow/blobs/uploads/?digest={DIGEST}", length=1000),
        "manifest": request_head("PUT", "/v2/slow/manifests/v1", length=1000),
        "chunked-patch": request_head("PATCH", location, "Transfer-Encoding: chunked"),
    }
    first = b"a" * 10 if kind != "chunked-patch" else b"a\r\n" + b"a" * 10 + b"\r\n"
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(heads[kind].encode() + first)
        await writer.drain()
        await _closed_within(reader, 5.0)
    finally:
        writer.close()
    assert 0.9 <= time.monotonic() - started < 5.0
    # the upload that was stalled is still consistent and usable: a PATCH keeps the bytes
    # that arrived before the stall, so the client can resume after them
    status, head = await exchange(port, request_head("GET", location))
    assert status == 204
    kept = b"Range: 0-9" if kind in ("patch", "chunked-patch") else b"Range: 0-0"
    assert kept in head
    status, _ = await exchange(port, request_head("PATCH", location, length=3), b"abc")
    assert status == 202
    await asyncio.sleep(0.1)
    uploads = Path(config.temporary_registry_storage) / "uploads"
    assert len(os.listdir(uploads)) == 1  # only the session created above
    assert unexpected_paths(config, tmp_path, allowed=frozenset(all_files(tmp_path))) == []
    assert not list((Path(config.registry_storage) / "repositories").glob("slow/_manifests/*/*"))


async def test_a_stalled_token_request_form_is_cut_after_body_timeout(
    tmp_path: Path, serve
) -> None:
    config = make_config(
        tmp_path, auth=auth_config(tmp_path, "token"), server={"body_timeout": "1s"}
    )
    port = await serve(config)
    head = request_head(
        "POST", "/auth/token", "Content-Type: application/x-www-form-urlencoded", length=500
    )
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode() + b"grant_type=pass")
        await writer.drain()
        await _closed_within(reader, 5.0)
    finally:
        writer.close()
    assert time.monotonic() - started < 5.0
    status, _ = await exchange(port, request_head("GET", "/auth/token?service=regproxy"))
    assert status == 200


# ---- reverse proxies -----------------------------------------------------------------------


@pytest.mark.parametrize("trusted", [False, True])
async def test_forwarded_headers_only_when_trusted(tmp_path: Path, serve, trusted: bool) -> None:
    config = make_config(
        tmp_path,
        auth=auth_config(tmp_path, "token"),
        server={"trust_forwarded_headers": trusted},
    )
    port = await serve(config)
    forwarded = ("X-Forwarded-Proto: https", "X-Forwarded-Host: registry.example.test")
    status, head = await exchange(port, request_head("GET", "/v2/", *forwarded))
    assert status == 401
    header = next(
        line.split(b": ", 1)[1].decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"www-authenticate:")
    )
    realm = challenge_params(header)[1]["realm"]
    if trusted:
        assert realm == "https://registry.example.test/auth/token"
    else:
        assert realm == "http://127.0.0.1/auth/token"  # the request's own Host header
    # uploads answer relative Locations: nothing to forge there either way
    status, head = await exchange(
        port, request_head("POST", "/v2/public/x/blobs/uploads/", *forwarded, ROOT_AUTH)
    )
    assert status == 202
    assert b"\r\nLocation: /v2/public/x/blobs/uploads/" in head
