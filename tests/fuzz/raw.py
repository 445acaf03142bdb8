"""HTTP-level garbage written byte for byte on raw sockets, where a client library refuses.

A case passes when every answer on its connection is below 500 and the server either
answers or closes the connection within the case's deadline: a connection still open
and silent at the deadline is a hang. `slow` cases (a body or head that never
completes) may only be closed by the server's own timeouts, so they run concurrently.
"""

from __future__ import annotations

import asyncio
import base64
import random
import re
import zlib
from dataclasses import dataclass, field

from tests.fuzz.cases import UPSTREAM, FuzzRequest, World, deflate_bomb
from tests.support.auth import basic
from tests.support.digests import sha256

_STATUS = re.compile(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3})[ \r]")
_FINAL_STATUS = re.compile(rb"(?:^|\r\n)HTTP/1\.[01] [2-5]\d\d[ \r]")
CHUNK = 64 * 1024
#: how long to keep reading after a first answer (pipelined answers follow at once)
ANSWERED_GRACE = 0.5


@dataclass
class RawCase:
    """Bytes for one connection; `case` labels it in the report like a client request."""

    case: str
    data: bytes
    #: the server may only end it by a timeout (header or body timeout)
    slow: bool = False
    #: more bytes sent every `interval` seconds after `data` until the server answers
    trickle: bytes = b""
    trickle_for: float = 0.0
    interval: float = 0.1

    def describe(self) -> str:
        head = self.data.split(b"\r\n", 1)[0]
        return head.decode("latin-1")


@dataclass
class RawResult:
    """Every status line the connection carried, and whether the server closed it."""

    statuses: list[int] = field(default_factory=list)
    closed: bool = False
    error: str | None = None
    received: bytes = b""
    #: seconds until the server closed (or the deadline)
    elapsed: float = 0.0


def head(method: str, target: str, *headers: str, close: bool = True) -> bytes:
    """A request head (request line, Host, headers, blank line) in latin-1."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers]
    if close:
        lines.append("Connection: close")
    text = "\r\n".join(lines) + "\r\n\r\n"
    try:
        return text.encode("latin-1")  # `\xff` in a str is the byte 0xff
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


def request(
    method: str, target: str, *headers: str, body: bytes = b"", close: bool = True
) -> bytes:
    length = [f"Content-Length: {len(body)}"] if body or method in ("PUT", "POST", "PATCH") else []
    return head(method, target, *headers, *length, close=close) + body


async def send(port: int, case: RawCase, deadline: float) -> RawResult:
    """Write the case, keep trickling if asked, read until the server closes or `deadline`."""
    result = RawResult()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        result.error = f"connect: {exc}"
        return result
    received = bytearray()
    loop = asyncio.get_running_loop()
    begun = loop.time()
    end = begun + deadline

    async def feed() -> None:
        try:
            writer.write(case.data)
            await writer.drain()
            stop = loop.time() + case.trickle_for
            while case.trickle and loop.time() < stop and not received:
                await asyncio.sleep(case.interval)
                writer.write(case.trickle)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the server stopped reading: its answer (or close) tells the rest

    feeder = asyncio.create_task(feed())
    try:
        while True:
            remaining = end - loop.time()
            if remaining <= 0:
                break
            try:
                data = await asyncio.wait_for(reader.read(CHUNK), remaining)
            except asyncio.TimeoutError:
                break
            except (ConnectionError, OSError):
                result.closed = True
                break
            if not data:
                result.closed = True
                break
            received += data
            if _FINAL_STATUS.search(received):
                # answered: a connection kept open now is keep-alive (or aiohttp lingering
                # for the rest of a body), not a hang
                end = min(end, loop.time() + ANSWERED_GRACE)
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        writer.close()
    result.received = bytes(received)
    result.elapsed = loop.time() - begun
    result.statuses = [int(m.group(1)) for m in _STATUS.finditer(result.received)]
    return result


def raw_cases(rng: random.Random, world: World, extra: list[FuzzRequest]) -> list[RawCase]:
    """The fixed garbage of issue 11, plus byte-level mutations of generated requests."""
    auth = "" if world.mode == "none" else f"Authorization: {basic('alice')}"
    creds = (auth,) if auth else ()
    session = world.sessions[-1] if world.sessions else "/v2/fz/a/blobs/uploads/" + "0" * 32
    digest = world.protected_digests[0]
    cases: list[RawCase] = []

    def add(case: str, data: bytes, **kw: object) -> None:
        cases.append(RawCase(f"raw/{case}", data, **kw))  # type: ignore[arg-type]

    # request lines
    for line in (
        b"GARBAGE",
        b"GET",
        b"GET /v2/",
        b"GET /v2/ HTTP/9.9",
        b"GET /v2/ HTTP/1.1 extra",
        b"GET  /v2/  HTTP/1.1",
        b"\x00\x01\x02\x03",
        b"GET /v2/\x00 HTTP/1.1",
        b"GET http://evil.example/v2/ HTTP/1.1",
        b"GET * HTTP/1.1",
        b"OPTIONS * HTTP/1.1",
        b"CONNECT 127.0.0.1:1 HTTP/1.1",
        b"G\xffT /v2/ HTTP/1.1",
        b"GET /v2/%ff%fe HTTP/1.1",
        b"GET /v2/\xff\xfe/tags/list HTTP/1.1",
        b"GET /v2/\xc3\xa9/manifests/v1 HTTP/1.1",
        b"GET /v2/" + b"a" * 70_000 + b" HTTP/1.1",
        b"get /v2/ HTTP/1.1",
        b"X" * 1000 + b" /v2/ HTTP/1.1",
        b"GET /v2/ HTTP/1.0",
        b"GET /v2/ HTTP/1",
        b"GET /v2/ http/1.1",
        b"GET ../../etc/passwd HTTP/1.1",
        b"GET /v2/fz/a/tags/list?\xff=\xfe HTTP/1.1",
        b"GET /v2/?%zz HTTP/1.1",
        b"\r\n\r\nGET /v2/ HTTP/1.1",
        b"GET /v2/ HTTP/1.1\x00",
        b"GET\t/v2/\tHTTP/1.1",
        b"DELETE /v2/fz/a/manifests/\xff HTTP/1.1",
    ):
        add("request-line", line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
    add("tls-on-plain", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(200))
    add("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 30)
    add("bare-lf", b"GET /v2/ HTTP/1.1\nHost: x\nConnection: close\n\n")
    # header lines
    for line in (
        b"NoColon",
        b" leading: space",
        b"\tfolded",
        b"Bad Header: x",
        b"X: \x00",
        b"X-\xff: y",
        b"X: a\rb",
        b": empty-name",
        b"X-Request-ID: \xff\xfe",
        b"User-Agent: \xe9\xe9",
        b"Content-Type: \xff",
        b"Accept: \xff" * 1000,
        b"Range: bytes=\xff-\xfe",
        b"X: " + b"a" * 20_000,
        b"Host: \xff",
        b"Host: a\r\nHost: b",
        b"Content-Length: abc",
        b"Content-Length: -1",
        b"Content-Length: 1e3",
        b"Content-Length: 0x10",
        b"Content-Length: 1\r\nContent-Length: 2",
        b"Content-Length: " + b"9" * 40,
        b"Transfer-Encoding: chunked\r\nContent-Length: 3",
        b"Transfer-Encoding: gzip, chunked",
        b"Transfer-Encoding: identity",
        b"Transfer-Encoding: \xff",
        b"Transfer-Encoding: chunked, chunked",
        b"Upgrade: websocket\r\nConnection: Upgrade",
        b"Upgrade: h2c\r\nHTTP2-Settings: AAAA",
        b"Expect: fuzz",
        b"Expect: 100-continue",
        b"\r\n".join(b"X-H%d: v" % i for i in range(300)),
        b"X: " + b"a" * 8000 + b"\r\nY: " + b"b" * 8000,
        b"Authorization: Basic \xe9\xe9",
        b"Authorization: Basic " + base64.b64encode(b"\xff\xfe:\xff"),
        b"Authorization: Bearer \xe9.\xe9.\xe9",
        b"Authorization: Basic \xc3\xa9",
        b"Authorization: \xff",
        b"Authorization: Bearer \xc3\xa9" * 100,
        b"Authorization: Basic YWxpY2U6\xff",
    ):
        # a chunked body that never comes: answered, then closed by the body timeout
        slow = b"chunked" in line
        for target in ("/v2/", "/v2/keep/img1/manifests/v1", "/auth/token?service=regproxy"):
            start = b"GET " + target.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            add("header-line", start + line + b"\r\nConnection: close\r\n\r\n", slow=slow)
    for line in (b"Content-Range: \xff-\xfe", b"Content-Range: 0-\xe9", b"Content-Type: \xe9"):
        add(
            "header-line",
            head("PATCH", session, *creds, "Content-Length: 1").replace(
                b"Connection: close", line + b"\r\nConnection: close"
            )
            + b"x",
        )
    # chunked bodies that break the coding
    for target, method in (
        (session, "PATCH"),
        ("/v2/fz/a/manifests/raw", "PUT"),
        ("/auth/token", "POST"),
        ("/v2/", "GET"),
        ("/v2/fz/a/blobs/uploads/?digest=" + sha256(b"x"), "POST"),
    ):
        start = head(
            method,
            target,
            *creds,
            "Transfer-Encoding: chunked",
            "Content-Type: application/x-www-form-urlencoded",
        )
        for body in (
            b"zz\r\nabc\r\n0\r\n\r\n",
            b"-5\r\nabcde\r\n0\r\n\r\n",
            b"0x5\r\nabcde\r\n0\r\n\r\n",
            b"5;\x00\r\nabcde\r\n0\r\n\r\n",
            b"5\r\nabcdeXX0\r\n\r\n",
            b"ffffffffffffffffffff\r\nab\r\n",
            b"5\r\nabcde\r\n0\r\nTrailer\xff: x\r\n\r\n",
            b"5\r\nab",
            b"\r\n\r\n",
            b"5 \r\nabcde\r\n0\r\n\r\n",
            b"1" * 100 + b"\r\n",
        ):
            slow = body in (b"5\r\nab", b"\r\n\r\n")
            add("chunked", start + body, slow=slow)
    # Content-Length that does not match the body
    for target, method in (
        (session, "PATCH"),
        ("/v2/fz/a/manifests/raw", "PUT"),
        (f"{session}?digest={sha256(b'abc')}", "PUT"),
        ("/auth/token", "POST"),
        ("/v2/fz/a/blobs/uploads/?digest=" + sha256(b"abc"), "POST"),
    ):
        form = ("Content-Type: application/x-www-form-urlencoded",)
        add(
            "length-short",
            head(method, target, *creds, *form, "Content-Length: 100") + b"abc",
            slow=True,
        )
        add(
            "length-long",
            head(method, target, *creds, *form, "Content-Length: 3") + b"abc" + b"GARBAGE" * 20,
        )
        add(
            "length-huge",
            head(method, target, *creds, *form, f"Content-Length: {2 << 20}") + b"abc",
            slow=True,
        )
        add("length-zero", head(method, target, *creds, *form, "Content-Length: 0") + b"abcdef")
    # pipelining
    ping = request("GET", "/v2/", *creds, close=False)
    add("pipelined", ping * 3 + request("GET", "/v2/", *creds))
    add("pipelined", ping + b"GARBAGE\r\n\r\n")
    add(
        "pipelined",
        request("HEAD", f"/v2/keep/img1/manifests/{digest}", *creds, close=False) * 50
        + request("GET", "/v2/"),
    )
    add(
        "pipelined",
        request("PUT", "/v2/fz/a/manifests/pipe", *creds, body=b"{}", close=False)
        + request("GET", "/v2/fz/a/tags/list", *creds),
    )
    add(
        "pipelined",
        request("PATCH", session, *creds, body=b"abc", close=False)
        + request("GET", session, *creds),
    )
    add(
        "pipelined",
        head("POST", "/v2/fz/a/blobs/uploads/", *creds, "Content-Length: 5", close=False)
        + b"ab"
        + ping,
    )
    add(
        "pipelined",
        request("GET", "/v2/?ns=", *creds, close=False)
        + request("GET", "/v2/keep/img1/tags/list?ns", *creds),
    )
    # heads that never end (the header timeout must close them)
    add("incomplete", b"", slow=True)
    add("incomplete", b"GET /v2/ HT", slow=True)
    add("incomplete", b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-A: ", slow=True)
    add("incomplete", b"GET /v2/ HTTP/1.1\r\nHost: x\r\n", slow=True)
    # a deflate body that never ends: compressed zeros for a while, never the last chunk
    piece = zlib.compressobj()
    first = piece.compress(b"\0" * (1 << 20)) + piece.flush(zlib.Z_SYNC_FLUSH)
    more = piece.compress(b"\0" * (1 << 20)) + piece.flush(zlib.Z_SYNC_FLUSH)
    for target, method in (
        (session, "PATCH"),
        ("/v2/fz/a/manifests/endless", "PUT"),
        ("/auth/token", "POST"),
    ):
        start = head(
            method,
            target,
            *creds,
            "Transfer-Encoding: chunked",
            "Content-Encoding: deflate",
            "Content-Type: application/x-www-form-urlencoded",
        )
        chunk = b"%x\r\n%s\r\n"
        add(
            "endless-deflate",
            start + chunk % (len(first), first),
            slow=True,
            trickle=chunk % (len(more), more),
            trickle_for=1.5,
        )
        bomb = deflate_bomb()
        add(
            "deflate-bomb",
            head(
                method, target, *creds, f"Content-Length: {len(bomb)}", "Content-Encoding: deflate"
            )
            + bomb,
        )
    # proxy and ns routes with raw non-UTF-8 bytes
    for target in (
        f"/v2/p/{UPSTREAM}/\xff/manifests/v1",
        "/v2/keep/img1/manifests/v1?ns=\xff",
        f"/v2/p/{UPSTREAM}/library/alpine/tags/list?n=\xff&last=\xfe",
        "/v2/_catalog?last=\xff",
        "/auth/token?scope=repository:\xff:pull&service=regproxy",
    ):
        add("non-utf8-target", head("GET", target, *creds))
    # byte-level mutations of generated requests
    for generated in extra:
        data = encode_generated(generated)
        mutated = bytearray(data)
        how = rng.choice(["flip", "truncate", "duplicate", "insert-crlf", "drop-crlf"])
        if how == "flip":
            for _ in range(rng.randint(1, 8)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        elif how == "truncate":
            del mutated[rng.randrange(1, len(mutated)) :]
        elif how == "duplicate":
            mutated += data
        elif how == "insert-crlf":
            mutated[rng.randrange(len(mutated)) : 0] = b"\r\n"
        else:
            mutated = bytearray(data.replace(b"\r\n", b"\n", 1))
        add(f"mutated-{how}", bytes(mutated), slow=how == "truncate")
    return cases


def encode_generated(request: FuzzRequest) -> bytes:
    """A generated request as wire bytes (Content-Length, Connection: close)."""
    headers = [f"{name}: {value}" for name, value in request.headers]
    raw = head(
        request.method,
        request.target,
        *headers,
        *([f"Content-Length: {len(request.body)}"] if request.body is not None else []),
    )
    return raw + (request.body or b"")
