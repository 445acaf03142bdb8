"""The command line: the only module that imports click and rich."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import click

from regproxy import __version__
from regproxy import config as config_mod
from regproxy.errors import ConfigError

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


def _load_config(path: Path | None) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except ConfigError as exc:
        click.echo(f"regproxy: configuration error: {exc}", err=True)
        sys.exit(EXIT_USAGE)


def _create_dirs(config: config_mod.Config) -> None:
    for folder in config.storage_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            click.echo(f"regproxy: cannot create {folder}: {exc.strerror}", err=True)
            sys.exit(EXIT_USAGE)


config_option = click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="REGPROXY_CONFIG",
    default=None,
    help="Configuration file (default: ./configuration.toml).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="regproxy")
def main() -> None:
    """regproxy: a container registry and a pull-through cache in one process."""


@main.command()
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
    config = _load_config(config_path)
    if listen is not None:
        try:
            config_mod.split_listen(listen)
        except ValueError as exc:
            click.echo(f"regproxy: --listen: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        import dataclasses

        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, listen=listen)
        )
    _create_dirs(config)
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(_serve(config))
    except OSError as exc:
        click.echo(f"regproxy: cannot listen on {config.server.listen}: {exc.strerror}", err=True)
        sys.exit(EXIT_USAGE)
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
