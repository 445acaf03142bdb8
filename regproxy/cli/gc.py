"""`regproxy gc`: sweep both stores, expire and evict cached content, clean temp files.

Safe while `serve` runs on the same directories (see `storage.gc` for the lock
protocol). Order: the registry store; the proxy store (repositories not pulled
for `--proxy-max-age` lose their tags first); the proxy's LRU budget; the
temporary area (expired uploads, spool leftovers).

`--json` prints:

    {"dry_run": bool, "bytes_freed": int, "seconds": float,
     "stores": [{"store": "registry" | "proxy" | "temporary", "dry_run", "blobs_removed",
                 "bytes_freed", "manifests_removed", "tags_removed", "uploads_removed",
                 "temp_files_removed", "blobs_kept", "seconds", "removed": [digest…]}],
     "eviction": null | {"store": "proxy", "dry_run", "budget", "size_before", "size_after",
                         "blobs_removed", "bytes_freed", "seconds"}}
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import click
from rich.console import Console

from regproxy import config as config_mod
from regproxy.cli import config_option, fail, load_config
from regproxy.cli.render import (
    add_row,
    check_writable_store,
    cli_errors,
    console,
    emit_json,
    human_seconds,
    human_size,
    json_option,
    open_store,
    table,
)
from regproxy.storage import gc as gc_mod
from regproxy.storage.runs import record_run

T = TypeVar("T")


def _option_value(option: str, text: str | None, parse: Callable[[str], T]) -> T | None:
    """Parse an option with the config's parser; a bad value is one line and exit 2."""
    if text is None:
        return None
    try:
        return parse(text)
    except ValueError as exc:
        fail(f"{option}: {exc}")
        raise  # unreachable


@click.command()
@config_option
@click.option(
    "--grace",
    default="1h",
    show_default=True,
    help="Keep unreferenced blobs and untagged manifests younger than this (0, 90s, 1h…).",
)
@click.option(
    "--delete-untagged",
    is_flag=True,
    help="Also drop untagged manifests of pushed images (never children of a kept index).",
)
@click.option(
    "--proxy-max-age",
    metavar="DURATION",
    help="Drop cached repositories not pulled for this long (e.g. 30d), then sweep.",
)
@click.option(
    "--proxy-max-size",
    metavar="SIZE",
    help="Evict least-recently-pulled cached blobs until the cache fits (e.g. 50GiB); "
    "default: the config's proxy_max_size.",
)
@click.option("--dry-run", is_flag=True, help="Report what would go; change nothing.")
@json_option
def gc(
    config_path: Path | None,
    grace: str,
    delete_untagged: bool,
    proxy_max_age: str | None,
    proxy_max_size: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Remove unreferenced blobs, expired uploads and stale cached content.

    Pushed content is only ever removed when nothing references it; the proxy
    options apply to cached content alone.
    """
    config = load_config(config_path)
    grace_s = _option_value("--grace", grace, config_mod.parse_duration) or 0.0
    max_age = _option_value("--proxy-max-age", proxy_max_age, config_mod.parse_duration)
    budget = _option_value("--proxy-max-size", proxy_max_size, config_mod.parse_size)
    if budget is None:
        budget = config.proxy_max_size
    started = time.time()
    out = console()
    done = _Done()
    status = out.status("collecting…") if out.is_terminal and not as_json else None
    try:
        with status or contextlib.nullcontext():
            _collect(config, done, grace_s, delete_untagged, max_age, budget, dry_run)
    except BaseException:
        # exit 2 (read-only or broken storage) or a crash: /metrics must show a failed run
        if not dry_run:
            seconds = time.time() - started
            record_run(config.temporary_registry_storage, "gc", False, seconds, done.freed)
        raise
    seconds = time.time() - started
    if not dry_run:  # before any output, so `--json` runs (cron, scripts) are recorded too
        record_run(config.temporary_registry_storage, "gc", True, seconds, done.freed)
    if as_json:
        emit_json(
            {
                "dry_run": dry_run,
                "bytes_freed": done.freed,
                "seconds": round(seconds, 3),
                "stores": [r.to_json() for r in done.reports],
                "eviction": done.eviction.to_json() if done.eviction else None,
            }
        )
        return
    _render(out, done.reports, done.eviction, dry_run, done.freed, seconds)


@dataclass
class _Done:
    """What a run removed so far: a failed run still counts the stores it finished."""

    reports: list[gc_mod.GcReport] = field(default_factory=list)
    eviction: gc_mod.EvictionReport | None = None

    @property
    def freed(self) -> int:
        evicted = self.eviction.bytes_freed if self.eviction else 0
        return sum(r.bytes_freed for r in self.reports) + evicted


def _collect(
    config: config_mod.Config,
    done: _Done,
    grace_s: float,
    delete_untagged: bool,
    max_age: float | None,
    budget: int | None,
    dry_run: bool,
) -> None:
    """Sweep the stores in order, adding each report to `done` as it finishes."""
    if not dry_run:
        for root in (
            config.registry_storage,
            config.proxy_storage,
            config.temporary_registry_storage,
        ):
            check_writable_store(root)
    with cli_errors():
        registry = open_store(config.registry_storage, config.s3, create=False)
        if registry is not None:
            done.reports.append(
                gc_mod.collect(registry, grace_s, delete_untagged, dry_run, label="registry")
            )
        proxy = open_store(config.proxy_storage, config.s3, create=False)
        if proxy is not None:
            done.reports.append(
                gc_mod.collect(
                    proxy, grace_s, False, dry_run, "proxy", expire_repositories_older_than=max_age
                )
            )
            if budget is not None:
                done.eviction = gc_mod.evict_lru(proxy, budget, dry_run)
        if config.temporary_registry_storage.exists():
            done.reports.append(
                gc_mod.collect_temp(
                    config.temporary_registry_storage,
                    config.server.upload_max_age,
                    grace_s,
                    dry_run,
                )
            )


def _render(
    out: Console,
    reports: list[gc_mod.GcReport],
    eviction: gc_mod.EvictionReport | None,
    dry_run: bool,
    freed: int,
    seconds: float,
) -> None:
    title = "gc (dry run: nothing was removed)" if dry_run else "gc"
    verb = "would free" if dry_run else "freed"
    t = table(
        title,
        [
            "store",
            ("blobs", "right"),
            ("manifests", "right"),
            ("tags", "right"),
            ("uploads", "right"),
            ("temp files", "right"),
            (verb, "right"),
            ("kept blobs", "right"),
            ("time", "right"),
        ],
    )
    for r in reports:
        kept = str(r.blobs_kept) if r.store != "temporary" else "-"
        add_row(
            t,
            r.store,
            str(r.blobs_removed),
            str(r.manifests_removed),
            str(r.tags_removed),
            str(r.uploads_removed),
            str(r.temp_files_removed),
            human_size(r.bytes_freed),
            kept,
            human_seconds(r.seconds),
        )
    if eviction is not None:
        add_row(
            t,
            "proxy (LRU)",
            str(eviction.blobs_removed),
            "-",
            "-",
            "-",
            "-",
            human_size(eviction.bytes_freed),
            "-",
            human_seconds(eviction.seconds),
        )
    out.print(t)
    if eviction is not None:
        out.print(
            f"proxy cache: {human_size(eviction.size_before)} → {human_size(eviction.size_after)}"
            f" (budget {human_size(eviction.budget)})"
        )
    out.print(f"{verb} {human_size(freed)} in {human_seconds(seconds)}")
