"""Blobs: GET/HEAD (sendfile, Range) and DELETE."""

from __future__ import annotations

from aiohttp import web

from regproxy.digest import Digest
from regproxy.server import proxied
from regproxy.server.keys import CONFIG, OFFLOAD, REGISTRY
from regproxy.server.names import local_name_for_write, read_target
from regproxy.server.responses import blob_head_response, send_blob_file


async def get_blob(request: web.Request) -> web.StreamResponse:
    target = await read_target(request)
    digest = Digest.parse(request.match_info["digest"])
    if not isinstance(target, str):
        return await proxied.get_blob(request, target, digest)
    name = target
    store = request.app[REGISTRY]
    offload = request.app[OFFLOAD]
    # two stat calls on disk; BlobUnknown when not visible
    size = await offload.metadata(store.backend.local, store.blob_size, name, digest)
    if request.method == "HEAD":
        return blob_head_response(request, digest, size)
    redirect = request.app[CONFIG].s3.redirect
    return await send_blob_file(request, store, digest, offload, redirect=redirect)


async def delete_blob(request: web.Request) -> web.Response:
    name = await local_name_for_write(request)
    digest = Digest.parse(request.match_info["digest"])
    store = request.app[REGISTRY]
    await request.app[OFFLOAD].run(store.unlink_blob, name, digest)
    return web.Response(status=202, headers={"Docker-Content-Digest": str(digest)})
