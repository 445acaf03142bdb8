"""Response builders shared by local and proxied pulls: one set of blob headers for every
blob answer (HEAD, GET, ranged, streamed while it is fetched), and manifest answers.

Blobs are content-addressed, so their ETag is the digest: the same on HEAD and GET, on
every replica, and after gc touches the file (an mtime-based ETag would change).
Conditional requests (`If-None-Match`, `If-Match`, `If-Range`) are answered against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import threading
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from regproxy import aiohttp_adapter, asyncio_tls, splice_relay, tls_sender
from regproxy.aiohttp_adapter import send_file_range
from regproxy.digest import Digest
from regproxy.errors import BlobUnknown, RangeNotSatisfiable
from regproxy.server.keys import CONFIG
from regproxy.storage import s3client
from regproxy.storage.aio import Offload
from regproxy.storage.store import Store, StoredManifest

log = logging.getLogger("regproxy.server")

BLOB_CONTENT_TYPE = "application/octet-stream"
_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})", re.ASCII | re.IGNORECASE)


def blob_headers(
    digest: Digest, size: int | None, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The headers of every blob answer; `size` None: not known yet (a streamed fetch)."""
    headers = {
        "Docker-Content-Digest": str(digest),
        "Content-Type": BLOB_CONTENT_TYPE,
        "ETag": f'"{digest}"',
        "Cache-Control": "max-age=31536000",
        "Accept-Ranges": "bytes",
    }
    if size is not None:
        headers["Content-Length"] = str(size)
    if extra:
        headers.update(extra)
    return headers


def _matches(header: str, digest: Digest) -> bool:
    """Whether an `If-Match`/`If-None-Match` list names this blob (weak or strong, or `*`)."""
    tag = f'"{digest}"'
    for item in header.split(","):
        item = item.strip()
        if item == "*" or item.removeprefix("W/") == tag:
            return True
    return False


def _precondition(request: web.Request, digest: Digest) -> int | None:
    """304 or 412 when a conditional header says so, else None."""
    if_match = request.headers.get("If-Match")
    if if_match is not None and not _matches(if_match, digest):
        return 412
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None and _matches(if_none_match, digest):
        return 304
    return None


def byte_range(request: web.Request, digest: Digest, size: int) -> tuple[int, int] | None:
    """The one `[start, end)` span a `Range` asks for, or None for the whole blob.

    416 for a bytes range that is garbled or starts past the end; a list of ranges, an
    unknown range unit, or an `If-Range` naming another validator get the whole blob.
    """
    header = request.headers.get("Range")
    if header is None or "," in header or not header.strip().lower().startswith("bytes="):
        return None  # no range, a list of ranges, or a unit other than bytes (RFC 9110 14.2)
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range.strip() != f'"{digest}"':
        return None
    match = _RANGE.fullmatch(header.strip())
    unsatisfiable = RangeNotSatisfiable(
        f"range {header[:100]!r} not satisfiable for {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )
    if match is None or match.group(1) == match.group(2) == "":
        raise unsatisfiable
    first, last = match.group(1), match.group(2)
    if first == "":  # the last N bytes
        count = int(last)
        if count == 0:
            raise unsatisfiable
        return max(0, size - count), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or end <= start:
        raise unsatisfiable
    return start, end


#: how long a presigned blob URL stays valid (`[s3] redirect`): long enough to start the
#: download, short enough that a leaked URL is soon worthless
REDIRECT_SECONDS = 300
#: bytes read from an object store per step while relaying a blob
RELAY_CHUNK = 1024 * 1024
#: the smallest span relayed by splice (smaller ones: a connection and a presigned URL
#: of their own cost more than the copies they save)
SPLICE_MIN = 1024 * 1024
#: bytes read from a local blob file per step when the connection is TLS (see
#: `_send_file_tls`): large enough that OpenSSL writes full records back to back and the
#: thread hop is paid once per MiB, small enough to bound each connection's memory
TLS_CHUNK = 2 * 1024 * 1024
#: the smallest span sent over TLS by a `tls_sender` thread: below it, lending the
#: connection costs about what the thread saves (pulls of 4 KiB and 64 KiB blobs over
#: one keep-alive connection: the same requests/s either way); from it on the thread
#: wins (256 KiB: 698 against 610 requests/s; 1 MiB: 474 against 414)
TLS_THREAD_MIN = 256 * 1024
#: bytes handed to the TLS transport per write: OpenSSL copies them into its record buffer
#: and its output buffer, and asyncio copies that out again; pieces this small stay in
#: the CPU's cache from one copy to the next (single-stream pull: ~0.85 CPU-seconds per
#: GiB against ~1.0-1.3 with whole 2 MiB pieces)
TLS_WRITE = 256 * 1024


def _open(path: os.PathLike[str] | str) -> tuple[BinaryIO, int]:
    handle = open(path, "rb")  # noqa: SIM115 (closed by send_blob_file)
    return handle, os.fstat(handle.fileno()).st_size


def _span_headers(
    request: web.Request, digest: Digest, size: int, extra: dict[str, str] | None
) -> tuple[int, int, web.StreamResponse]:
    """The byte span to send and a response with its status and headers."""
    span = byte_range(request, digest, size)
    start, end = span if span is not None else (0, size)
    headers = blob_headers(digest, end - start, extra)
    response = web.StreamResponse(status=200 if span is None else 206, headers=headers)
    if span is not None:
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    response.content_length = end - start
    return start, end, response


async def send_blob_file(
    request: web.Request,
    store: Store,
    digest: Digest,
    offload: Offload,
    extra: dict[str, str] | None = None,
    redirect: bool = False,
) -> web.StreamResponse:
    """A stored blob: conditionals, one Range, HEAD. From local disk the body is
    sendfile'd (asyncio falls back to reads and writes where the transport cannot, as
    with TLS); from an object store it is relayed in a stream, or (`redirect`) the client
    is sent to a short-lived presigned URL."""
    status = _precondition(request, digest)
    if status is not None:
        return web.Response(status=status, headers=blob_headers(digest, None, extra))
    path = store.blob_path(digest)
    if store.backend.local_path(path) is None:
        return await _send_remote(request, store, digest, offload, extra, redirect)
    try:
        handle, size = await offload.run(_open, path)
    except FileNotFoundError:
        raise BlobUnknown(detail={"digest": str(digest)}) from None
    try:
        start, end, response = _span_headers(request, digest, size, extra)
        await response.prepare(request)
        if request.method != "HEAD" and end > start:
            await send_span(request, response, handle, digest, start, end, offload)
        await response.write_eof()
        return response
    finally:
        await offload.run(handle.close)


async def send_span(
    request: web.Request,
    response: web.StreamResponse,
    handle: BinaryIO,
    digest: Digest,
    start: int,
    end: int,
    offload: Offload,
) -> None:
    """Bytes `[start, end)` of a local blob file (stored, or a spool file as a fetch fills
    it) as part of `response`'s body, already prepared with a Content-Length: by the
    kernel's sendfile over plain HTTP; over TLS by a `tls_sender` thread from
    `TLS_THREAD_MIN` bytes on, else (or with every sender busy) by the event loop."""
    if _over_tls(request):
        by_thread = end - start >= TLS_THREAD_MIN
        if not (by_thread and await _send_file_by_thread(request, handle, digest, start, end)):
            await _send_file_tls(request, response, handle, digest, start, end, offload)
    else:
        await send_file_range(request, handle, start, end - start)


def _over_tls(request: web.Request) -> bool:
    """Whether the connection is TLS that regproxy terminates (the socket carries
    ciphertext, so the kernel's sendfile cannot send the file)."""
    transport = request.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


async def _send_file_by_thread(
    request: web.Request, handle: BinaryIO, digest: Digest, start: int, end: int
) -> bool:
    """Bytes `[start, end)` of a local blob over TLS, read, encrypted and written by a
    thread of `tls_sender` (see there why); False, nothing sent, when no sender is free or
    the connection cannot be lent (then `_send_file_tls` sends them). The thread has a
    duplicate of the file's descriptor, and the connection until it ends, however this
    request ends (`direct_send.Senders.run`)."""
    senders = tls_sender.senders
    if not senders.take():
        return False
    handover = None
    try:
        if await asyncio_tls.flushed(request.transport):
            handover = asyncio_tls.take(request.transport)
    finally:
        if handover is None:
            senders.free()
    if handover is None:
        return False
    try:
        file_fd = os.dup(handle.fileno())
    except OSError:  # out of descriptors: the event loop sends it, with the file it has
        handover.give_back(None)
        senders.free()
        return False
    stop = threading.Event()
    stall = float(request.app[CONFIG].server.body_timeout)

    def release(error: BaseException | None) -> None:
        os.close(file_fd)
        assert handover is not None
        handover.give_back(error)

    work = functools.partial(
        tls_sender.send_file, handover.channel, file_fd, start, end, stall, stop
    )
    try:
        await senders.run(work, stop, release)
    except tls_sender.ClientGone as exc:
        raise ConnectionResetError(str(exc)) from None
    except (tls_sender.ClientStalled, tls_sender.FileEnded, tls_sender.TlsFailed) as exc:
        # the connection is cut (`Handover.give_back`): a short body never looks complete
        log.warning("sending %s over TLS, connection cut: %s", digest, exc)
        raise ConnectionResetError(str(exc)) from None
    return True


async def _send_file_tls(
    request: web.Request,
    response: web.StreamResponse,
    handle: BinaryIO,
    digest: Digest,
    start: int,
    end: int,
    offload: Offload,
) -> None:
    """Bytes `[start, end)` of a local blob over TLS: read in `TLS_CHUNK` pieces on a
    storage thread into two buffers used in turn, the next piece read while this one is
    encrypted and sent (in `TLS_WRITE` slices, no copies). Reused buffers keep their
    pages mapped and warm: a new 2 MiB `bytes` per piece cost ~3 % more CPU per GiB and
    ~5 % of throughput (A/B, 1 GiB pulls, six each).

    Why: asyncio's sendfile falls back, on a TLS transport, to 16 KiB reads, each a hop
    to the default executor and a drain before its write, so disk, encryption and socket
    took turns (~100 MB/s where a TLS transport moves ~400-500 MB/s here). One large
    write lets OpenSSL make full 16 KiB records back to back, and the read ahead keeps
    the disk off the critical path.

    Memory per connection is bounded, however large the blob and however slow the
    client: the piece read ahead and the piece being sent (the two buffers), which goes
    to the transport `TLS_WRITE` bytes at a time; asyncio's SSL protocol encrypts each
    write at once into its outgoing buffer, which moves on to the socket transport's
    buffer, and
    `response.write` waits (drains) while the SSL protocol holds more than its high-water
    mark (512 KiB). So a connection holds at most about
    `2 * TLS_CHUNK + 2 * (TLS_WRITE + 512 KiB)` (5.5 MiB) besides the kernel's socket
    buffer (`tests/server/test_tls_transfers.py` checks it with a client that stops
    reading)."""
    fd = handle.fileno()
    size = min(TLS_CHUNK, end - start)  # a small blob gets a small buffer
    spare: list[bytearray] = []

    def read(position: int) -> asyncio.Future[memoryview]:
        buffer = _free_buffer(spare.pop()) if spare else bytearray(size)
        count = min(TLS_CHUNK, end - position)
        return asyncio.ensure_future(offload.run(_read_piece_into, fd, buffer, count, position))

    position = start
    reading: asyncio.Future[memoryview] | None = read(position)
    try:
        while reading is not None:
            piece = await reading
            if not piece:  # shorter than its size said: cut, never a clean-looking short body
                log.warning("blob file %s ended early, connection cut", digest)
                if request.transport is not None:
                    request.transport.abort()
                raise ConnectionResetError("blob file ended early")
            position += len(piece)
            reading = read(position) if position < end else None
            for at in range(0, len(piece), TLS_WRITE):
                await response.write(piece[at : at + TLS_WRITE])
            spare.append(piece.obj)  # type: ignore[arg-type]
            piece.release()
    finally:
        if reading is not None and not reading.done():
            # a client that left: the read finishes before the caller closes the file
            with contextlib.suppress(Exception):
                await asyncio.shield(reading)


def _free_buffer(buffer: bytearray) -> bytearray:
    """`buffer` when nothing else holds a view of it any more (asyncio's SSL protocol
    encrypts each write at once, so none should), else a new one: a buffer still
    referenced is never written over."""
    try:
        buffer.append(0)  # a bytearray with live exports refuses to change size
    except BufferError:
        return bytearray(len(buffer))
    del buffer[-1]
    return buffer


def _read_piece_into(fd: int, buffer: bytearray, count: int, position: int) -> memoryview:
    """On a storage thread: `count` bytes of a blob file from `position` (fewer at its
    end) into `buffer`, reused from piece to piece: its pages stay mapped and warm."""
    view = memoryview(buffer)
    got = os.preadv(fd, [view[:count]], position)
    piece = view[:got]
    view.release()
    return piece


async def _send_remote(
    request: web.Request,
    store: Store,
    digest: Digest,
    offload: Offload,
    extra: dict[str, str] | None,
    redirect: bool,
) -> web.StreamResponse:
    path = store.blob_path(digest)
    if redirect and request.method == "GET":
        url = await offload.run(store.backend.presign, path, REDIRECT_SECONDS)
        if url is not None:
            headers = {**blob_headers(digest, None, extra), "Location": url}
            return web.Response(status=307, headers=headers)
    size = await offload.run(store.backend.size, path)
    if size is None:
        raise BlobUnknown(detail={"digest": str(digest)})
    start, end, response = _span_headers(request, digest, size, extra)
    if request.method == "HEAD" or end <= start:
        await response.prepare(request)
        await response.write_eof()
        return response
    stall = float(request.app[CONFIG].server.body_timeout)
    if end - start >= SPLICE_MIN and _can_splice(request):
        source = None
        try:
            source = await _open_source(store, path, digest, start, end, offload)
        finally:
            if source is None:
                splice_relay.free_slot()
        if source is not None:
            return await _relay_spliced(request, response, source, digest, stall, offload)
    try:
        stream = await offload.run(store.backend.open_read, path, start, end)
    except FileNotFoundError:
        raise BlobUnknown(detail={"digest": str(digest)}) from None
    return await _relay_stream(request, response, stream, digest, end - start, stall, offload)


def _can_splice(request: web.Request) -> bool:
    """Whether a relay may go by splice: the platform has it, the client's connection is
    plain TCP, and a relay slot is free (taken here: the caller frees it)."""
    return splice_relay.available() and not _over_tls(request) and splice_relay.take_slot()


async def _open_source(
    store: Store, path: Path, digest: Digest, start: int, end: int, offload: Offload
) -> splice_relay.Source | None:
    """The object store's ranged answer on a socket of our own, or None when the blob
    cannot be fetched that way (no plain-HTTP URL, any other answer than the body asked
    for: the S3 client then fetches it and maps the store's error)."""
    url = await offload.run(store.backend.plain_http_url, path, REDIRECT_SECONDS)
    if url is None:
        return None
    opening = asyncio.get_running_loop().run_in_executor(
        splice_relay.executor,
        splice_relay.open_source,
        url,
        start,
        end,
        s3client.CONNECT_TIMEOUT,  # as for the S3 client's own requests
        s3client.READ_TIMEOUT,
    )
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):  # the thread's connection must not leak
            (await opening).close()
        raise
    except FileNotFoundError:
        raise BlobUnknown(detail={"digest": str(digest)}) from None
    except (splice_relay.SourceRefused, OSError) as exc:
        log.info("relaying %s through the S3 client: %s", digest, exc)
        return None


async def _relay_spliced(
    request: web.Request,
    response: web.StreamResponse,
    source: splice_relay.Source,
    digest: Digest,
    stall: float,
    offload: Offload,
) -> web.StreamResponse:
    """The source's body to the client by the kernel (`splice_relay.relay` on its own
    thread), or by aiohttp's writes when the client's socket cannot be had. Owns the
    source and the relay slot taken for it: a thread has both, with a duplicate of the
    client's socket, until it ends, however this request ends (`Senders.run`)."""
    relaying = False
    try:
        await response.prepare(request)
        fd = await aiohttp_adapter.direct_socket(request)
        if fd is None:
            return await _relay_stream(
                request, response, source, digest, source.count, stall, offload
            )
        stop = threading.Event()

        def release(error: BaseException | None) -> None:
            os.close(fd)
            source.close()

        relaying = True
        try:
            work = functools.partial(splice_relay.relay, source, fd, stall, stop)
            await splice_relay.relays.run(work, stop, release)
        except splice_relay.ClientStalled as exc:
            return _cut_short(request, response, digest, str(exc), client=True)
        except splice_relay.SourceFailed as exc:
            return _cut_short(request, response, digest, str(exc))
        except splice_relay.ClientGone as exc:
            raise ConnectionResetError(str(exc)) from None
        except asyncio.CancelledError:
            if request.transport is not None:  # the body ends short: never clean-looking
                request.transport.abort()
            raise
        await response.write_eof()
        return response
    finally:
        if not relaying:
            source.close()
            splice_relay.free_slot()


async def _relay_stream(
    request: web.Request,
    response: web.StreamResponse,
    stream: BinaryIO | splice_relay.Source,
    digest: Digest,
    count: int,
    stall: float,
    offload: Offload,
) -> web.StreamResponse:
    """`count` bytes of `stream` to the client through aiohttp, each piece read on a
    storage thread while the last one is written."""
    reading: asyncio.Future[bytes] | None = None
    try:
        await response.prepare(request)  # nothing when already prepared
        left = count
        # the next chunk is read from the object store while this one goes to the client
        reading = asyncio.ensure_future(offload.run(stream.read, min(RELAY_CHUNK, left)))
        while left > 0:
            try:
                chunk = await reading
            except Exception as exc:
                return _cut_short(request, response, digest, " ".join(str(exc).split()))
            if not chunk:
                return _cut_short(request, response, digest, "it ended the blob early")
            left -= len(chunk)
            if left > 0:
                reading = asyncio.ensure_future(offload.run(stream.read, min(RELAY_CHUNK, left)))
            try:
                # a client that takes nothing must not hold the object store's connection
                async with asyncio.timeout(stall):
                    await response.write(chunk)
            except TimeoutError:
                reason = f"the client took nothing for {stall:g} s"
                return _cut_short(request, response, digest, reason, client=True)
        await response.write_eof()
        return response
    finally:
        if reading is not None and not reading.done():
            # a client that left: the read in its thread finishes before the stream closes
            with contextlib.suppress(Exception):
                await asyncio.shield(reading)
        await offload.run(stream.close)


def _cut_short(
    request: web.Request,
    response: web.StreamResponse,
    digest: Digest,
    reason: str,
    client: bool = False,
) -> web.StreamResponse:
    """The object store failed while its blob was relayed (or, `client`, the client took
    nothing for too long): the status line and part of the body are out, so no error
    answer can follow (it would land inside the body), and a short body must never look
    complete. The connection is aborted, and the failure logged in one line (raising
    would make aiohttp log a traceback per download)."""
    who = "client stalled" if client else "object store failed"
    log.warning("%s while relaying %s, connection cut: %s", who, digest, reason[:300])
    if request.transport is not None:
        request.transport.abort()
    return response


def blob_head_response(
    request: web.Request, digest: Digest, size: int | None, extra: dict[str, str] | None = None
) -> web.Response:
    """HEAD of a blob: no file is opened (clients HEAD every layer); `size` None when
    an upstream did not say."""
    status = _precondition(request, digest)
    if status is not None:
        return web.Response(status=status, headers=blob_headers(digest, None, extra))
    return web.Response(headers=blob_headers(digest, size, extra))


def manifest_response(stored: StoredManifest, head: bool) -> web.Response:
    headers = {
        "Docker-Content-Digest": str(stored.digest),
        "ETag": f'"{stored.digest}"',
        "Content-Type": stored.media_type,
    }
    if head:
        # aiohttp's content_length setter raises on web.Response: set the header itself
        headers["Content-Length"] = str(len(stored.data))
        return web.Response(headers=headers)
    return web.Response(body=stored.data, headers=headers)
