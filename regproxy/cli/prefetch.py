"""`regproxy prefetch IMAGE… [-f FILE]`: warm the proxy cache without a running server.

Writes into `proxy_storage` exactly as a pull through `serve` would (see
`proxy.prefetch`). Exit 1 when any image failed (each reason is also one line on
stderr), 2 for a malformed reference, an unconfigured registry, a bad config or
a storage folder that cannot be written.

`--json` prints:

    {"ok": bool, "failed": int, "bytes_fetched": int, "seconds": float,
     "images": [{"image", "repository", "upstream", "reference", "ok", "error", "digest",
                 "media_type", "cache_status", "platforms", "manifests", "blobs",
                 "blobs_cached", "blobs_fetched", "bytes_fetched", "seconds"}]}
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

import click
from rich.console import Console
from rich.progress import Progress, TaskID
from rich.text import Text

from regproxy.cli import EXIT_PROBLEMS, EXIT_USAGE, config_option, fail, load_config
from regproxy.cli.render import (
    add_row,
    byte_progress,
    check_writable,
    console,
    describe_os_error,
    emit_json,
    human_seconds,
    human_size,
    json_option,
    open_store,
    short_digest,
    table,
)
from regproxy.errors import ConfigError
from regproxy.proxy import prefetch as pf

if TYPE_CHECKING:
    from regproxy.proxy.prefetch import ImageResult


@click.command()
@config_option
@click.argument("images", nargs=-1, metavar="IMAGE…")
@click.option(
    "--file",
    "-f",
    "image_file",
    type=click.File("r"),
    metavar="FILE",
    help="Read images from FILE, one per line (# comments); - for stdin.",
)
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    metavar="OS/ARCH[/VARIANT]",
    help="Platform to fetch from multi-arch indexes (repeatable; default: this machine's).",
)
@click.option("--all-platforms", is_flag=True, help="Fetch every platform of an index.")
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Concurrent blob downloads.",
)
@json_option
def prefetch(
    config_path: Path | None,
    images: tuple[str, ...],
    image_file: IO[str] | None,
    platforms: tuple[str, ...],
    all_platforms: bool,
    jobs: int,
    as_json: bool,
) -> None:
    """Fetch images into the proxy cache (docker.io/library/alpine:3.20, p/<upstream>/…)."""
    # the cache's own log lines (an upstream found unreachable, …) are for serve's log; here
    # each image's outcome is reported once, by this command
    logging.getLogger("regproxy").addHandler(logging.NullHandler())
    config = load_config(config_path)
    texts = list(images)
    if image_file is not None:
        texts += pf.read_image_list(image_file)
    if not texts:
        fail("no images given (name them as arguments or with --file)")
    if platforms and all_platforms:
        fail("--platform and --all-platforms exclude each other")
    try:
        wanted = tuple(pf.Platform.parse(p) for p in platforms)
    except ValueError as exc:
        fail(f"--platform: {exc}")
    refs, bad = [], []
    for text in texts:
        try:
            refs.append(pf.parse_image(text, config))
        except pf.ImageRefError as exc:
            bad.append(str(exc))
    if bad:
        for line in bad[:-1]:
            click.echo(f"regproxy: {line}", err=True)
        fail(bad[-1])
    check_writable(config.temporary_registry_storage)
    if isinstance(config.proxy_storage, Path):
        check_writable(config.proxy_storage)
    store = open_store(config.proxy_storage, config.s3, create=True)
    assert store is not None
    out = console()
    options = pf.Options(wanted, all_platforms, jobs)
    started = time.monotonic()
    with byte_progress(out, out.is_terminal and not as_json) as progress:
        observer = _Bars(progress)
        try:
            results = asyncio.run(pf.prefetch(config, store, refs, options, observer))
        except ConfigError as exc:
            fail(f"configuration error: {exc}", EXIT_USAGE)
        except OSError as exc:
            fail(describe_os_error(exc), EXIT_USAGE)
    seconds = time.monotonic() - started
    failed = [r for r in results if not r.ok]
    if as_json:
        emit_json(
            {
                "ok": not failed,
                "failed": len(failed),
                "bytes_fetched": sum(r.bytes_fetched for r in results),
                "seconds": round(seconds, 3),
                "images": [
                    {**dataclasses.asdict(r), "seconds": round(r.seconds, 3)} for r in results
                ],
            }
        )
    else:
        _render(out, results, seconds)
    for r in failed:
        click.echo(f"regproxy: {r.image}: {r.error}", err=True)
    if failed:
        raise SystemExit(EXIT_PROBLEMS)


class _Bars(pf.Observer):
    """One bar per blob being downloaded plus a total; finished blobs leave the display."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.total = progress.add_task("total", total=0)
        self.tasks: dict[str, tuple[TaskID, int]] = {}

    def blob_started(self, key: str, image: str, digest: str, size: int | None) -> None:
        task = self.progress.add_task(f"{short_digest(digest)} {image}", total=size)
        self.tasks[key] = (task, 0)
        current = self.progress.tasks[self.total].total or 0
        self.progress.update(self.total, total=current + (size or 0))

    def blob_advanced(self, key: str, done: int) -> None:
        task, before = self.tasks.get(key, (None, 0))
        if task is None:
            return
        self.progress.update(task, completed=done)
        self.progress.advance(self.total, max(0, done - before))
        self.tasks[key] = (task, done)

    def blob_finished(self, key: str, ok: bool) -> None:
        task, _ = self.tasks.pop(key, (None, 0))
        if task is not None:
            self.progress.remove_task(task)

    def image_finished(self, result: object) -> None:
        pass


def _status(r: ImageResult) -> Text:
    if not r.ok:
        return Text(f"failed: {r.error}", style="red")
    fetched = r.bytes_fetched > 0 or r.cache_status == "MISS"
    text = "fetched" if fetched else "already cached"
    if r.cache_status == "STALE":
        return Text(f"{text} (stale: upstream unreachable)", style="yellow")
    return Text(text, style="green" if fetched else "")


def _render(out: Console, results: list[ImageResult], seconds: float) -> None:
    t = table(
        None,
        [
            "image",
            "digest",
            "platforms",
            ("manifests", "right"),
            ("blobs", "right"),
            ("fetched", "right"),
            "status",
        ],
    )
    for r in results:
        add_row(
            t,
            r.image,
            short_digest(r.digest),
            ", ".join(r.platforms) or "-",
            str(r.manifests),
            f"{r.blobs_fetched}/{r.blobs}",
            human_size(r.bytes_fetched),
            _status(r),
        )
    out.print(t)
    fetched = sum(r.bytes_fetched for r in results)
    failed = sum(1 for r in results if not r.ok)
    out.print(
        f"{len(results) - failed} of {len(results)} image(s) cached; fetched "
        f"{human_size(fetched)} in {human_seconds(seconds)}"
    )
