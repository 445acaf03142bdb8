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
@click.option(
    "--workers",
    metavar="N|auto",
    help='Processes serving the address together (overrides [server] workers; "auto": '
    "one per core).",
)
def serve(
    config_path: Path | None, listen: str | None, log_level: str | None, workers: str | None
) -> None:
    """Run the registry server."""
    config = load_config(config_path)
    server = config.server
    if listen is not None:
        try:
            config_mod.split_listen(listen)
        except ValueError as exc:
            fail(f"--listen: {exc}")
        server = dataclasses.replace(server, listen=listen)
    if workers is not None:
        try:
            count = config_mod.WorkerCount(config_mod.parse_workers(workers))
        except ValueError as exc:
            fail(f"--workers: {exc}")
        server = dataclasses.replace(server, workers=count)
    config = dataclasses.replace(config, server=server)
    create_dirs(config)
    from regproxy.server.logs import configure_logging

    configure_logging(config.log, log_level)
    from regproxy.server.supervisor import WorkerStartError

    try:
        if config.server.workers > 1:
            from regproxy.server import supervisor

            supervisor.run(config, __version__, config.server.workers, _start_failure)
        else:
            asyncio.run(_serve(config))
    except WorkerStartError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        message = _start_failure(exc)
        if message is None:
            raise
        fail(message)


def _start_failure(exc: BaseException) -> str | None:
    """The one line that says why the server could not start, or None (a bug: traceback)."""
    from regproxy.server.runner import ListenError

    if isinstance(exc, ConfigError):
        return f"configuration error: {exc}"
    if isinstance(exc, ssl.SSLError):
        return f"cannot load the TLS certificate: {exc.reason or exc}"
    if isinstance(exc, ListenError):
        return f"cannot listen on {exc.address}: {exc.strerror}"
    if isinstance(exc, OSError):  # not the address: the stores (a stray file, permissions…)
        where = f": {exc.filename}" if exc.filename else ""
        return f"cannot start: {exc.strerror or exc}{where}"
    return None


async def _serve(config: config_mod.Config) -> None:
    from regproxy.server.runner import serve as run_server

    await run_server(config, __version__)
