"""Large upload bodies read past aiohttp (`server.bodies.take_body` + `sockbody.pump`).

Bodies of at least `DIRECT_MIN` bytes with a Content-Length arrive through worker threads
reading the socket; the connection is closed after the answer. Here: every way to push a
large blob (monolithic POST, POST+PUT, PATCHes+PUT) stores the exact bytes; bad digests,
clients that vanish or stall mid-body, and a server shutdown mid-body leave the upload
area consistent; bodies below the threshold keep the connection alive.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from regproxy.config import Config
from regproxy.server.keys import OFFLOAD
from regproxy.sockbody import BLOCK, DIRECT_MIN
from regproxy.storage import uploads as uploads_mod
from tests.support.certs import TestCA
from tests.support.digests import sha256
from tests.support.inprocess import make_config
from tests.support.oci import assert_error, stored_files
from tests.support.proxy import wait_until
from tests.support.served import (
    ServedRegistry,
    blob_status,
    closed_by_server,
    closes,
    finish_upload,
    get_blob,
    read_answer,
    request_head,
    serve_registry,
    start_session,
    upload_id,
    upload_offset,
)

MIB = 1024 * 1024


# ---- helpers -------------------------------------------------------------------------------


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ServedRegistry]]]:
    """Start regproxy the way `regproxy serve` does (default: a fresh configuration);
    everything started is closed at teardown."""
    started: list[ServedRegistry] = []

    async def start(
        config: Config | None = None,
        shutdown_timeout: float = 60.0,
        client_ssl: ssl.SSLContext | None = None,
    ) -> ServedRegistry:
        registry = await serve_registry(
            config or make_config(tmp_path),
            shutdown_timeout=shutdown_timeout,
            client_ssl=client_ssl,
        )
        started.append(registry)
        return registry

    try:
        yield start
    finally:
        for registry in started:
            await registry.close()


# ---- whole bodies, every way to push ---------------------------------------------------------


@pytest.mark.parametrize("o_direct", ["past-threshold", "from-the-start"])
async def test_large_monolithic_post(
    client: TestClient, config: Config, monkeypatch: pytest.MonkeyPatch, o_direct: str
) -> None:
    if o_direct == "from-the-start":
        monkeypatch.setattr(uploads_mod, "DIRECT_FROM", 0)
    data = os.urandom(4 * MIB + 123)
    digest = sha256(data)
    resp = await client.post(f"/v2/big/mono/blobs/uploads/?digest={digest}", data=data)
    assert resp.status == 201, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Location"] == f"/v2/big/mono/blobs/{digest}"
    assert closes(resp), "a body read past aiohttp ends its connection"
    assert await get_blob(client, "big/mono", digest) == data
    assert not any(f.startswith("tmp/uploads/") for f in stored_files(config))


async def test_post_then_put_with_the_whole_body(client: TestClient) -> None:
    data = os.urandom(3 * MIB + 5)
    location = await start_session(client, "big/put")
    resp = await client.put(f"{location}?digest={sha256(data)}", data=data)
    assert resp.status == 201, await resp.text()
    assert closes(resp)
    assert await get_blob(client, "big/put", sha256(data)) == data


@pytest.mark.parametrize("o_direct", ["past-threshold", "from-the-start"])
@pytest.mark.parametrize(
    "sizes",
    [
        (MIB + MIB // 2 + 37, 2 * MIB + 1, MIB + 4095),  # odd sizes: odd session offsets
        (MIB, 2 * MIB, 4096 * 300),  # page multiples: aligned offsets all along
        (DIRECT_MIN - 1, 2 * MIB + 3, 100),  # normal, direct, normal
    ],
)
async def test_chunked_patches_then_put(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, sizes: tuple[int, ...], o_direct: str
) -> None:
    """Each PATCH appends exactly its bytes, whether the session's file is written through
    the page cache (the first `DIRECT_FROM` bytes) or with O_DIRECT (made to start at 0)."""
    if o_direct == "from-the-start":
        monkeypatch.setattr(uploads_mod, "DIRECT_FROM", 0)
    data = os.urandom(sum(sizes))
    location = await start_session(client, "big/chunks")
    start = 0
    for size in sizes:
        piece = data[start : start + size]
        resp = await client.patch(
            location, data=piece, headers={"Content-Range": f"{start}-{start + size - 1}"}
        )
        assert resp.status == 202, await resp.text()
        assert resp.headers["Range"] == f"0-{start + size - 1}"
        assert closes(resp) == (size >= DIRECT_MIN)
        location = resp.headers["Location"]
        start += size
        assert await upload_offset(client, location) == start
    resp = await client.put(f"{location}?digest={sha256(data)}")
    assert resp.status == 201, await resp.text()
    assert await get_blob(client, "big/chunks", sha256(data)) == data


async def test_patch_without_content_range_then_large_final_put(client: TestClient) -> None:
    data = os.urandom(MIB + MIB // 2 + 37 + 2 * MIB + 11)
    first = MIB + MIB // 2 + 37
    location = await start_session(client, "big/final")
    resp = await client.patch(location, data=data[:first])
    assert resp.status == 202, await resp.text()
    assert resp.headers["Range"] == f"0-{first - 1}"
    resp = await client.put(
        f"{resp.headers['Location']}?digest={sha256(data)}",
        data=data[first:],
        headers={"Content-Range": f"{first}-{len(data) - 1}"},
    )
    assert resp.status == 201, await resp.text()
    assert closes(resp)
    assert await get_blob(client, "big/final", sha256(data)) == data


async def test_exactly_direct_min_is_taken_over(client: TestClient) -> None:
    data = os.urandom(DIRECT_MIN)
    resp = await client.post(f"/v2/edge/blobs/uploads/?digest={sha256(data)}", data=data)
    assert resp.status == 201, await resp.text()
    assert closes(resp)
    assert await get_blob(client, "edge", sha256(data)) == data


async def test_several_large_uploads_at_once(client: TestClient) -> None:
    blobs = [os.urandom(2 * MIB + i * 4097) for i in range(4)]

    async def push(i: int, data: bytes) -> None:
        resp = await client.post(f"/v2/many/{i}/blobs/uploads/?digest={sha256(data)}", data=data)
        assert resp.status == 201, await resp.text()

    await asyncio.gather(*(push(i, data) for i, data in enumerate(blobs)))
    for i, data in enumerate(blobs):
        assert await get_blob(client, f"many/{i}", sha256(data)) == data


async def test_wrong_digest_on_a_large_monolithic_body(client: TestClient, config: Config) -> None:
    data = os.urandom(3 * MIB + 1)
    wrong = sha256(b"something else")
    before = stored_files(config)
    resp = await client.post(f"/v2/big/wrong/blobs/uploads/?digest={wrong}", data=data)
    await assert_error(resp, 400, "DIGEST_INVALID")
    assert closes(resp)
    assert stored_files(config) == before, "nothing stored, no session left behind"
    assert await blob_status(client, "big/wrong", wrong) == 404
    assert await blob_status(client, "big/wrong", sha256(data)) == 404


async def test_wrong_digest_on_a_large_put_drops_the_session(
    client: TestClient, config: Config
) -> None:
    data = os.urandom(2 * MIB + 9)
    location = await start_session(client, "big/wrongput")
    resp = await client.put(f"{location}?digest={sha256(b'other')}", data=data)
    await assert_error(resp, 400, "DIGEST_INVALID")
    assert await blob_status(client, "big/wrongput", sha256(data)) == 404
    assert not any(f.startswith("tmp/uploads/") for f in stored_files(config))


async def test_content_range_mismatch_on_a_large_patch(client: TestClient) -> None:
    """Content-Length and Content-Range disagree: refused before any byte is stored."""
    data = os.urandom(2 * MIB)
    location = await start_session(client, "big/mismatch")
    resp = await client.patch(location, data=data, headers={"Content-Range": f"0-{MIB - 1}"})
    await assert_error(resp, 400, "SIZE_INVALID")
    assert await upload_offset(client, location) == 0
    await finish_upload(client, location, data, 0)
    assert await get_blob(client, "big/mismatch", sha256(data)) == data


# ---- below the threshold, or not length-framed: through aiohttp, connection kept ----------


async def test_a_body_just_below_direct_min_keeps_the_connection(serve) -> None:
    registry = await serve()
    data = os.urandom(DIRECT_MIN - 1)
    reader, writer = await registry.connect()
    head = request_head("POST", f"/v2/small/blobs/uploads/?digest={sha256(data)}", length=len(data))
    writer.write(head + data)
    await writer.drain()
    answer = await read_answer(reader)
    assert answer.status == 201, answer.body
    assert answer.headers.get("connection", "").lower() != "close"
    # the same connection carries the next request
    writer.write(request_head("GET", "/v2/"))
    await writer.drain()
    assert (await read_answer(reader)).status == 200
    assert await get_blob(registry.http, "small", sha256(data)) == data


async def test_a_large_body_closes_the_connection_after_the_answer(serve) -> None:
    registry = await serve()
    data = os.urandom(DIRECT_MIN + 1)
    reader, writer = await registry.connect()
    head = request_head("POST", f"/v2/large/blobs/uploads/?digest={sha256(data)}", length=len(data))
    writer.write(head + data)
    await writer.drain()
    answer = await read_answer(reader)
    assert answer.status == 201, answer.body
    assert answer.headers.get("connection", "").lower() == "close"
    assert await closed_by_server(reader)
    assert await get_blob(registry.http, "large", sha256(data)) == data


async def test_a_large_chunked_body_is_not_taken_over(client: TestClient) -> None:
    """Transfer-Encoding: chunked has no length to hand to the pump: aiohttp reads it."""
    data = os.urandom(3 * MIB + 77)

    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 256 * 1024):
            yield data[start : start + 256 * 1024]

    location = await start_session(client, "big/te")
    resp = await client.patch(location, data=body())
    assert resp.status == 202, await resp.text()
    assert not closes(resp)
    await finish_upload(client, resp.headers["Location"], data, len(data))
    assert await get_blob(client, "big/te", sha256(data)) == data


async def test_a_large_body_over_tls_goes_through_aiohttp(serve, tmp_path: Path) -> None:
    """TLS: the socket carries ciphertext, so the body is never taken over."""
    ca = TestCA(tmp_path / "ca")
    cert = ca.issue(tmp_path / "cert")
    config = make_config(
        tmp_path,
        server={"tls_certificate": str(cert.certificate), "tls_key": str(cert.key)},
    )
    registry = await serve(config, client_ssl=ssl.create_default_context(cafile=ca.ca_file))
    data = os.urandom(3 * MIB + 11)
    resp = await registry.http.post(f"/v2/big/tls/blobs/uploads/?digest={sha256(data)}", data=data)
    assert resp.status == 201, await resp.text()
    assert not closes(resp)
    location = await start_session(registry.http, "big/tls")
    resp = await registry.http.patch(
        location, data=data, headers={"Content-Range": f"0-{len(data) - 1}"}
    )
    assert resp.status == 202, await resp.text()
    assert not closes(resp)
    await finish_upload(registry.http, resp.headers["Location"], data, len(data))
    assert await get_blob(registry.http, "big/tls", sha256(data)) == data


async def test_expect_100_continue_before_a_large_body(serve) -> None:
    """Clients such as curl wait for `100 Continue` before sending a large body."""
    registry = await serve()
    data = os.urandom(2 * MIB + 3)
    location = await start_session(registry.http, "big/expect")
    reader, writer = await registry.connect()
    writer.write(request_head("PATCH", location, "Expect: 100-continue", length=len(data)))
    await writer.drain()
    async with asyncio.timeout(10):
        interim = await reader.readuntil(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100"), interim
    writer.write(data)
    await writer.drain()
    answer = await read_answer(reader)
    assert answer.status == 202, answer.body
    assert answer.headers["range"] == f"0-{len(data) - 1}"
    await finish_upload(registry.http, location, data, len(data))
    assert await get_blob(registry.http, "big/expect", sha256(data)) == data


# ---- clients that vanish or stall mid-body --------------------------------------------------


@pytest.mark.parametrize("with_range", [False, True])
async def test_client_closing_mid_body_leaves_a_consistent_session(serve, with_range: bool) -> None:
    registry = await serve()
    data = os.urandom(4 * MIB + 333)
    announced = 3 * MIB
    sent = 2 * MIB + MIB // 2 + 100
    location = await start_session(registry.http, "big/cut")
    _reader, writer = await registry.connect()
    headers = [f"Content-Range: 0-{announced - 1}"] if with_range else []
    writer.write(request_head("PATCH", location, *headers, length=announced) + data[:sent])
    await writer.drain()
    await wait_until(lambda: registry.busy(location))
    writer.close()  # the client goes away with the body unfinished
    await wait_until(lambda: not registry.busy(location))
    # the server is healthy and the session consistent: offset == bytes stored
    resp = await registry.http.get("/v2/")
    assert resp.status == 200
    offset = await upload_offset(registry.http, location)
    stored = registry.data_file(location).read_bytes()
    assert len(stored) == offset
    assert 0 < offset <= sent
    assert stored == data[:offset]
    # and the upload completes with the rest
    await finish_upload(registry.http, location, data, offset)
    assert await get_blob(registry.http, "big/cut", sha256(data)) == data


async def test_client_closing_mid_monolithic_body_leaves_nothing(serve) -> None:
    registry = await serve()
    data = os.urandom(3 * MIB)
    _reader, writer = await registry.connect()
    target = f"/v2/big/cutmono/blobs/uploads/?digest={sha256(data)}"
    writer.write(request_head("POST", target, length=len(data)) + data[: 2 * MIB])
    await writer.drain()
    await wait_until(lambda: any(registry.uploads_root.iterdir()))
    await asyncio.sleep(0.2)
    writer.close()
    await wait_until(lambda: not any(registry.uploads_root.iterdir()))
    assert await blob_status(registry.http, "big/cutmono", sha256(data)) == 404
    assert (await registry.http.get("/v2/")).status == 200


@pytest.mark.parametrize("kind", ["patch", "put", "monolithic"])
async def test_a_stalled_body_gets_400_after_body_timeout(serve, tmp_path: Path, kind: str) -> None:
    registry = await serve(make_config(tmp_path, server={"body_timeout": "1s"}))
    data = os.urandom(3 * MIB + 17)
    location = await start_session(registry.http, "big/stall")
    targets = {
        "patch": ("PATCH", location),
        "put": ("PUT", f"{location}?digest={sha256(data)}"),
        "monolithic": ("POST", f"/v2/big/stall/blobs/uploads/?digest={sha256(data)}"),
    }
    method, target = targets[kind]
    sent = 300 * 1024
    reader, writer = await registry.connect()
    started = time.monotonic()
    writer.write(request_head(method, target, length=len(data)) + data[:sent])
    await writer.drain()
    answer = await read_answer(reader, timeout=10)
    elapsed = time.monotonic() - started
    assert answer.status == 400, answer.body
    assert "BLOB_UPLOAD_INVALID" in answer.codes()
    assert answer.headers.get("connection", "").lower() == "close"
    assert 0.9 <= elapsed < 8, elapsed
    assert await closed_by_server(reader)
    assert (await registry.http.get("/v2/")).status == 200
    if kind == "monolithic":
        # its own session is dropped; only the one opened above is left
        assert [p.name for p in registry.uploads_root.iterdir()] == [upload_id(location)]
    # the session that received the stalled body is consistent and can be completed
    offset = await upload_offset(registry.http, location)
    stored = registry.data_file(location).read_bytes()
    assert len(stored) == offset <= sent
    assert stored == data[:offset]
    await finish_upload(registry.http, location, data, offset)
    assert await get_blob(registry.http, "big/stall", sha256(data)) == data


async def test_a_slow_but_steady_large_body_is_not_cut(serve, tmp_path: Path) -> None:
    """The body timeout is an idle timeout: pauses shorter than it are fine."""
    registry = await serve(make_config(tmp_path, server={"body_timeout": "1s"}))
    data = os.urandom(DIRECT_MIN + 300 * 1024)
    location = await start_session(registry.http, "big/slow")
    reader, writer = await registry.connect()
    writer.write(request_head("PATCH", location, length=len(data)))
    step = len(data) // 5 + 1
    for start in range(0, len(data), step):
        writer.write(data[start : start + step])
        await writer.drain()
        await asyncio.sleep(0.2)
    answer = await read_answer(reader)
    assert answer.status == 202, answer.body
    await finish_upload(registry.http, location, data, len(data))
    assert await get_blob(registry.http, "big/slow", sha256(data)) == data


@pytest.mark.parametrize(
    "announced",
    [
        pytest.param(DIRECT_MIN - 1, id="through-aiohttp"),
        pytest.param(2 * MIB, id="taken-over"),
    ],
)
async def test_stalled_large_bodies_do_not_starve_other_requests(
    serve, tmp_path: Path, announced: int
) -> None:
    """Clients stalled mid-body (as many as the storage thread pool has threads) must not
    hold up other clients' requests until their bodies time out."""
    registry = await serve(make_config(tmp_path, server={"body_timeout": "2s"}))
    workers = registry.app[OFFLOAD]._executor._max_workers
    locations = [await start_session(registry.http, "big/loris") for _ in range(workers)]
    for location in locations:
        _reader, writer = await registry.connect()
        writer.write(request_head("PATCH", location, length=announced) + b"x" * 1000)
        await writer.drain()
    await wait_until(lambda: all(registry.busy(location) for location in locations))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    resp = await registry.http.post("/v2/other/blobs/uploads/")  # needs a storage thread
    elapsed = time.monotonic() - started
    for writer in registry.sockets:
        writer.close()  # the stalled clients go away; their handlers end at once
    assert resp.status == 202
    assert elapsed < 1.0, f"a new session took {elapsed:.1f} s behind stalled bodies"


# ---- shutdown ---------------------------------------------------------------------------------


async def stall_then_stop(registry: ServedRegistry, announced: int, sent: int) -> tuple[float, str]:
    """A PATCH announcing `announced` bytes stalls after `sent`; then the server stops.
    Returns how long the stop took and the session's Location."""
    data = os.urandom(sent)
    location = await start_session(registry.http, "big/shutdown")
    reader, writer = await registry.connect()
    writer.write(request_head("PATCH", location, length=announced) + data)
    await writer.drain()
    await wait_until(lambda: registry.busy(location))
    await asyncio.sleep(0.3)  # the body's reader has what was sent and waits for more
    await registry.http.close()
    started = time.monotonic()
    await asyncio.wait_for(registry.stop(), timeout=30)
    elapsed = time.monotonic() - started
    assert await closed_by_server(reader), "the stalled connection is closed"
    return elapsed, location


async def test_shutdown_is_prompt_with_a_large_upload_stalled_mid_body(serve) -> None:
    """The runner waits `shutdown_timeout` for the handler, then cancels it; the pump is
    told to stop: nothing waits for the body timeout (60 s by default)."""
    registry = await serve(shutdown_timeout=0.5)
    elapsed, _location = await stall_then_stop(registry, 4 * MIB, MIB + MIB // 2)
    assert elapsed < 6, f"shutdown took {elapsed:.1f} s"


@pytest.mark.parametrize(
    ("announced", "sent"),
    [
        pytest.param(DIRECT_MIN - 1, 100 * 1024, id="through-aiohttp"),
        pytest.param(4 * MIB, MIB + MIB // 2, id="taken-over"),
    ],
)
async def test_shutdown_removes_the_cut_off_session(serve, announced: int, sent: int) -> None:
    """As `tests/server/test_shutdown.py` expects of a SIGTERM: an upload cut off by the
    shutdown is dropped with its temp files."""
    registry = await serve(shutdown_timeout=0.5)
    elapsed, _location = await stall_then_stop(registry, announced, sent)
    assert elapsed < 6, f"shutdown took {elapsed:.1f} s"
    assert list(registry.uploads_root.iterdir()) == [], "the cut-off session is removed"


def test_block_size_assumption() -> None:
    """The sizes above assume the pump's block is 1 MiB (odd offsets, partial blocks)."""
    assert BLOCK == MIB
