"""Pulls under the proxy prefix: manifests, blobs, tags and referrers from the cache."""

from __future__ import annotations

import contextlib

from aiohttp import web

from regproxy.digest import Digest
from regproxy.proxy.cache import CACHE_STATUS, HIT, MISS
from regproxy.proxy.flights import FlightFailed
from regproxy.reference import ProxyName
from regproxy.server.keys import OFFLOAD, PROXY
from regproxy.server.responses import BLOB_CONTENT_TYPE, blob_file_response, manifest_response


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
    return response


async def get_blob(request: web.Request, target: ProxyName, digest: Digest) -> web.StreamResponse:
    cache = request.app[PROXY]
    if request.method == "HEAD" and not cache.store.has_blob(digest):
        size = await cache.blob_head(target, digest)
        response = web.Response(
            headers={
                "Docker-Content-Digest": str(digest),
                "Content-Type": BLOB_CONTENT_TYPE,
                CACHE_STATUS: MISS,
            }
        )
        if size is not None:
            # aiohttp's content_length setter raises on web.Response: set the header itself
            response.headers["Content-Length"] = str(size)
        return response
    cached = await cache.blob(target, digest)
    flight = cached.flight
    if flight is None:
        response = blob_file_response(cache.store, digest)
        response.headers[CACHE_STATUS] = HIT
        return response
    what = f"blob {digest}"
    try:
        await flight.wait_ready()
        if request.http_range.start is not None or request.http_range.stop is not None:
            await flight.wait_done()  # a Range is answered from the committed file
            response = blob_file_response(cache.store, digest)
            response.headers[CACHE_STATUS] = MISS
            return response
    except FlightFailed as exc:
        raise cache.flight_error(exc, what) from None
    response = web.StreamResponse(
        headers={
            "Docker-Content-Digest": str(digest),
            "Content-Type": BLOB_CONTENT_TYPE,
            CACHE_STATUS: MISS,
        }
    )
    if flight.total is not None:
        response.content_length = flight.total
    else:
        response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        async with contextlib.aclosing(flight.read(request.app[OFFLOAD])) as chunks:
            async for chunk in chunks:
                await response.write(chunk)
    except FlightFailed:
        # never let a failed fetch look like a complete body: cut the connection
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("upstream fetch failed") from None
    await response.write_eof()
    return response
