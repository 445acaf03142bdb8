"""`GET /v2/`: the API version check every client starts with."""

from __future__ import annotations

from aiohttp import web

_BODY = b"{}"


async def version_check(_request: web.Request) -> web.Response:
    return web.Response(body=_BODY, content_type="application/json")
