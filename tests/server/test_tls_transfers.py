"""Blob pulls over TLS that regproxy terminates itself (`[server] tls_certificate`).

The kernel's sendfile cannot send a file on a TLS socket, so these bodies are read,
encrypted and written by a `tls_sender` thread (`responses._send_file_by_thread`), or,
when all its threads are busy, by the event loop (`responses._send_file_tls`: large
reads on a storage thread, ahead of the writes). Every pull test runs both ways (the
`tls_mode` fixture). Real servers on 127.0.0.1 with a certificate from a test CA;
clients verify it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import socket
import ssl
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from regproxy import tls_sender
from regproxy.server import responses
from regproxy.server import runner as runner_mod
from tests.support.certs import TestCA
from tests.support.digests import sha256
from tests.support.fake_upstream import FakeUpstream
from tests.support.inprocess import make_config
from tests.support.proxy import wait_until
from tests.support.served import ServedRegistry, request_head, serve_registry

MIB = 1024 * 1024
#: small pieces, so that a few MiB cross many piece boundaries
PIECE = 64 * 1024


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "ca")


@pytest.fixture
def client_ssl(ca: TestCA) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.ca_file))


@contextlib.contextmanager
def all_senders_busy() -> Iterator[None]:
    """Every `tls_sender` slot taken (as by `MAX_SENDERS` pulls at once): TLS bodies go
    by the event loop meanwhile."""
    taken = 0
    try:
        while tls_sender.senders.take():
            taken += 1
        assert taken == tls_sender.MAX_SENDERS
        yield
    finally:
        for _ in range(taken):
            tls_sender.senders.free()


def senders_all_free() -> bool:
    """No `tls_sender` thread holds a slot (every send that took one has ended)."""
    taken = 0
    while tls_sender.senders.take():
        taken += 1
    for _ in range(taken):
        tls_sender.senders.free()
    return taken == tls_sender.MAX_SENDERS


@pytest.fixture
def tls_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """How TLS bodies are sent: by a `tls_sender` thread (the default; here spans of any
    size, small ones too), or by the event loop while every sender is busy
    (`both_ways`). Afterwards every sender is free again."""
    if getattr(request, "param", "thread") == "thread":
        monkeypatch.setattr(responses, "TLS_THREAD_MIN", 1)
        yield "thread"
    else:
        with all_senders_busy():
            yield "event-loop"
    assert senders_all_free(), "a tls_sender slot was never freed"


#: a pull test run both ways: by a sender thread, and by the event loop
both_ways = pytest.mark.parametrize("tls_mode", ["thread", "event-loop"], indirect=True)


@pytest.fixture
async def tls_registry(
    tmp_path: Path,
    ca: TestCA,
    client_ssl: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
    tls_mode: str,
) -> AsyncIterator[ServedRegistry]:
    monkeypatch.setattr(responses, "TLS_CHUNK", PIECE)
    cert = ca.issue(tmp_path / "cert")
    config = make_config(
        tmp_path,
        server={"tls_certificate": str(cert.certificate), "tls_key": str(cert.key)},
    )
    registry = await serve_registry(config, client_ssl=client_ssl)
    try:
        yield registry
    finally:
        await registry.close()


async def push(registry: ServedRegistry, name: str, data: bytes) -> str:
    digest = sha256(data)
    resp = await registry.http.post(f"/v2/{name}/blobs/uploads/?digest={digest}", data=data)
    assert resp.status == 201, await resp.text()
    return digest


@both_ways
async def test_a_tls_pull_is_byte_identical(tls_registry: ServedRegistry) -> None:
    data = os.urandom(3 * MIB + 12_345)  # not a multiple of the piece size
    digest = await push(tls_registry, "tls/pull", data)
    resp = await tls_registry.http.get(f"/v2/tls/pull/blobs/{digest}")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(data))
    assert resp.headers["Docker-Content-Digest"] == digest
    body = await resp.read()
    assert len(body) == len(data)
    assert hashlib.sha256(body).hexdigest() == digest.split(":")[1]


@both_ways
async def test_pieces_in_reused_buffers_stay_each_pulls_own(
    tls_registry: ServedRegistry,
) -> None:
    """Many pieces per blob, several blobs at once: the two buffers each pull reads into
    in turn never hand one pull's bytes (or a later piece's) to another."""
    blobs = [os.urandom(11 * PIECE + n) for n in (1, 7, 3)]
    digests = [await push(tls_registry, "tls/reuse", data) for data in blobs]

    async def pull(digest: str) -> bytes:
        resp = await tls_registry.http.get(f"/v2/tls/reuse/blobs/{digest}")
        assert resp.status == 200
        return await resp.read()

    for _ in range(2):
        bodies = await asyncio.gather(*(pull(d) for d in digests + digests))
        assert bodies == blobs + blobs


def test_a_buffer_still_viewed_is_never_reused() -> None:
    buffer = bytearray(16)
    assert responses._free_buffer(buffer) is buffer
    held = memoryview(buffer)[2:5]  # as a transport that had not sent it yet would hold it
    fresh = responses._free_buffer(buffer)
    assert fresh is not buffer and len(fresh) == len(buffer)
    held.release()
    assert responses._free_buffer(buffer) is buffer


@both_ways
async def test_small_and_empty_blobs_over_tls(tls_registry: ServedRegistry) -> None:
    for data in (b"", b"x", os.urandom(PIECE), os.urandom(PIECE + 1)):
        digest = await push(tls_registry, "tls/small", data)
        resp = await tls_registry.http.get(f"/v2/tls/small/blobs/{digest}")
        assert resp.status == 200
        assert await resp.read() == data


@both_ways
@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-0",
        "bytes=1-65536",  # across the first piece boundary
        f"bytes={PIECE - 1}-{3 * PIECE + 7}",
        "bytes=1000000-",  # to the end
        "bytes=-70000",  # the last 70,000 bytes
        "bytes=2000000-99999999",  # past the end: cut at the end
    ],
)
async def test_range_over_tls(tls_registry: ServedRegistry, header: str) -> None:
    data = os.urandom(2 * MIB + 101)
    digest = await push(tls_registry, "tls/range", data)
    first, _, last = header.removeprefix("bytes=").partition("-")
    if first == "":
        start, end = len(data) - int(last), len(data)
    else:
        start = int(first)
        end = len(data) if last == "" else min(int(last) + 1, len(data))
    resp = await tls_registry.http.get(f"/v2/tls/range/blobs/{digest}", headers={"Range": header})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(data)}"
    assert resp.headers["Content-Length"] == str(end - start)
    assert await resp.read() == data[start:end]


async def test_head_over_tls_has_no_body(tls_registry: ServedRegistry) -> None:
    data = os.urandom(MIB + 3)
    digest = await push(tls_registry, "tls/head", data)
    resp = await tls_registry.http.head(f"/v2/tls/head/blobs/{digest}")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(data))
    assert await resp.read() == b""
    # the connection is still good for the next request
    resp = await tls_registry.http.get(f"/v2/tls/head/blobs/{digest}")
    assert await resp.read() == data


async def _raw_tls(
    registry: ServedRegistry, context: ssl.SSLContext, receive_buffer: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:  # a fixed size: no autotuning up to tcp_rmem's maximum
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", registry.port))
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=context, server_hostname="127.0.0.1"
    )
    registry.sockets.append(writer)
    return reader, writer


def _tcp_max(name: str) -> int:
    return int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@both_ways
async def test_a_client_leaving_mid_body_frees_everything(
    tls_registry: ServedRegistry, client_ssl: ssl.SSLContext
) -> None:
    data = os.urandom(8 * MIB)
    digest = await push(tls_registry, "tls/leave", data)
    fds = _open_fds()
    for _ in range(3):
        reader, writer = await _raw_tls(tls_registry, client_ssl)
        writer.write(request_head("GET", f"/v2/tls/leave/blobs/{digest}"))
        await writer.drain()
        await reader.readexactly(MIB)  # head and part of the body
        writer.transport.abort()  # gone, mid-body
    # the blob files are closed once each send notices: no descriptor is left open
    await wait_until(lambda: _open_fds() <= fds, timeout=10)
    resp = await tls_registry.http.get(f"/v2/tls/leave/blobs/{digest}")
    assert await resp.read() == data


@both_ways
async def test_a_slow_reader_holds_bounded_memory(
    tls_registry: ServedRegistry,
    client_ssl: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
    tls_mode: str,
) -> None:
    """A client that stops reading: the server stops reading the file once a few pieces
    wait in its buffers (plus what the kernel's socket buffers hold), not the whole blob;
    when the client reads again the whole body arrives intact."""
    size = 48 * MIB
    data = os.urandom(size)
    digest = await push(tls_registry, "tls/slow", data)
    read_bytes = 0
    real = responses._read_piece_into
    real_thread = tls_sender.read_into

    def counting(fd: int, buffer: bytearray, count: int, position: int) -> memoryview:
        nonlocal read_bytes
        piece = real(fd, buffer, count, position)
        read_bytes += len(piece)
        return piece

    def counting_thread(fd: int, view: memoryview, position: int) -> int:
        nonlocal read_bytes
        got = real_thread(fd, view, position)
        read_bytes += got
        return got

    monkeypatch.setattr(responses, "_read_piece_into", counting)
    monkeypatch.setattr(tls_sender, "read_into", counting_thread)
    reader, writer = await _raw_tls(tls_registry, client_ssl, receive_buffer=128 * 1024)
    writer.write(request_head("GET", f"/v2/tls/slow/blobs/{digest}"))
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    # read nothing more: wait until the server stops reading the file
    last = -1
    while read_bytes != last:
        last = read_bytes
        await asyncio.sleep(0.5)
    # what the kernels may hold: the server's send buffer at its largest and the client's
    # receive buffer (the kernel doubles what was set); the client's stream reader (its
    # 64 KiB limit pauses it) and SSL protocol (ciphertext up to its read high-water mark,
    # plus one socket read of 256 KiB); and the server's bound. By a thread (`tls_sender`): the
    # piece whose records wait for room. By the event loop (`responses._send_file_tls`):
    # the piece read ahead, and in asyncio's SSL protocol and socket transport at most a
    # piece plus the SSL write high-water mark each
    ssl_read_high = asyncio.constants.FLOW_CONTROL_HIGH_WATER_SSL_READ * 1024
    client = 2 * 128 * 1024 + 64 * 1024 + ssl_read_high + 256 * 1024
    kernel = _tcp_max("tcp_wmem") + client
    ssl_high = asyncio.constants.FLOW_CONTROL_HIGH_WATER_SSL_WRITE * 1024
    if tls_mode == "thread":
        bound = kernel + 2 * tls_sender.PIECE
    else:
        bound = kernel + 3 * PIECE + 2 * ssl_high + 256 * 1024
    assert read_bytes < size
    assert read_bytes <= bound, (read_bytes, bound)
    body = bytearray()
    while len(body) < size:
        body += await reader.read(MIB)
    assert bytes(body) == data


@both_ways
async def test_tls_bodies_go_by_a_sender_thread(
    tls_registry: ServedRegistry, monkeypatch: pytest.MonkeyPatch, tls_mode: str
) -> None:
    """Whole blobs and Ranges are sent by a `tls_sender` thread while one is free, by the
    event loop otherwise; the same bytes either way."""
    spans: list[tuple[int, int]] = []
    real = tls_sender.send_file

    def spying(channel: Any, fd: int, start: int, end: int, *rest: Any) -> None:
        spans.append((start, end))
        real(channel, fd, start, end, *rest)

    monkeypatch.setattr(tls_sender, "send_file", spying)
    data = os.urandom(MIB + 17)
    digest = await push(tls_registry, "tls/thread", data)
    resp = await tls_registry.http.get(f"/v2/tls/thread/blobs/{digest}")
    assert await resp.read() == data
    resp = await tls_registry.http.get(
        f"/v2/tls/thread/blobs/{digest}", headers={"Range": "bytes=5-70000"}
    )
    assert await resp.read() == data[5:70001]
    assert spans == ([(0, len(data)), (5, 70001)] if tls_mode == "thread" else [])


async def test_small_spans_go_by_the_event_loop(
    tls_registry: ServedRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below `TLS_THREAD_MIN` lending the connection to a thread costs about what it
    saves: such spans go by the event loop, larger ones by a thread."""
    monkeypatch.setattr(responses, "TLS_THREAD_MIN", 256 * 1024)
    by_thread: list[int] = []
    real = tls_sender.send_file

    def spying(channel: Any, fd: int, start: int, end: int, *rest: Any) -> None:
        by_thread.append(end - start)
        real(channel, fd, start, end, *rest)

    monkeypatch.setattr(tls_sender, "send_file", spying)
    data = os.urandom(MIB)
    digest = await push(tls_registry, "tls/small-spans", data)
    for span in (256 * 1024 - 1, 256 * 1024):
        resp = await tls_registry.http.get(
            f"/v2/tls/small-spans/blobs/{digest}", headers={"Range": f"bytes=0-{span - 1}"}
        )
        assert await resp.read() == data[:span]
    assert by_thread == [256 * 1024]


@both_ways
async def test_pipelined_requests_after_a_body_over_tls(
    tls_registry: ServedRegistry, client_ssl: ssl.SSLContext
) -> None:
    """Requests sent at once on one connection: the ones that arrive while a body is being
    sent wait (a thread holds the connection, its reading paused) and are answered in
    turn afterwards, on the same connection."""
    data = os.urandom(3 * MIB + 5)
    digest = await push(tls_registry, "tls/pipe", data)
    reader, writer = await _raw_tls(tls_registry, client_ssl)
    path = f"/v2/tls/pipe/blobs/{digest}"
    writer.write(
        request_head("GET", path)
        + request_head("GET", path, "Range: bytes=1-2")
        + request_head("GET", "/v2/")
    )
    await writer.drain()
    for status, body in ((200, data), (206, data[1:3]), (200, None)):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status}".encode()), head
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        got = await reader.readexactly(length)
        if body is not None:
            assert got == body


async def test_a_stalled_tls_client_is_cut(
    tmp_path: Path,
    ca: TestCA,
    client_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that takes nothing for `server.body_timeout` while its thread sends: the
    connection is cut (its body ends short, never looking complete), the sender is freed,
    and the server goes on serving."""
    cert = ca.issue(tmp_path / "cert")
    config = make_config(
        tmp_path,
        server={
            "tls_certificate": str(cert.certificate),
            "tls_key": str(cert.key),
            "body_timeout": "1s",
        },
    )
    registry = await serve_registry(config, client_ssl=client_ssl)
    try:
        data = os.urandom(32 * MIB)  # far more than the socket buffers on both sides hold
        digest = await push(registry, "tls/stall", data)
        reader, writer = await _raw_tls(registry, client_ssl, receive_buffer=64 * 1024)
        writer.transport.pause_reading()  # takes nothing from now on
        caplog.set_level(logging.WARNING)
        writer.write(request_head("GET", f"/v2/tls/stall/blobs/{digest}"))
        await wait_until(
            lambda: any("connection cut" in r.getMessage() for r in caplog.records), 15
        )
        assert any("took nothing" in r.getMessage() for r in caplog.records)
        writer.transport.resume_reading()
        got = 0
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            async with asyncio.timeout(10):
                while chunk := await reader.read(MIB):
                    got += len(chunk)
        assert 0 < got < len(data), "a stalled client's body was never cut"
        await wait_until(senders_all_free, timeout=5)
        resp = await registry.http.get(
            f"/v2/tls/stall/blobs/{digest}", headers={"Range": "bytes=0-9"}
        )
        assert await resp.read() == data[:10]
    finally:
        await registry.close()


async def test_stopping_the_server_mid_body_stops_its_sender(
    tmp_path: Path, ca: TestCA, client_ssl: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    """The server stops (SIGTERM's path: handlers cancelled after the grace time) while a
    thread sends to a client that reads nothing: the thread is told to stop and ends
    before the connection closes; the server stops promptly and no sender is left."""
    cert = ca.issue(tmp_path / "cert")
    config = make_config(
        tmp_path,
        server={"tls_certificate": str(cert.certificate), "tls_key": str(cert.key)},
    )
    registry = await serve_registry(config, client_ssl=client_ssl, shutdown_timeout=0.5)
    data = os.urandom(32 * MIB)
    try:
        digest = await push(registry, "tls/stop", data)
        reader, writer = await _raw_tls(registry, client_ssl, receive_buffer=64 * 1024)
        writer.transport.pause_reading()
        writer.write(request_head("GET", f"/v2/tls/stop/blobs/{digest}"))
        await writer.drain()
        await wait_until(lambda: not senders_all_free(), timeout=5)
        async with asyncio.timeout(10):
            await registry.stop()
        await wait_until(senders_all_free, timeout=2)  # within `STOP_CHECK`
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        writer.transport.resume_reading()
        got = 0
        with contextlib.suppress(ConnectionError, ssl.SSLError):  # cut, not closed cleanly
            async with asyncio.timeout(10):
                while chunk := await reader.read(MIB):
                    got += len(chunk)
        assert got < len(data)
    finally:
        await registry.close()


async def test_plain_http_keeps_sendfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without TLS the kernel sends the file (zero-copy): the TLS path is never taken."""

    async def refuse(*args: object) -> None:
        raise AssertionError("the TLS path served a plain-HTTP pull")

    monkeypatch.setattr(responses, "_send_file_tls", refuse)
    registry = await serve_registry(make_config(tmp_path / "plain"))
    try:
        data = os.urandom(MIB + 5)
        digest = await push(registry, "plain/pull", data)
        resp = await registry.http.get(f"/v2/plain/pull/blobs/{digest}")
        assert await resp.read() == data
        resp = await registry.http.get(
            f"/v2/plain/pull/blobs/{digest}", headers={"Range": "bytes=10-99999"}
        )
        assert resp.status == 206
        assert await resp.read() == data[10:100000]
    finally:
        await registry.close()


# ---- pushes over TLS -----------------------------------------------------------------------


async def test_a_chunked_push_over_tls_in_small_chunks(tls_registry: ServedRegistry) -> None:
    """docker's push: one PATCH with `Transfer-Encoding: chunked` in 32 KiB chunks."""
    data = os.urandom(5 * MIB + 999)

    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 32 * 1024):
            yield data[start : start + 32 * 1024]

    resp = await tls_registry.http.post("/v2/tls/te/blobs/uploads/")
    assert resp.status == 202
    resp = await tls_registry.http.patch(resp.headers["Location"], data=body())
    assert resp.status == 202, await resp.text()
    assert resp.headers["Range"] == f"0-{len(data) - 1}"
    digest = sha256(data)
    resp = await tls_registry.http.put(f"{resp.headers['Location']}?digest={digest}")
    assert resp.status == 201, await resp.text()
    resp = await tls_registry.http.get(f"/v2/tls/te/blobs/{digest}")
    assert await resp.read() == data


async def test_a_monolithic_push_over_tls(tls_registry: ServedRegistry) -> None:
    data = os.urandom(4 * MIB + 1)
    digest = await push(tls_registry, "tls/mono", data)
    resp = await tls_registry.http.get(f"/v2/tls/mono/blobs/{digest}")
    assert await resp.read() == data


def _handshake(port: int, context: ssl.SSLContext) -> tuple[str, str]:
    """Connect, send a request, and return the negotiated (suite, protocol)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        conn.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert conn.recv(12).startswith(b"HTTP/1.1 ")
        suite, protocol, _ = conn.cipher() or ("", "", 0)
        return suite, protocol


async def test_tls_suites_as_go_picks_them_and_no_weaker(
    tls_registry: ServedRegistry, ca: TestCA, client_ssl: ssl.SSLContext
) -> None:
    """TLS 1.3 clients get AES-128-GCM (as from docker's registry; OpenSSL alone would pick
    AES-256-GCM: more CPU per byte sent), TLS 1.2 clients an ECDHE AEAD suite, and
    nothing older is accepted. A certificate reload keeps the order."""
    port = tls_registry.port
    assert await asyncio.to_thread(_handshake, port, client_ssl) == (
        "TLS_AES_128_GCM_SHA256",
        "TLSv1.3",
    )
    tls12 = ssl.create_default_context(cafile=str(ca.ca_file))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    suite, protocol = await asyncio.to_thread(_handshake, port, tls12)
    assert protocol == "TLSv1.2" and suite.startswith("ECDHE-") and "GCM" in suite, suite
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(cafile=str(ca.ca_file))
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        with contextlib.suppress(ValueError):  # this OpenSSL may not even offer TLS 1.1
            old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.to_thread(_handshake, port, old)

    context = runner_mod.tls_context(tls_registry.config)
    assert context is not None
    runner_mod.reload_tls(context, tls_registry.config)
    srv, cli = socket.socketpair()
    with srv, cli:
        server = context.wrap_socket(srv, server_side=True, do_handshake_on_connect=False)
        client = client_ssl.wrap_socket(
            cli, server_hostname="127.0.0.1", do_handshake_on_connect=False
        )
        done = await asyncio.gather(
            asyncio.to_thread(server.do_handshake), asyncio.to_thread(client.do_handshake)
        )
        assert done == [None, None]
        assert client.cipher()[0] == "TLS_AES_128_GCM_SHA256"


@both_ways
async def test_cold_pulls_through_the_cache_over_tls(
    tmp_path: Path,
    ca: TestCA,
    client_ssl: ssl.SSLContext,
    fake: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    tls_mode: str,
) -> None:
    """A blob still arriving from the upstream goes to TLS clients as a stored one does,
    span by span of the spool (asyncio's sendfile fallback took 16 KiB per step): every
    reader gets it byte-identical, the upstream sends it once."""
    monkeypatch.setattr(responses, "TLS_CHUNK", PIECE)
    # each span counted as its sending starts: the client may have the last byte (and
    # this test go on) before the sending coroutine resumes
    sent_over_tls: list[int] = []
    send_file_tls = responses._send_file_tls
    send_file = tls_sender.send_file

    async def counting(*args: Any) -> None:
        start, end = args[4], args[5]
        sent_over_tls.append(end - start)
        await send_file_tls(*args)

    def counting_thread(channel: Any, fd: int, start: int, end: int, *rest: Any) -> None:
        sent_over_tls.append(end - start)
        send_file(channel, fd, start, end, *rest)

    monkeypatch.setattr(responses, "_send_file_tls", counting)
    monkeypatch.setattr(tls_sender, "send_file", counting_thread)
    data = os.urandom(5 * MIB + 7)
    digest = fake.add_blob("lib/big", data)
    fake.faults.chunk_delay = 0.02  # about half a second upstream: the pulls overlap it
    cert = ca.issue(tmp_path / "cert")
    config = make_config(
        tmp_path,
        server={"tls_certificate": str(cert.certificate), "tls_key": str(cert.key)},
        proxy={"upstreams": {"up": {"url": fake.url}}},
    )
    registry = await serve_registry(config, client_ssl=client_ssl)
    try:

        async def pull() -> bytes:
            resp = await registry.http.get(f"/v2/p/up/lib/big/blobs/{digest}")
            assert resp.status == 200, await resp.text()
            return await resp.read()

        bodies = await asyncio.gather(*(pull() for _ in range(3)))
        assert all(body == data for body in bodies)
        assert fake.count("GET", "blob") == 1
        assert sum(sent_over_tls) == 3 * len(data)
        assert len(sent_over_tls) > 3  # spans sent while the fetch went on
        warm = await pull()  # and from the cache, once stored
        assert warm == data
        assert sum(sent_over_tls) == 4 * len(data)
    finally:
        await registry.close()
