"""`FakeUpstream` over TLS: a registry signed by a test CA, optionally demanding a client
certificate (mutual TLS), with its "CDN" on another host name (`localhost`).

The registry listens on 127.0.0.1 and the CDN on `localhost` (the test CA's server
certificates name both), so a redirected blob GET goes to another host: one a
`NO_PROXY` entry can name on its own.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from aiohttp import web

from .certs import TestCA
from .fake_upstream import FakeUpstream


class TlsFakeUpstream(FakeUpstream):
    """A `FakeUpstream` whose listeners speak TLS with a certificate from `ca`; with
    `require_client_certificate` the registry (not its CDN) demands one from `ca`."""

    def __init__(
        self, ca: TestCA, directory: Path, *, require_client_certificate: bool = False
    ) -> None:
        super().__init__(host="127.0.0.1", cdn_host="localhost")
        self.ca = ca
        cert = ca.issue(directory / "server")
        self.contexts: dict[str, ssl.SSLContext] = {}
        for listener in ("main", "cdn"):
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert.certificate, cert.key)
            # a CDN asks nobody for a certificate: only the registry itself does
            if require_client_certificate and listener == "main":
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(cafile=str(ca.ca_file))
            self.contexts[listener] = context

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def cdn_url(self) -> str:
        return f"https://{self.cdn_host}:{self.cdn_port}"

    async def _listen(
        self, listener: Literal["main", "cdn"], host: str, port: int
    ) -> tuple[web.AppRunner, int]:
        """As `FakeUpstream._listen`, with the TLS context (the CDN on 127.0.0.1 too:
        `localhost` may resolve to ::1 first, and the fake listens on IPv4 only)."""

        async def handler(request: web.Request) -> web.StreamResponse:
            self.in_flight += 1
            try:
                return await self._dispatch(request, listener)
            finally:
                self.in_flight -= 1

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        site = web.TCPSite(
            runner, "127.0.0.1", port, reuse_address=True, ssl_context=self.contexts[listener]
        )
        deadline = time.monotonic() + 5
        while True:
            try:
                await site.start()
                break
            except OSError:
                if port == 0 or time.monotonic() > deadline:
                    await runner.cleanup()
                    raise
                await asyncio.sleep(0.05)
        server = site._server  # the asyncio server: the only way to learn an ephemeral port
        assert server is not None
        bound = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return runner, bound


async def running(upstream: TlsFakeUpstream) -> AsyncIterator[TlsFakeUpstream]:
    """`upstream` started, for a fixture to yield from; closed when the fixture ends."""
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()
