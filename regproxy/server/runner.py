"""Run an app: listen (HTTP or HTTPS), reload the certificate on SIGHUP, stop gracefully.

Slow clients: a connection that has not completed its first request's headers
within `HEADER_TIMEOUT` is closed, idle keep-alive connections after
`KEEPALIVE_TIMEOUT`, and request bodies that stall after `server.body_timeout`
(see `bodies.py`), so a slow-loris client cannot hold connections forever.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web

from regproxy.aiohttp_adapter import DeadlineRunner
from regproxy.config import Config, split_listen
from regproxy.errors import ConfigError
from regproxy.server import ops
from regproxy.server.app import create_app
from regproxy.server.keys import CONFIG
from regproxy.server.tls_suites import prefer_aes128
from regproxy.server.workers import REPLICA, Worker, replica_hook

log = logging.getLogger("regproxy")

HEADER_TIMEOUT = 30.0
KEEPALIVE_TIMEOUT = 75.0


class ListenError(OSError):
    """Binding `address` failed. Kept apart from the other start-up OSErrors (the stores'),
    so `serve` blames the address only when the address is at fault."""

    def __init__(self, address: str, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.address = address


class GuardedRunner(DeadlineRunner):
    """The runner `serve` uses: connections that send no whole request head within
    `HEADER_TIMEOUT` (read for each new connection, so tests can shorten it) are closed."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, header_timeout=lambda: HEADER_TIMEOUT, **kwargs)


def tls_context(config: Config) -> ssl.SSLContext | None:
    """A server TLS context from `[server] tls_certificate/tls_key`, or None for plain HTTP."""
    cert, key = config.server.tls_certificate, config.server.tls_key
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    prefer_aes128(context)  # what Go's servers pick: less CPU per byte sent (tls_suites)
    try:
        context.load_cert_chain(cert, key)
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            raise
        raise ConfigError(
            f"server.tls_certificate/tls_key: {exc.strerror}: {exc.filename}"
        ) from None
    return context


def reload_tls(context: ssl.SSLContext, config: Config) -> None:
    """Load the certificate files again: new connections get them, open ones keep theirs."""
    try:
        assert config.server.tls_certificate is not None  # only called when TLS is on
        context.load_cert_chain(config.server.tls_certificate, config.server.tls_key)
        log.info("TLS certificate reloaded from %s", config.server.tls_certificate)
    except (OSError, ssl.SSLError) as exc:
        log.error("TLS certificate reload failed, keeping the old one: %s", exc)


def _runner(app: web.Application, config: Config) -> GuardedRunner:
    return GuardedRunner(
        app,
        handle_signals=False,
        shutdown_timeout=config.server.shutdown_timeout,
        access_log=None,  # server.logs.access_middleware writes the access lines
        keepalive_timeout=KEEPALIVE_TIMEOUT,
    )


def _handle_signals(stop: asyncio.Event, context: ssl.SSLContext | None, config: Config) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if context is not None:
        loop.add_signal_handler(signal.SIGHUP, reload_tls, context, config)


async def _start_ops(
    app: web.Application, sockets: list[socket.socket] | None = None
) -> web.AppRunner | None:
    """The `metrics.listen` listener (`ops.ops_app`), on `sockets` when the supervisor bound
    them; its answers name the replica too. The caller cleans it up before `app`'s runner."""
    listen = app[CONFIG].metrics.listen
    if listen is None:
        return None
    ops_app = ops.ops_app(app)
    ops_app.on_response_prepare.append(replica_hook(app[REPLICA]))
    # access lines come from logs.access_middleware, as on the main listener
    ops_runner = web.AppRunner(ops_app, handle_signals=False, access_log=None)
    await ops_runner.setup()
    try:
        if sockets is None:
            host, port = split_listen(listen)
            await web.TCPSite(ops_runner, host, port).start()
        else:
            for sock in sockets:
                await web.SockSite(ops_runner, sock).start()
    except BaseException:
        await ops_runner.cleanup()
        raise
    if sockets is None:
        for address in ops_runner.addresses:
            shown = f"[{address[0]}]" if ":" in address[0] else address[0]
            log.info("metrics listening on http://%s:%d/metrics", shown, address[1])
    return ops_runner


async def serve(config: Config, version: str) -> None:
    """Serve until SIGTERM or SIGINT; in-flight requests get `shutdown_timeout` to finish."""
    app = create_app(config)
    runner = _runner(app, config)
    context = tls_context(config)
    await runner.setup()
    stop = asyncio.Event()
    _handle_signals(stop, context, config)
    ops_runner: web.AppRunner | None = None
    try:
        site = web.TCPSite(
            runner, config.server.host, config.server.port, ssl_context=context, backlog=1024
        )
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(config.server.listen, exc) from exc
        scheme = "https" if context is not None else "http"
        for address in runner.addresses:
            host, port = address[0], address[1]
            shown = f"[{host}]" if ":" in host else host
            log.info("regproxy %s listening on %s://%s:%d", version, scheme, shown, port)
        try:
            ops_runner = await _start_ops(app)
        except OSError as exc:
            raise ListenError(str(config.metrics.listen), exc) from exc
        await stop.wait()
        log.info("shutting down: finishing in-flight requests")
    finally:
        if ops_runner is not None:
            await ops_runner.cleanup()
        await runner.cleanup()
    log.info("stopped")


async def serve_worker(
    config: Config,
    version: str,
    worker: Worker,
    sockets: list[socket.socket],
    ops_sockets: list[socket.socket],
    context: ssl.SSLContext | None,
    ready: Callable[[], None],
) -> None:
    """Worker `worker.number` of a supervisor (`supervisor.py`): serve on the sockets it
    bound until SIGTERM or SIGINT, like `serve`; `ready()` once they accept connections."""
    app = create_app(config, worker)
    runner = _runner(app, config)
    await runner.setup()
    stop = asyncio.Event()
    _handle_signals(stop, context, config)
    if context is None:  # a terminal's hang-up must not end a worker
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: None)
    ops_runner: web.AppRunner | None = None
    try:
        for sock in sockets:
            await web.SockSite(runner, sock, ssl_context=context, backlog=1024).start()
        ops_runner = await _start_ops(app, ops_sockets)
        log.debug("worker %d of regproxy %s serving", worker.number, version)
        ready()
        await stop.wait()
        log.debug("worker %d shutting down: finishing in-flight requests", worker.number)
    finally:
        if ops_runner is not None:
            await ops_runner.cleanup()
        await runner.cleanup()


def run_worker(
    config: Config,
    version: str,
    worker: Worker,
    sockets: list[socket.socket],
    ops_sockets: list[socket.socket],
    context: ssl.SSLContext | None,
    ready: Callable[[], None],
) -> None:
    asyncio.run(serve_worker(config, version, worker, sockets, ops_sockets, context, ready))
