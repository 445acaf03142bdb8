"""The command line: the only package that imports click and rich.

One module per command; this one holds the group and what every command shares
(the `--config` option, loading the configuration, exit codes).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click

from regproxy import __version__
from regproxy import config as config_mod
from regproxy.errors import ConfigError

EXIT_PROBLEMS, EXIT_USAGE = 1, 2


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """One clear line on stderr and a non-zero exit; never a traceback."""
    click.echo(f"regproxy: {message}", err=True)
    sys.exit(code)


def load_config(path: Path | None) -> config_mod.Config:
    """The configuration, with every store on S3 probed (reachable, bucket there,
    credentials good, conditional writes honoured): one line and exit 2 otherwise."""
    try:
        config = config_mod.load(path)
        if config.uses_s3:
            from regproxy.storage.stores import probe_stores

            probe_stores([config.registry_storage, config.proxy_storage], config.s3)
        return config
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


class _LazyGroup(click.Group):
    """Imports a command's module only when that command runs or help lists it, so
    `serve` never loads rich and the offline commands' code (~4.5 MiB of RSS)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        load = _COMMANDS.get(cmd_name)
        return load() if load is not None else None


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="regproxy")
def main() -> None:
    """regproxy: a container registry and a pull-through cache in one process."""


# plain import statements (not importlib) so PyInstaller still finds every module
def _serve() -> click.Command:
    from regproxy.cli.serve import serve

    return serve


def _gc() -> click.Command:
    from regproxy.cli.gc import gc

    return gc


def _ls() -> click.Command:
    from regproxy.cli.ls import ls

    return ls


def _verify() -> click.Command:
    from regproxy.cli.verify import verify

    return verify


def _prefetch() -> click.Command:
    from regproxy.cli.prefetch import prefetch

    return prefetch


_COMMANDS: dict[str, Callable[[], click.Command]] = {
    "serve": _serve,
    "gc": _gc,
    "ls": _ls,
    "verify": _verify,
    "prefetch": _prefetch,
}
