"""`regproxy serve`: run the registry server until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from pathlib import Path

import click

from regproxy import __version__
from regproxy import config as config_mod
from regproxy.cli import EXIT_USAGE, config_option, create_dirs, fail, load_config


@click.command()
@config_option
@click.option("--listen", help="HOST:PORT to listen on (overrides [server] listen).")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def serve(config_path: Path | None, listen: str | None, log_level: str) -> None:
    """Run the registry server."""
    config = load_config(config_path)
    if listen is not None:
        try:
            config_mod.split_listen(listen)
        except ValueError as exc:
            fail(f"--listen: {exc}")
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, listen=listen)
        )
    create_dirs(config)
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(_serve(config))
    except OSError as exc:
        fail(f"cannot listen on {config.server.listen}: {exc.strerror}", EXIT_USAGE)
    except KeyboardInterrupt:
        pass


async def _serve(config: config_mod.Config) -> None:
    from aiohttp import web

    from regproxy.server.app import create_app

    log = logging.getLogger("regproxy")
    app = create_app(config)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=config.server.shutdown_timeout,
        access_log=logging.getLogger("regproxy.access"),
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port)
        await site.start()
        for address in runner.addresses:
            host, port = address[0], address[1]
            shown = f"[{host}]" if ":" in host else host
            log.info("regproxy %s listening on http://%s:%d", __version__, shown, port)
        await stop.wait()
        log.info("shutting down: finishing in-flight requests")
    finally:
        await runner.cleanup()
    log.info("stopped")
