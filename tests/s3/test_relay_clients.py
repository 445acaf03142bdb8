"""Blobs relayed from S3 to clients, as the clients behave.

regproxy on a real socket, both stores on SeaweedFS. The bodies are the blob's bytes,
Range included, one after another on one keep-alive connection; a client that stops
reading is cut off after `server.body_timeout` (it would otherwise hold one of the S3
client's pooled connections, or a splice relay's thread, for as long as it likes), and
one that leaves mid-body frees its descriptors. Each test runs both ways a blob is
relayed: by the kernel (`splice_relay`, plain HTTP on both legs) and through the S3
client and aiohttp's writes (spans too small for splice, HTTPS endpoints, TLS clients).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from regproxy import splice_relay
from regproxy.server import responses
from tests.support.oci import push_blob
from tests.support.proxy import wait_until
from tests.support.s3store import s3_config
from tests.support.seaweed import SeaweedS3
from tests.support.served import (
    ServedRegistry,
    read_answer,
    request_head,
    serve_registry,
)

pytestmark = pytest.mark.timeout(90)

MIB = 1024 * 1024
Start = Callable[..., Awaitable[ServedRegistry]]


@pytest.fixture(autouse=True, params=["splice", "stream"])
def relay_way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Relay by splice (checked: it was used) or through the S3 client (splice off)."""
    if request.param == "stream":
        monkeypatch.setattr(responses, "SPLICE_MIN", 1 << 62)
        yield
        return
    spliced: list[int] = []
    relay = splice_relay.relay

    def counted(source: splice_relay.Source, *args: Any) -> None:
        spliced.append(source.count)
        relay(source, *args)

    monkeypatch.setattr(splice_relay, "relay", counted)
    yield
    assert spliced, "no blob went by splice"


@pytest.fixture
async def start(seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path) -> AsyncIterator[Start]:
    served: list[ServedRegistry] = []

    async def factory(**extra: Any) -> ServedRegistry:
        registry = await serve_registry(s3_config(seaweed, s3_bucket, tmp_path, **extra))
        served.append(registry)
        return registry

    try:
        yield factory
    finally:
        for registry in served:
            await registry.close()


async def _connect(
    registry: ServedRegistry, receive_buffer: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:  # a fixed size: no autotuning up to tcp_rmem's maximum
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", registry.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4 * MIB)
    registry.sockets.append(writer)
    return reader, writer


async def test_relayed_bodies_are_the_blob_and_the_connection_carries_on(start: Start) -> None:
    registry = await start()
    data = os.urandom(5 * MIB + 11)  # several relay pieces, the last one short
    digest = await push_blob(registry.http, "relay/app", data)
    reader, writer = await _connect(registry)
    url = f"/v2/relay/app/blobs/{digest}"
    for headers, expected in [
        ((), data),
        (("Range: bytes=1048570-3145740",), data[1048570:3145741]),
        (("Range: bytes=-7",), data[-7:]),
        ((), data),
    ]:
        writer.write(request_head("GET", url, *headers))
        answer = await read_answer(reader, timeout=30)
        assert answer.status == (206 if headers else 200), answer.body[:200]
        assert answer.body == expected
    # one connection for all of them, and for the next small request too
    writer.write(request_head("GET", "/v2/"))
    assert (await read_answer(reader)).status == 200


async def test_a_client_that_stops_reading_is_cut_off(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    registry = await start(server={"body_timeout": "1s"})
    data = os.urandom(16 * MIB)  # far more than the socket buffers on both sides hold
    digest = await push_blob(registry.http, "relay/stall", data)
    reader, writer = await _connect(registry, receive_buffer=64 * 1024)
    writer.transport.pause_reading()  # takes nothing from now on
    caplog.set_level(logging.WARNING)
    writer.write(request_head("GET", f"/v2/relay/stall/blobs/{digest}"))
    await wait_until(lambda: any("client stalled" in r.getMessage() for r in caplog.records), 15)
    writer.transport.resume_reading()
    got = 0  # what the client gets now: what was on the way, then the end of the connection
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(10):
            while chunk := await reader.read(MIB):
                got += len(chunk)
    assert 0 < got < len(data), "a stalled client's body was never cut"
    # the server goes on serving
    resp = await registry.http.get(
        f"/v2/relay/stall/blobs/{digest}", headers={"Range": "bytes=0-9"}
    )
    assert await resp.read() == data[:10]


async def test_a_client_leaving_mid_body_frees_everything(start: Start) -> None:
    registry = await start()
    data = os.urandom(16 * MIB)
    digest = await push_blob(registry.http, "relay/leave", data)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        reader, writer = await _connect(registry)
        writer.write(request_head("GET", f"/v2/relay/leave/blobs/{digest}"))
        await reader.readexactly(MIB)
        writer.transport.abort()
    await wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds, timeout=15)
    resp = await registry.http.get(f"/v2/relay/leave/blobs/{digest}")
    assert await resp.read() == data
