"""Reading request bodies: their pieces as they arrive (with the slow-client rules),
capped small bodies held in memory, and large ones taken off the socket."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

from aiohttp import web

from regproxy.aiohttp_adapter import take_request_body
from regproxy.errors import BlobUploadInvalid, ManifestTooLarge, RangeNotSatisfiable
from regproxy.server.keys import BODY_BUDGET, CLOSE_AFTER, CONFIG
from regproxy.sockbody import TakenBody, direct_length

_CONTENT_RANGE = re.compile(r"(?:bytes[ =])?(\d{1,18})-(\d{1,18})(?:/(?:\d{1,18}|\*))?")


async def pieces(request: web.Request) -> AsyncIterator[bytes]:
    """The body as it arrives. A client is cut off when it sends nothing for
    `body_timeout`, or when, after that long, it averages less than `body_min_rate`
    bytes/s: a byte every few seconds never trips the idle timeout, yet would hold the
    connection (and its upload session) for ever.

    The rate's clock runs only while this waits for the client: time the caller spends
    storing what arrived is not the client's fault.

    What aiohttp has already buffered is taken at once, in one piece and without a timer:
    a body sent in small chunks (docker's `Transfer-Encoding: chunked` PATCH comes in
    32 KiB chunks, a TLS connection in records) would otherwise cost a timer, a task
    switch and a trip through the caller per chunk."""
    server = request.app[CONFIG].server
    timeout: float = server.body_timeout
    min_rate: float = server.body_min_rate
    content = request.content
    loop = asyncio.get_running_loop()
    received = 0
    waited = 0.0
    while True:
        data = content.read_nowait()  # everything buffered now (b"": nothing is)
        if data:
            received += len(data)
            yield data
            continue
        if content.at_eof():
            return
        wait = timeout
        if min_rate > 0:
            # the average stays above `min_rate` until received / min_rate
            wait = min(wait, max(timeout, received / min_rate) - waited)
        started = loop.time()
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                data = await content.readany()
        except TimeoutError:
            if request.transport is not None:
                request.transport.close()
            if wait < timeout:
                waited += loop.time() - started
                raise BlobUploadInvalid(
                    f"body arriving at {received / waited:.0f} bytes/s, "
                    f"below the minimum of {min_rate}"
                ) from None
            raise BlobUploadInvalid(f"no body data for {timeout:g} s") from None
        waited += loop.time() - started
        if not data:
            return
        received += len(data)
        yield data


@contextlib.asynccontextmanager
async def read_capped(request: web.Request, limit: int) -> AsyncIterator[bytes]:
    """The whole body, refusing (413) anything larger than `limit` bytes, held within the
    server's memory budget for bodies until the `with` block ends."""
    length = request.content_length
    if length is not None and length > limit:
        raise ManifestTooLarge(f"body of {length} bytes exceeds {limit}")
    async with request.app[BODY_BUDGET].hold(limit if length is None else length):
        parts: list[bytes] = []
        total = 0
        async for data in pieces(request):
            total += len(data)
            if total > limit:
                raise ManifestTooLarge(f"body exceeds {limit} bytes")
            parts.append(data)
        data = b"".join(parts)
        del parts
        yield data


def take_body(request: web.Request) -> TakenBody | None:
    """The body taken away from aiohttp for `sockbody.pump`, when it is large, has a
    Content-Length, no content coding and arrives over plain TCP; else None."""
    length = direct_length(request.content_length, request.headers)
    if length is None:
        return None
    taken = take_request_body(request, length)
    if taken is not None and taken.remaining:
        # aiohttp's parser still expects these bytes: this connection cannot be reused
        request[CLOSE_AFTER] = True
    return taken


def parse_content_range(header: str, offset: int) -> tuple[int, int]:
    """`start-end` of an upload chunk; 416 when malformed or not starting at `offset`."""
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if not match:
        raise RangeNotSatisfiable(f"malformed Content-Range {header[:100]!r}")
    start, end = int(match.group(1)), int(match.group(2))
    if end < start:
        raise RangeNotSatisfiable(f"Content-Range {header[:100]!r} ends before it starts")
    if start != offset:
        raise RangeNotSatisfiable(f"chunk starts at {start}, the upload is at {offset}")
    return start, end
