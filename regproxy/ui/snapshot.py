"""The overview's data: both stores' inventory, scanned in the background, never per view.

A scan is `storage.inventory.scan_store` (the walk behind `regproxy ls`) of each
store, on the storage thread pool. A view takes the newest snapshot as it is and,
when it is older than `ui.refresh_interval`, starts one new scan for everybody
(never more than one at a time). Only the first view waits, and briefly
(`FIRST_WAIT`); with `refresh_interval = 0` every view waits for a scan that
started after it arrived (exact, for tests and tiny stores).

The per-store totals of a scan are the ones `/metrics` reports: they are handed to
the metrics' cache when newer, so the two never walk a store for the same figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from regproxy.reference import upstream_storage_key
from regproxy.server import metrics
from regproxy.server.keys import CONFIG, OFFLOAD, PROXY_STORE, REGISTRY
from regproxy.storage import inventory
from regproxy.storage.store import Store

log = logging.getLogger("regproxy.ui")

#: seconds the very first view waits for the first scan before it shows "scanning"
FIRST_WAIT = 2.0


@dataclass(frozen=True, slots=True)
class RepoRow:
    #: the name to pull: `team/app`, or `p/<upstream>/<remote>` for cached content
    name: str
    #: `local` (pushed) or `proxy` (cached)
    kind: str
    upstream: str | None
    tags: int
    #: bytes in the store that the repository's images need (each blob once)
    size: int
    #: newest push (local) or fetch/revalidation (cache)
    updated: float | None
    #: last pull (cache only: pushed repositories do not record pulls)
    last_pulled: float | None


@dataclass(frozen=True, slots=True)
class StoreUse:
    label: str
    repositories: int
    blobs: int
    bytes: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    rows: tuple[RepoRow, ...]
    stores: tuple[StoreUse, ...]
    taken_at: float
    seconds: float
    tag_count: int


def take_snapshot(
    stores: list[tuple[str, str, Store]], prefix: str, upstreams: list[str]
) -> Snapshot:
    """Scan `(label, kind, store)` triples (blocking: run it on the storage pool)."""
    started, taken_at = time.monotonic(), time.time()
    by_key = {upstream_storage_key(name): name for name in upstreams}
    rows: list[RepoRow] = []
    uses: list[StoreUse] = []
    for label, kind, store in stores:
        found, totals = inventory.scan_store(store, kind, prefix)
        uses.append(StoreUse(label, totals.repositories, totals.blobs, totals.bytes))
        for repo in found:
            name, upstream = repo.name, None
            if kind == inventory.PROXY and repo.upstream is not None:
                upstream = by_key.get(repo.upstream, repo.upstream)
                name = f"{prefix}/{upstream}/{repo.remote}"
            rows.append(
                RepoRow(
                    name,
                    kind,
                    upstream,
                    len(repo.tags),
                    repo.size,
                    repo.updated,
                    repo.last_pulled,
                )
            )
    rows.sort(key=lambda r: r.name)
    tag_count = sum(r.tags for r in rows)
    return Snapshot(tuple(rows), tuple(uses), taken_at, time.monotonic() - started, tag_count)


class Snapshots:
    """The newest snapshot of one app's stores, and the one scan that may be running."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.current: Snapshot | None = None
        self.failed: str | None = None
        self._scan: asyncio.Task[None] | None = None
        self._scan_started = 0.0

    def _start(self, app: web.Application) -> asyncio.Task[None]:
        if self._scan is None or self._scan.done():
            self._scan_started = time.time()
            self._scan = asyncio.ensure_future(self._run(app))
        return self._scan

    async def get(self, app: web.Application) -> Snapshot | None:
        """The newest snapshot (None while the first scan is still running)."""
        arrived = time.time()
        current = self.current
        if self.interval == 0:
            while True:  # a scan that started before this view may have missed a change
                task = self._start(app)
                fresh = self._scan_started >= arrived
                await asyncio.shield(task)
                if fresh:
                    return self.current
        if current is None or arrived - current.taken_at >= self.interval:
            task = self._start(app)
            if current is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), FIRST_WAIT)
        return self.current

    async def _run(self, app: web.Application) -> None:
        config = app[CONFIG]
        stores = [
            ("registry", inventory.LOCAL, app[REGISTRY]),
            ("proxy", inventory.PROXY, app[PROXY_STORE]),
        ]
        upstreams = list(config.proxy.upstreams)
        try:
            snapshot = await app[OFFLOAD].run(take_snapshot, stores, config.proxy.prefix, upstreams)
        except Exception as exc:  # an unreachable bucket, a vanished folder: say it once
            if self.failed is None:
                log.warning("cannot scan the stores for the web page: %s", exc)
            self.failed = str(exc) or type(exc).__name__
            return
        self.current, self.failed = snapshot, None
        _share_with_metrics(app, snapshot)

    def stop(self) -> None:
        if self._scan is not None:
            self._scan.cancel()


def _share_with_metrics(app: web.Application, snapshot: Snapshot) -> None:
    """Hand the scan's store totals to /metrics when they are newer than its own."""
    collected = app.get(metrics.METRICS)
    if collected is None:
        return
    for use in snapshot.stores:
        known = collected.stores.get(use.label)
        if known is None or known.scanned_at < snapshot.taken_at:
            collected.stores[use.label] = metrics.StoreTotals(
                use.blobs, use.bytes, use.repositories, snapshot.taken_at, snapshot.seconds
            )


SNAPSHOTS = web.AppKey("ui_snapshots", Snapshots)


async def snapshots_ctx(app: web.Application) -> AsyncIterator[None]:
    """A scan in flight is cancelled before the stores close (registered after them)."""
    yield
    app[SNAPSHOTS].stop()
