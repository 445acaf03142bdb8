"""Forwarding a request to the replica that holds what it needs (`storage.replicas`).

An upload session's bytes and a blob being fetched from upstream live on one replica's
host. A request for them that the load balancer sent elsewhere is relayed, as it came,
to that replica (its `advertise_url`), and the answer relayed back: the client never
knows. The owner decides everything again from the relayed request (authentication
included: replicas share the token signing key and the htpasswd file); a relayed request
carries `X-Regproxy-Forwarded`, and such a request is never relayed again, so a stale
record cannot make two replicas bounce a request between them.

What the client sees when the owner cannot be reached is the caller's choice: an upload
session is then unknown (the client starts the blob again, as after any lost session),
a blob fetch is done here instead.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

import aiohttp
from aiohttp import web

from regproxy.config import Config
from regproxy.server.bodies import pieces
from regproxy.storage.replicas import Replica

log = logging.getLogger("regproxy.replicas")

#: on a relayed request: the id of the replica that relayed it
FORWARDED_HEADER = "X-Regproxy-Forwarded"
#: request headers that reach the owner (the rest are hop-by-hop or set by the client)
_REQUEST_HEADERS = (
    "Authorization",
    "Accept",
    "Content-Type",
    "Content-Range",
    "Content-Length",
    "Range",
    "If-None-Match",
    "If-Modified-Since",
    "If-Range",
    "User-Agent",
)
#: response headers never relayed: hop-by-hop, or set again by this server
_DROPPED_RESPONSE_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Transfer-Encoding",
        "Content-Length",
        "Date",
        "Server",
        "X-Regproxy-Replica",
        "Docker-Distribution-API-Version",
    )
)
#: bytes relayed per write of a streamed answer
RELAY_CHUNK = 1024 * 1024
#: connections to other replicas, all together (each relayed request holds one)
MAX_CONNECTIONS = 128


def advertise_url(config: Config) -> str | None:
    """How other replicas reach this one: `[server] advertise_url`, or made from `listen`
    (None when the port is chosen by the system at start)."""
    server = config.server
    if server.advertise_url:
        return server.advertise_url.rstrip("/")
    host, port = server.host, server.port
    if port == 0:
        return None
    scheme = "https" if server.tls_certificate is not None else "http"
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.getfqdn()
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def forwarded(request: web.Request) -> bool:
    """Whether another replica relayed this request here (never relay it again)."""
    return FORWARDED_HEADER in request.headers


class Forwarder:
    """One pooled HTTP client for relaying requests to other replicas."""

    def __init__(self, config: Config, own_id: str) -> None:
        self.own_id = own_id
        self._ssl = _peer_tls(config)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=600),
                auto_decompress=False,
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, ssl=self._ssl),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def relay(self, request: web.Request, owner: Replica) -> web.StreamResponse | None:
        """Send `request` to `owner` and its answer back to the client; None when the
        owner could not be reached before it answered (nothing was sent to the client).
        A failure after the answer started cuts the client's connection: a body is never
        made to look complete when it is not."""
        assert owner.url is not None
        headers = {h: v for h in _REQUEST_HEADERS if (v := request.headers.get(h)) is not None}
        headers[FORWARDED_HEADER] = self.own_id
        body = pieces(request) if request.body_exists else None
        try:
            upstream = await self._client().request(
                request.method,
                owner.url + request.path_qs,
                headers=headers,
                data=body,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.warning("replica %s (%s) unreachable: %s", owner.name, owner.url, exc)
            return None
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in _DROPPED_RESPONSE_HEADERS:
                    response.headers.add(name, value)
            if request.method == "HEAD" or upstream.status in (204, 304):
                if upstream.content_length is not None:
                    response.headers["Content-Length"] = str(upstream.content_length)
                await response.prepare(request)
                return response
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            else:
                response.enable_chunked_encoding()
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_chunked(RELAY_CHUNK):
                    await response.write(chunk)
                if not upstream.content.at_eof():
                    raise aiohttp.ClientPayloadError("the answer ended early")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                log.warning("relay from replica %s cut off: %s", owner.name, exc)
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write_eof()
            return response


def _peer_tls(config: Config) -> ssl.SSLContext | bool:
    """Verify other replicas as clients verify this one: by the system's CAs, or by
    this server's own certificate file as a trust anchor (replicas serve one certificate,
    whoever signed it; the partial-chain flag lets a leaf or an intermediate anchor it).
    `advertise_url` must name a host the certificate is for."""
    server = config.server
    if server.tls_certificate is None:
        return True
    context = ssl.create_default_context()
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    try:
        context.load_verify_locations(cafile=str(server.tls_certificate))
    except (OSError, ssl.SSLError) as exc:
        log.warning("cannot trust %s for other replicas: %s", server.tls_certificate, exc)
    return context


#: the app's one `Forwarder`
FORWARDER = web.AppKey("forwarder", Forwarder)
