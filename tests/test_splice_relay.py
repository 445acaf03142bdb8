"""`regproxy.splice_relay` on real loopback sockets: an object store's answer is taken
only when it is exactly the body asked for, and a relay moves it byte for byte, or
stops with the side to blame (the store, the client) named.

The "object store" here is a canned HTTP answer on a loopback socket, so heads that no
real engine sends on a good day (garbage, a chunked body, a range other than the one
asked for, a close mid-body) can be checked one by one; a seeded fuzz of random heads
must never get past `open_source` as anything but a refusal or a missing object. The
relay against SeaweedFS itself is in tests/s3/test_relay_clients.py.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from regproxy import splice_relay
from regproxy.splice_relay import (
    ClientGone,
    ClientStalled,
    SourceFailed,
    SourceRefused,
    open_source,
    relay,
)
from tests.support.loopback import tcp_pair

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not splice_relay.available(), reason="no splice(2) on this platform"),
]

BODY = os.urandom(3 * 1024 * 1024 + 5)


@contextmanager
def canned(
    answer: bytes, then: float = 0.0, close: bool = True
) -> Iterator[tuple[str, list[bytes]]]:
    """A one-connection HTTP server on loopback that reads the request head, sends
    `answer`, waits `then` seconds and closes; yields a URL and the requests it saw."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    seen: list[bytes] = []

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    more = conn.recv(65536)
                    if not more:
                        return
                    data += more
                seen.append(data)
                conn.sendall(answer)
                time.sleep(then)
                if not close:
                    time.sleep(30)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/bucket/key?X-Amz-Signature=abc", seen
    finally:
        server.close()


def head(status: str, *fields: str) -> bytes:
    return ("\r\n".join([f"HTTP/1.1 {status}", *fields]) + "\r\n\r\n").encode()


def ranged(start: int, end: int, body: bytes = BODY) -> bytes:
    part = body[start:end]
    return (
        head(
            "206 Partial Content",
            f"Content-Length: {len(part)}",
            f"Content-Range: bytes {start}-{end - 1}/{len(body)}",
        )
        + part
    )


def client_pair(small: bool = False) -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback: (the server's end, non-blocking; the client's);
    `small`: socket buffers of 64 KiB, so a client that reads nothing soon holds it up."""
    server_end, client = tcp_pair(small)
    server_end.setblocking(False)
    return server_end, client


def receive(sock: socket.socket, count: int) -> bytes:
    got = bytearray()
    with contextlib.suppress(OSError):  # closed under it: the test is over
        sock.settimeout(10)
        while len(got) < count:
            more = sock.recv(1024 * 1024)
            if not more:
                break
            got += more
    return bytes(got)


def run_relay(url: str, start: int, end: int) -> bytes:
    source = open_source(url, start, end, 5.0, 5.0)
    server_end, client = client_pair()
    try:
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.append(receive(client, end - start)))
        reader.start()
        relay(source, server_end.fileno(), 5.0, threading.Event())
        reader.join(10)
        return received[0]
    finally:
        source.close()
        server_end.close()
        client.close()


@pytest.mark.parametrize(("start", "end"), [(0, len(BODY)), (1, 2 * 1024 * 1024 + 3)])
def test_a_ranged_body_is_relayed_byte_for_byte(start: int, end: int) -> None:
    with canned(ranged(start, end)) as (url, seen):
        assert run_relay(url, start, end) == BODY[start:end]
    request = seen[0].decode()
    assert request.startswith("GET /bucket/key?X-Amz-Signature=abc HTTP/1.1\r\n")
    assert f"Range: bytes={start}-{end - 1}\r\n" in request
    assert f"Host: {url.split('/')[2]}\r\n" in request  # the signed host, port included


def test_a_whole_object_answered_200_is_taken_from_byte_zero() -> None:
    answer = head("200 OK", f"Content-Length: {len(BODY)}") + BODY
    with canned(answer) as (url, _):
        assert run_relay(url, 0, len(BODY)) == BODY


def test_a_missing_object_is_file_not_found() -> None:
    missing = head("404 Not Found", "Content-Length: 0")
    with canned(missing) as (url, _), pytest.raises(FileNotFoundError):
        open_source(url, 0, 10, 5.0, 5.0)


@pytest.mark.parametrize(
    "answer",
    [
        head("503 Slow Down", "Content-Length: 0"),
        head("403 Forbidden", "Content-Length: 5") + b"nope!",
        head("206 Partial Content", "Transfer-Encoding: chunked", "Content-Range: bytes 0-9/20"),
        head("206 Partial Content", "Content-Length: 9", "Content-Range: bytes 0-8/20"),
        head("206 Partial Content", "Content-Length: 10", "Content-Range: bytes 1-10/20"),
        head("206 Partial Content", "Content-Length: 10"),
        head("200 OK", "Content-Length: 20"),
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 206 Partial Content\r\nno colon here\r\n\r\n",
        b"",
    ],
    ids=[
        "503",
        "403",
        "chunked",
        "short",
        "other-range",
        "no-range",
        "whole",
        "not-http",
        "bad-header",
        "closed",
    ],
)
def test_any_other_answer_is_refused(answer: bytes) -> None:
    """Refused, so the S3 client fetches the blob instead and maps the store's error."""
    with canned(answer) as (url, _), pytest.raises(SourceRefused):
        open_source(url, 0, 10, 5.0, 5.0)


def test_more_bytes_than_announced_are_refused() -> None:
    answer = head("206 Partial Content", "Content-Length: 10", "Content-Range: bytes 0-9/20")
    with canned(answer + b"0123456789extra") as (url, _), pytest.raises(SourceRefused):
        open_source(url, 0, 10, 5.0, 5.0)


def test_a_range_from_later_than_zero_answered_whole_is_refused() -> None:
    with canned(head("200 OK", "Content-Length: 10")) as (url, _), pytest.raises(SourceRefused):
        open_source(url, 5, 15, 5.0, 5.0)


def test_a_head_that_never_ends_is_refused() -> None:
    endless = b"HTTP/1.1 206 Partial Content\r\n" + b"X-Filler: " + b"a" * (200 * 1024)
    with canned(endless, close=False) as (url, _), pytest.raises(SourceRefused, match="long"):
        open_source(url, 0, 10, 5.0, 5.0)


def test_a_silent_store_is_refused_after_the_idle_time() -> None:
    with canned(b"", close=False) as (url, _):
        started = time.monotonic()
        with pytest.raises(SourceRefused, match="in time"):
            open_source(url, 0, 10, 5.0, 0.5)
        assert time.monotonic() - started < 5


def test_only_plain_http_urls_are_opened() -> None:
    with pytest.raises(SourceRefused):
        open_source("https://127.0.0.1:1/bucket/key", 0, 10, 5.0, 5.0)


def test_an_unreachable_store_is_an_os_error() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(OSError):
        open_source(f"http://127.0.0.1:{port}/b/k", 0, 10, 5.0, 5.0)


def test_random_heads_are_refused_or_missing_never_taken() -> None:
    """A seeded fuzz of the object store's answer head."""
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "1613")))
    pieces = [
        *(b"HTTP/1.1 206 x", b"HTTP/1.0 200", b"HTTP/1.1 404 no", b"HTTP/2 206"),
        *(b"Content-Length: 10", b"Content-Length: -1", b"Transfer-Encoding: chunked"),
        *(b"Content-Range: bytes 0-9/10", b"Content-Range: bytes 9-0/*"),
        *(b":", b"\xff\xfe", b"X: \r"),
    ]
    for _ in range(40):
        lines = [rng.choice(pieces) for _ in range(rng.randint(0, 5))]
        if rng.random() < 0.3:
            lines.append(os.urandom(rng.randint(1, 40)))
        answer = b"\r\n".join(lines) + b"\r\n\r\n"
        with canned(answer) as (url, _):
            try:
                source = open_source(url, 0, 10, 5.0, 2.0)
            except (SourceRefused, FileNotFoundError):
                continue
            source.close()
            # taken: only the exact body asked for may be
            assert b"Content-Length: 10" in answer and b"chunked" not in answer, answer


@contextmanager
def relaying(
    answer: bytes, close: bool = True, small: bool = False
) -> Iterator[tuple[splice_relay.Source, socket.socket, socket.socket]]:
    """The whole of BODY opened from a canned store answer, and a client connection to
    relay it to: (source, the server's end, the client's end), all closed afterwards."""
    with canned(answer, close=close) as (url, _):
        source = open_source(url, 0, len(BODY), 5.0, 5.0)
        server_end, client = client_pair(small=small)
        try:
            yield source, server_end, client
        finally:
            source.close()
            server_end.close()
            client.close()


def test_a_store_closing_mid_body_fails_the_relay() -> None:
    answer = ranged(0, len(BODY))[: -1024 * 1024]  # the last MiB never comes
    with relaying(answer) as (source, server_end, client):
        threading.Thread(target=receive, args=(client, len(BODY)), daemon=True).start()
        with pytest.raises(SourceFailed, match="early"):
            relay(source, server_end.fileno(), 5.0, threading.Event())


def test_a_client_that_takes_nothing_is_stalled() -> None:
    with relaying(ranged(0, len(BODY)), close=False, small=True) as (source, server_end, _):
        started = time.monotonic()
        with pytest.raises(ClientStalled):
            relay(source, server_end.fileno(), 0.5, threading.Event())
        assert time.monotonic() - started < 5


def test_a_client_that_leaves_is_gone() -> None:
    with relaying(ranged(0, len(BODY)), close=False) as (source, server_end, client):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()  # a reset
        with pytest.raises(ClientGone):
            relay(source, server_end.fileno(), 5.0, threading.Event())


def test_a_relay_told_to_stop_stops() -> None:
    # the client reads nothing: the relay waits for it
    with relaying(ranged(0, len(BODY)), close=False, small=True) as (source, server_end, _):
        stop = threading.Event()
        threading.Timer(0.3, stop.set).start()
        started = time.monotonic()
        with pytest.raises(InterruptedError):
            relay(source, server_end.fileno(), 30.0, stop)
        assert time.monotonic() - started < 3


def test_slots_are_bounded() -> None:
    taken = 0
    try:
        while splice_relay.take_slot():
            taken += 1
            assert taken <= splice_relay.MAX_RELAYS
        assert taken == splice_relay.MAX_RELAYS
    finally:
        for _ in range(taken):
            splice_relay.free_slot()
