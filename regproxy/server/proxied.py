"""Pulls under the proxy prefix: manifests, blobs, tags and referrers from the cache."""

from __future__ import annotations

import contextlib
from typing import BinaryIO

from aiohttp import web

from regproxy.digest import Digest
from regproxy.proxy.cache import CACHE_STATUS, HIT, MISS
from regproxy.proxy.flights import BlobFlight, FlightFailed
from regproxy.reference import ProxyName
from regproxy.server.forward import FORWARDER, forwarded
from regproxy.server.keys import CONFIG, OFFLOAD, PROXY
from regproxy.server.responses import (
    blob_head_response,
    blob_headers,
    manifest_response,
    send_blob_file,
    send_span,
)


def _accept_list(request: web.Request) -> list[str]:
    return [
        part.strip()
        for header in request.headers.getall("Accept", [])
        for part in header.split(",")
        if part.strip()
    ]


async def get_manifest(request: web.Request, target: ProxyName, reference: str) -> web.Response:
    result = await request.app[PROXY].manifest(target, reference, _accept_list(request))
    response = manifest_response(result.stored, request.method == "HEAD")
    response.headers[CACHE_STATUS] = result.status
    if result.status != MISS and request.method != "HEAD":
        cache = request.app[PROXY]
        cache.stats.count(cache.stats.served_bytes, target.upstream, len(result.stored.data))
    return response


async def get_blob(request: web.Request, target: ProxyName, digest: Digest) -> web.StreamResponse:
    cache = request.app[PROXY]
    offload = request.app[OFFLOAD]
    local = cache.store.backend.local
    if request.method == "HEAD" and not await offload.metadata(local, cache.store.has_blob, digest):
        size = await cache.blob_head(target, digest)
        return blob_head_response(request, digest, size, {CACHE_STATUS: MISS})
    cached = await cache.blob(target, digest, may_relay=not forwarded(request))
    if cached.elsewhere is not None:  # another replica is fetching it: read it there
        relayed = await request.app[FORWARDER].relay(request, cached.elsewhere)
        if relayed is not None:
            return relayed
        cached = await cache.blob(target, digest, may_relay=False)  # it is gone: fetch here
    flight = cached.flight
    if flight is None:
        offload = request.app[OFFLOAD]
        redirect = request.app[CONFIG].s3.redirect
        extra = {CACHE_STATUS: HIT}
        sent = await send_blob_file(request, cache.store, digest, offload, extra, redirect)
        if sent.status in (200, 206) and request.method != "HEAD":
            cache.stats.count(cache.stats.served_bytes, target.upstream, sent.content_length or 0)
        return sent
    what = f"blob {digest}"
    handle = flight.attach()  # before any await: the flight keeps its spool for us
    try:
        return await _stream_flight(request, flight, handle, digest, what)
    finally:
        flight.detach(handle)


async def _stream_flight(
    request: web.Request, flight: BlobFlight, handle: BinaryIO, digest: Digest, what: str
) -> web.StreamResponse:
    """Send a blob while it is being fetched: sendfile from the spool as bytes arrive."""
    cache = request.app[PROXY]
    try:
        await flight.wait_ready()
        if "Range" in request.headers:
            await flight.wait_done()  # a Range is answered from the committed file
            offload = request.app[OFFLOAD]
            extra = {CACHE_STATUS: MISS}
            redirect = request.app[CONFIG].s3.redirect
            return await send_blob_file(request, cache.store, digest, offload, extra, redirect)
    except FlightFailed as exc:
        raise cache.flight_error(exc, what) from None
    response = web.StreamResponse(headers=blob_headers(digest, None, {CACHE_STATUS: MISS}))
    if flight.total is None:
        response.enable_chunked_encoding()
    else:
        response.content_length = flight.total
    await response.prepare(request)
    transport = request.transport
    try:
        if flight.total is None:
            async with contextlib.aclosing(flight.read(handle, request.app[OFFLOAD])) as pieces:
                async for piece in pieces:
                    await response.write(piece)
        else:
            async with contextlib.aclosing(flight.spans()) as spans:
                offload = request.app[OFFLOAD]
                async for start, end in spans:
                    await send_span(request, response, handle, digest, start, end, offload)
    except FlightFailed:
        # never let a failed fetch look like a complete body: cut the connection. The
        # fetch logged its failure once; raising here would add aiohttp's traceback for
        # every reader of the blob
        if transport is not None:
            transport.abort()
        return response
    await response.write_eof()
    return response
