"""Response builders shared by local and proxied pulls."""

from __future__ import annotations

from aiohttp import web

from regproxy.digest import Digest
from regproxy.storage.store import Store, StoredManifest

BLOB_CONTENT_TYPE = "application/octet-stream"


def _blob_headers(digest: Digest) -> dict[str, str]:
    return {
        "Docker-Content-Digest": str(digest),
        "Content-Type": BLOB_CONTENT_TYPE,
        "ETag": f'"{digest}"',
        "Cache-Control": "max-age=31536000",
        "Accept-Ranges": "bytes",
    }


def blob_file_response(store: Store, digest: Digest) -> web.StreamResponse:
    """A sendfile response with every header set explicitly (no guessing from the path)."""
    headers = _blob_headers(digest)
    return web.FileResponse(store.blob_path(digest), chunk_size=256 * 1024, headers=headers)


def blob_head_response(digest: Digest, size: int) -> web.Response:
    """HEAD of a blob whose size is known: no file is opened (clients HEAD every layer)."""
    headers = _blob_headers(digest)
    headers["Content-Length"] = str(size)
    return web.Response(headers=headers)


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
