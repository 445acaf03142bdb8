"""Who is on the other end: the client address that per-client limits count by."""

from __future__ import annotations

from aiohttp import web

from regproxy.server.keys import CONFIG


def client_address(request: web.Request) -> str:
    """The peer's address; behind a trusted reverse proxy, the address it forwarded.

    The right-most `X-Forwarded-For` entry is the one our own proxy appended; entries
    to its left come from the client and prove nothing, so they are not used.
    """
    if request.app[CONFIG].server.trust_forwarded_headers:
        forwarded = request.headers.get("X-Forwarded-For", "")
        last = forwarded.rpartition(",")[2].strip()
        if last:
            return last[:64]
    return request.remote or "-"
