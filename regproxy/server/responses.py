"""Response builders shared by local and proxied pulls."""

from __future__ import annotations

from aiohttp import web

from regproxy.digest import Digest
from regproxy.storage.store import Store, StoredManifest

BLOB_CONTENT_TYPE = "application/octet-stream"


def blob_file_response(store: Store, digest: Digest) -> web.StreamResponse:
    """A sendfile response with every header set explicitly (no guessing from the path)."""
    headers = {
        "Docker-Content-Digest": str(digest),
        "Content-Type": BLOB_CONTENT_TYPE,
        "ETag": f'"{digest}"',
        "Cache-Control": "max-age=31536000",
        "Accept-Ranges": "bytes",
    }
    return web.FileResponse(store.blob_path(digest), chunk_size=256 * 1024, headers=headers)


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
