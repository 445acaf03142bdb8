"""The command line: the only package that imports click and rich.

One module per command; this one holds the group and what every command shares
(the `--config` option, loading the configuration, exit codes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from regproxy import __version__
from regproxy import config as config_mod
from regproxy.errors import ConfigError

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """One clear line on stderr and a non-zero exit; never a traceback."""
    click.echo(f"regproxy: {message}", err=True)
    sys.exit(code)


def load_config(path: Path | None) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except ConfigError as exc:
        fail(f"configuration error: {exc}")
        raise  # unreachable


def create_dirs(config: config_mod.Config) -> None:
    for folder in config.storage_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            fail(f"cannot create {folder}: {exc.strerror}")


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


def _register() -> None:
    from regproxy.cli import gc, ls, prefetch, serve, verify

    main.add_command(serve.serve)
    for command in (gc.gc, ls.ls, verify.verify, prefetch.prefetch):
        main.add_command(command)


_register()
