"""`regproxy serve`: run the registry server until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from pathlib import Path

import click

from regproxy import __version__
from regproxy import config as config_mod
from regproxy.cli import config_option, create_dirs, fail, load_config
from regproxy.errors import ConfigError


@click.command()
@config_option
@click.option("--listen", help="HOST:PORT to listen on (overrides [server] listen).")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="Log level (overrides [log] level; default info).",
)
def serve(config_path: Path | None, listen: str | None, log_level: str | None) -> None:
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
    from regproxy.server.logs import configure_logging

    configure_logging(config.log, log_level)
    from regproxy.server.runner import ListenError

    try:
        asyncio.run(_serve(config))
    except ConfigError as exc:
        fail(f"configuration error: {exc}")
    except ssl.SSLError as exc:
        fail(f"cannot load the TLS certificate: {exc.reason or exc}")
    except ListenError as exc:
        fail(f"cannot listen on {exc.address}: {exc.strerror}")
    except OSError as exc:  # not the address: the stores (a stray file, permissions, disk full)
        where = f": {exc.filename}" if exc.filename else ""
        fail(f"cannot start: {exc.strerror or exc}{where}")
    except KeyboardInterrupt:
        pass


async def _serve(config: config_mod.Config) -> None:
    from regproxy.server.runner import serve as run_server

    await run_server(config, __version__)
