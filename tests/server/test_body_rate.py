"""`server.body_min_rate`: request bodies trickled too slowly to ever trip `body_timeout`.

A client sending one byte every 0.3 s never stays silent for `body_timeout`, yet would hold
its connection (and upload session) for ever. After a grace period equal to
`body_timeout`, a body averaging less than `body_min_rate` bytes/s is cut off like a
stalled one, on both body paths: aiohttp's (small bodies, manifests) and `sockbody.pump`
(large Content-Length bodies). Uploads at or above the minimum go through.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from regproxy.server import runner as runner_mod
from regproxy.server.app import create_app
from regproxy.sockbody import DIRECT_MIN
from tests.support.digests import sha256
from tests.support.inprocess import make_config
from tests.support.proxy import wait_until
from tests.support.served import (
    ServedRegistry as Registry,
)
from tests.support.served import (
    finish_upload,
    get_blob,
    request_head,
    start_session,
    upload_id,
    upload_offset,
)

MIB = 1024 * 1024
#: the knobs every test here runs with: 1 s of grace, then at least 100 bytes/s
RATE = {"body_timeout": "1s", "body_min_rate": 100}
CLOSE = "Connection: close"


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Registry]]]:
    """A regproxy app on a `GuardedRunner` (as `regproxy serve` runs it) on 127.0.0.1."""
    started: list[Registry] = []

    async def start(**server: object) -> Registry:
        config = make_config(tmp_path, server=server)
        app = create_app(config)
        runner = runner_mod.GuardedRunner(app, handle_signals=False, keepalive_timeout=75)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = int(runner.addresses[0][1])
        http = aiohttp.ClientSession(
            base_url=f"http://127.0.0.1:{port}", timeout=aiohttp.ClientTimeout(total=30)
        )
        registry = Registry(config, app, runner, port, http)
        started.append(registry)
        return registry

    try:
        yield start
    finally:
        for registry in started:
            for writer in registry.sockets:
                writer.close()
            await registry.http.close()
            await registry.stop()


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read()
    except ConnectionError:
        return b""


async def send_slowly(
    registry: Registry, head: bytes, body: bytes, piece: int, every: float, limit: float = 8.0
) -> tuple[float, bytes]:
    """Send `head`, then `body` in `piece`-byte pieces every `every` s, until the body is
    sent or the server closes the connection. Returns (seconds from the first body byte
    until the server closed, everything it answered); fails after `limit` seconds."""
    reader, writer = await registry.connect()
    writer.write(head)
    await writer.drain()
    started = time.monotonic()
    answer = asyncio.ensure_future(_read_all(reader))
    try:
        for start in range(0, len(body), piece):
            if answer.done():
                break
            assert time.monotonic() - started < limit, "still sending: the body was not cut off"
            try:
                writer.write(body[start : start + piece])
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.wait({answer}, timeout=every)
        data = await asyncio.wait_for(answer, timeout=limit)
    finally:
        answer.cancel()
        writer.close()
    return time.monotonic() - started, data


def status_of(answer: bytes) -> int | None:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


def manifest_bytes(size: int) -> bytes:
    """A manifest-shaped JSON body of exactly `size` bytes (its content is never reached)."""
    doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}
    text = json.dumps(doc)
    return (text[:-1] + ', "pad": "' + "x" * (size - len(text) - 10) + '"}').encode()


# ---- trickles are cut off ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "size"),
    [
        ("patch", 1000),
        ("put", 1000),
        ("monolithic", 1000),
        ("manifest", 1000),
        ("large-patch", 2 * MIB),  # sockbody.pump
        ("large-put", DIRECT_MIN + 5),  # sockbody.pump
    ],
)
async def test_a_body_trickled_a_byte_at_a_time_is_cut_off(serve, kind: str, size: int) -> None:
    registry = await serve(**RATE)
    data = manifest_bytes(size) if kind == "manifest" else os.urandom(size)
    location = await start_session(registry.http, "slow/trickle")
    targets = {
        "patch": ("PATCH", location),
        "put": ("PUT", f"{location}?digest={sha256(data)}"),
        "monolithic": ("POST", f"/v2/slow/trickle/blobs/uploads/?digest={sha256(data)}"),
        "manifest": ("PUT", "/v2/slow/trickle/manifests/v1"),
        "large-patch": ("PATCH", location),
        "large-put": ("PUT", f"{location}?digest={sha256(data)}"),
    }
    method, target = targets[kind]
    content_type = "Content-Type: application/vnd.oci.image.manifest.v1+json"
    head = request_head(method, target, content_type, CLOSE, length=len(data))
    # one byte every 0.3 s: never silent for body_timeout (1 s), 3 bytes/s on average
    elapsed, answer = await send_slowly(registry, head, data, piece=1, every=0.3)
    assert 0.9 <= elapsed < 4.0, elapsed
    if kind.startswith("large"):
        # read by threads: the answer goes out, then the connection closes
        assert status_of(answer) == 400, answer[:300]
        assert b"BLOB_UPLOAD_INVALID" in answer
        assert b"bytes/s" in answer
    else:
        # read by aiohttp: closed at once, as a stalled body is
        assert status_of(answer) in (None, 400), answer[:300]
    # the server goes on serving; the session that got the trickle is consistent and
    # can be resumed from the offset it reports
    assert (await registry.http.get("/v2/")).status == 200
    if kind == "monolithic":
        # its own session is dropped (just after the close); the one opened above stays
        await wait_until(lambda: len(list(registry.uploads_root.iterdir())) == 1)
        assert [p.name for p in registry.uploads_root.iterdir()] == [upload_id(location)]
    if kind == "manifest":
        resp = await registry.http.get("/v2/slow/trickle/manifests/v1")
        assert resp.status == 404
        return
    offset = await upload_offset(registry.http, location)
    stored = registry.data_file(location).read_bytes()
    assert len(stored) == offset
    assert stored == data[:offset]
    await finish_upload(registry.http, location, data, offset)
    assert await get_blob(registry.http, "slow/trickle", sha256(data)) == data


async def test_a_large_body_below_the_rate_is_cut_though_it_never_pauses(serve) -> None:
    """Not only trickles: 100 KiB/s against a 200 KiB/s minimum, in 50 KiB steps."""
    registry = await serve(body_timeout="1s", body_min_rate="200KiB")
    data = os.urandom(DIRECT_MIN + 300 * 1024)
    location = await start_session(registry.http, "slow/steady")
    head = request_head("PATCH", location, CLOSE, length=len(data))
    elapsed, answer = await send_slowly(registry, head, data, piece=50 * 1024, every=0.5)
    assert 0.9 <= elapsed < 4.0, elapsed
    # the 400 is sent, then the socket closed with the client's unread bytes in it: the
    # kernel answers those with a reset, which can reach the client before it has read the
    # 400 (then it sees the connection cut). Either way it is cut off in time.
    assert answer == b"" or status_of(answer) == 400, answer[:300]
    offset = await upload_offset(registry.http, location)
    assert 0 < offset < len(data)
    assert registry.data_file(location).read_bytes() == data[:offset]


# ---- uploads at or above the minimum -------------------------------------------------------


async def test_a_small_body_above_the_rate_outlasts_the_grace_period(serve) -> None:
    """300 bytes/s for 2 s against a minimum of 100: a rate, not a deadline."""
    registry = await serve(**RATE)
    data = os.urandom(600)
    location = await start_session(registry.http, "slow/ok")
    head = request_head("PATCH", location, CLOSE, length=len(data))
    elapsed, answer = await send_slowly(registry, head, data, piece=30, every=0.1)
    assert elapsed > 1.5, "took longer than the grace period"
    assert status_of(answer) == 202, answer[:300]
    await finish_upload(registry.http, location, data, len(data))
    assert await get_blob(registry.http, "slow/ok", sha256(data)) == data


async def test_a_large_body_above_the_rate_outlasts_the_grace_period(serve) -> None:
    """400 KiB/s for about 3 s against a minimum of 200 KiB/s, on the threads' path."""
    registry = await serve(body_timeout="1s", body_min_rate="200KiB")
    data = os.urandom(DIRECT_MIN + 300 * 1024)
    location = await start_session(registry.http, "slow/steady-ok")
    head = request_head("PATCH", location, CLOSE, length=len(data))
    elapsed, answer = await send_slowly(registry, head, data, piece=100 * 1024, every=0.25)
    assert elapsed > 1.5, "took longer than the grace period"
    assert status_of(answer) == 202, answer[:300]
    await finish_upload(registry.http, location, data, len(data))
    assert await get_blob(registry.http, "slow/steady-ok", sha256(data)) == data


async def test_fast_uploads_are_unaffected(serve) -> None:
    registry = await serve(**RATE)
    http = registry.http
    small, large = os.urandom(200 * 1024), os.urandom(3 * MIB + 7)
    location = await start_session(http, "fast/app")
    await finish_upload(http, location, small, 0)
    resp = await http.post(f"/v2/fast/app/blobs/uploads/?digest={sha256(large)}", data=large)
    assert resp.status == 201, await resp.text()
    assert await get_blob(http, "fast/app", sha256(small)) == small
    assert await get_blob(http, "fast/app", sha256(large)) == large
