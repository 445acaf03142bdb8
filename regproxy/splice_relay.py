"""Blobs relayed from an object store to a client by the kernel: `splice(2)` moves the
object store's response body from its socket through a pipe into the client's socket,
on a thread of its own, without the bytes ever entering Python.

Why: relayed through Python, every byte of a pull from S3 was read by botocore into a
bytes object, handed across threads, and written by aiohttp (copied again where the
socket did not take it at once): ~0.9 CPU-s per GiB on the server against ~0.7-0.8 for
Docker's registry, on a machine where the client and the object store need the same
cores. With splice the relay costs the kernel's TCP work and a few system calls per
pipe's worth (1 MiB).

Where it applies: both legs plain TCP (the client's connection without TLS, and the
object store reached at an `http://` endpoint without a proxy), a large enough span,
and a free relay slot (`MAX_RELAYS`). Anything else takes the ordinary path, as does an
object store that answers other than a plain ranged body (its error is then read and
mapped by the S3 client, as usual).

The object is fetched with a presigned URL (the store signs; this module only speaks
HTTP/1.1): one GET with a `Range` on a connection of its own, closed afterwards.
Neither aiohttp nor the storage core is imported here: `aiohttp_adapter.direct_socket`
hands over a duplicate of the client socket's descriptor, so the connection cannot be
closed (and its number reused) under a running relay.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import socket
import threading
import time
from urllib.parse import urlsplit

from regproxy import __version__
from regproxy.direct_send import STOP_CHECK, Senders, write_all
from regproxy.direct_send import ClientGone as ClientGone  # raised by `relay`
from regproxy.direct_send import ClientStalled as ClientStalled  # raised by `relay`

#: relays at once (each holds a thread, a pipe, a duplicate of the client socket and a
#: connection to the object store); past it, a pull takes the ordinary path
MAX_RELAYS = 16
#: the pipe between the two sockets (the kernel's `pipe-max-size` default)
PIPE_SIZE = 1024 * 1024
#: the longest response head the object store may send
MAX_HEAD = 64 * 1024

relays = Senders(MAX_RELAYS, "regproxy-splice")
executor = relays.executor
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})[^\r\n]*")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(?:\d+|\*)")
_MOVE = getattr(os, "SPLICE_F_MOVE", 1)
_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)
_MORE = getattr(os, "SPLICE_F_MORE", 4)


class SourceRefused(Exception):
    """The object store answered, but not with the body asked for (an error status, no
    Content-Length, a chunked or mismatched body): the caller takes the ordinary path,
    whose client reads and maps the store's error."""


class SourceFailed(Exception):
    """The object store stopped sending mid-body (closed early, reset, silent too long)."""


def available() -> bool:
    """Whether this platform has splice(2) (Linux, Python 3.10+)."""
    return hasattr(os, "splice")


def take_slot() -> bool:
    """Reserve one of the `MAX_RELAYS` relays; False when all are busy."""
    return relays.take()


def free_slot() -> None:
    relays.free()


class Source:
    """An object store's answer to a ranged GET: its socket, positioned in the body, and
    the part of the body that arrived with the head."""

    def __init__(self, sock: socket.socket, early: bytes, count: int, idle: float) -> None:
        self.sock = sock
        self.early = early
        self.count = count
        self.idle = idle

    def read(self, size: int) -> bytes:
        """Up to `size` body bytes (the ordinary relay, when the client's socket cannot be
        had); b"" at the end. Blocking: call on a thread."""
        if self.early:
            data, self.early = self.early[:size], self.early[size:]
            return data
        self.sock.settimeout(self.idle)
        try:
            return self.sock.recv(size)
        except TimeoutError:
            raise SourceFailed(f"the object store sent nothing for {self.idle:g} s") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def open_source(url: str, start: int, end: int, connect_timeout: float, idle: float) -> Source:
    """GET bytes `[start, end)` of the object at the presigned `url` (http only) and read
    the answer's head. Raises FileNotFoundError (404), SourceRefused (any other answer
    than that exact body), OSError (no connection). Blocking: call on a thread."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise SourceRefused(f"not a plain HTTP URL: {parts.scheme}")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    count = end - start
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nRange: bytes={start}-{end - 1}\r\n"
        f"User-Agent: regproxy/{__version__}\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=connect_timeout)
    try:
        sock.settimeout(idle)
        sock.sendall(request)
        head, early = _read_head(sock)
        _check_head(head, start, count)
        if len(early) > count:
            raise SourceRefused("the object store sent more than its Content-Length")
    except BaseException:
        sock.close()
        raise
    return Source(sock, early, count, idle)


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The response head (up to its blank line) and the body bytes read with it."""
    data = b""
    while True:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return data[:end], data[end + 4 :]
        if len(data) > MAX_HEAD:
            raise SourceRefused("the object store's response head is too long")
        try:
            more = sock.recv(MAX_HEAD)
        except TimeoutError:
            raise SourceRefused("the object store sent no response head in time") from None
        if not more:
            raise SourceRefused("the object store closed the connection without answering")
        data += more


def _check_head(head: bytes, start: int, count: int) -> None:
    """Accept only the exact body asked for: 206 with the asked Content-Range (or a 200
    of the whole object from its first byte) and a Content-Length of `count`."""
    lines = head.split(b"\r\n")
    status_line = _STATUS_LINE.fullmatch(lines[0])
    if status_line is None:
        raise SourceRefused("the object store's answer is not HTTP/1.x")
    status = int(status_line.group(1))
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise SourceRefused("a malformed header in the object store's answer")
        fields[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if status == 404:
        raise FileNotFoundError("the object store has no such object")
    if status not in (200, 206):
        raise SourceRefused(f"the object store answered {status}")
    if "transfer-encoding" in fields or fields.get("content-length") != str(count):
        raise SourceRefused("the object store's body is not the length asked for")
    if status == 206:
        span = _CONTENT_RANGE.fullmatch(fields.get("content-range", ""))
        if span is None or int(span.group(1)) != start or int(span.group(2)) != start + count - 1:
            raise SourceRefused("the object store sent another range than the one asked for")
    elif start != 0:
        raise SourceRefused("the object store ignored the range")


def relay(source: Source, client_fd: int, client_idle: float, stop: threading.Event) -> None:
    """Send the source's whole body to the non-blocking socket `client_fd`: what came
    with the head by `write`, the rest by splice through a pipe. Returns when all of it
    is sent. Raises ClientStalled, ClientGone, SourceFailed, or InterruptedError when
    `stop` is set. Blocking: call on a thread (`executor`)."""
    write_all(memoryview(source.early), client_fd, client_idle, stop)
    left = source.count - len(source.early)
    if left <= 0:
        return
    read_pipe, write_pipe = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        with contextlib.suppress(OSError):  # a lower pipe-max-size: the default pipe works
            fcntl.fcntl(write_pipe, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        source.sock.setblocking(False)
        _splice_all(source, left, read_pipe, write_pipe, client_fd, client_idle, stop)
    finally:
        os.close(read_pipe)
        os.close(write_pipe)


def _splice_all(
    source: Source,
    left: int,
    read_pipe: int,
    write_pipe: int,
    client_fd: int,
    client_idle: float,
    stop: threading.Event,
) -> None:
    """Move `left` bytes: source socket → pipe → client socket, waiting in `poll` for
    whichever side holds things up."""
    source_fd = source.sock.fileno()
    in_pipe = 0
    pipe_full = False  # the last splice into the pipe found no room (not no data)
    heard = sent = time.monotonic()  # last byte from the source, last byte to the client
    poller = select.poll()
    while left or in_pipe:
        moved = False
        if left and not pipe_full:
            try:
                want = min(left, PIPE_SIZE)
                count = os.splice(source_fd, write_pipe, want, flags=_MOVE | _NONBLOCK | _MORE)
            except BlockingIOError:
                pipe_full = in_pipe > 0 and _readable(source_fd)
            except OSError as exc:
                raise SourceFailed(f"reading from the object store: {exc}") from None
            else:
                if count == 0:
                    raise SourceFailed(f"the object store closed the body {left} bytes early")
                left -= count
                in_pipe += count
                moved = True
                heard = time.monotonic()
        if in_pipe:
            flags = _MOVE | _NONBLOCK | (_MORE if left else 0)
            try:
                count = os.splice(read_pipe, client_fd, in_pipe, flags=flags)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise ClientGone(f"client went away: {exc}") from None
            else:
                in_pipe -= count
                pipe_full = False
                moved = True
                sent = time.monotonic()
        if moved:
            continue
        if stop.is_set():
            raise InterruptedError("the relay was told to stop")
        now = time.monotonic()
        if in_pipe and now - sent > client_idle:
            raise ClientStalled(f"the client took nothing for {client_idle:g} s")
        if left and not in_pipe and now - heard > source.idle:
            raise SourceFailed(f"the object store sent nothing for {source.idle:g} s")
        for fd in (source_fd, client_fd):
            with contextlib.suppress(KeyError):
                poller.unregister(fd)
        if left and not pipe_full:
            poller.register(source_fd, select.POLLIN)
        if in_pipe:
            poller.register(client_fd, select.POLLOUT)
        poller.poll(STOP_CHECK * 1000)


def _readable(fd: int) -> bool:
    """Whether `fd` has data waiting (then a refused splice means the pipe is full)."""
    ready = select.poll()
    ready.register(fd, select.POLLIN)
    return bool(ready.poll(0))
