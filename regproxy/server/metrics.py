"""Prometheus metrics: `GET /metrics`, one registry per application.

Cheap on the hot path. Per request the access middleware (`server.logs`) calls
`RequestMetrics.observe`: one dict lookup and a few integer additions on the
event-loop thread (no locks: the loop is single-threaded), turned into counter
and histogram families only when scraped. Everything else is read at scrape
time from state that exists anyway: `ProxyStats` counters, `Upstream.requests`,
an `os.scandir` of the upload sessions, and per-store totals from a walk that
runs at most once per `metrics.store_scan_interval` (in the thread pool).

Upstream latency and errors come from each upstream's `observer` hook, set at
start-up (`_instrument_upstreams`).

`gc` and `verify` run as separate processes (cron, systemd timer); each run can
leave a small status file (`record_run`) in `temporary_registry_storage/status/`,
which the scrape reports.

Several workers (`[server] workers`): the families that count a process's own work
(`Metrics.process`) are summed over the workers from the snapshots each writes, plus
per-worker series (`regproxy_worker_*`); the rest is read once. Why snapshots rather than
prometheus-client's multiprocess mode: see `workers.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from regproxy import __version__
from regproxy.config import Config
from regproxy.proxy.upstream import Upstream, UpstreamError
from regproxy.server import workers
from regproxy.server.keys import CONFIG, OFFLOAD, PROXY, PROXY_STORE, REGISTRY
from regproxy.storage.runs import STATUS_DIR, read_run
from regproxy.storage.store import Store

log = logging.getLogger("regproxy.metrics")

METRICS_PATH = "/metrics"
#: request latency buckets (seconds): manifests take milliseconds, big layers minutes
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 60)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: label of requests that matched no route (never the raw path: unbounded cardinality)
UNMATCHED = "unmatched"
RUN_COMMANDS = ("gc", "verify")


# ---- per-request series -----------------------------------------------------------------


class _Series:
    """Counts of one (method, route, status): requests, latency buckets, bytes."""

    __slots__ = ("buckets", "count", "received", "sent", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.buckets = [0] * (len(BUCKETS) + 1)  # last one: above the largest bound
        self.received = 0
        self.sent = 0


class RequestMetrics:
    """HTTP request counters, aggregated in plain ints and exposed at scrape time."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, int], _Series] = {}
        self.in_flight = 0

    def observe(
        self, method: str, route: str, status: int, seconds: float, received: int, sent: int
    ) -> None:
        key = (method, route, status)
        series = self._series.get(key)
        if series is None:
            if method not in METHODS:
                key = ("other", route, status)
            series = self._series.setdefault(key, _Series())
        series.count += 1
        series.total += seconds
        series.buckets[bisect_left(BUCKETS, seconds)] += 1
        series.received += received
        series.sent += sent

    def answered(self) -> int:
        """Requests answered so far (all series together)."""
        return sum(s.count for s in list(self._series.values()))

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "regproxy_http_requests",
            "HTTP requests answered, by method, route template and status.",
            labels=["method", "route", "status"],
        )
        latency = HistogramMetricFamily(
            "regproxy_http_request_duration_seconds",
            "Time from the request to the last byte of the response, by method and route.",
            labels=["method", "route"],
        )
        received = CounterMetricFamily(
            "regproxy_http_received_bytes",
            "Request body bytes received, by route template.",
            labels=["route"],
        )
        sent = CounterMetricFamily(
            "regproxy_http_sent_bytes",
            "Response body bytes sent, by route template.",
            labels=["route"],
        )
        by_route: dict[str, list[int]] = {}
        by_method_route: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
        for (method, route, status), s in list(self._series.items()):
            requests.add_metric([method, route, str(status)], s.count)
            totals = by_route.setdefault(route, [0, 0])
            totals[0] += s.received
            totals[1] += s.sent
            buckets, total = by_method_route.setdefault(
                (method, route), ([0] * len(s.buckets), [0.0])
            )
            for i, n in enumerate(s.buckets):
                buckets[i] += n
            total[0] += s.total
        for (method, route), (buckets, total) in by_method_route.items():
            cumulative, running = [], 0
            for bound, n in zip((*BUCKETS, float("inf")), buckets, strict=True):
                running += n
                cumulative.append((_bound(bound), running))
            latency.add_metric([method, route], cumulative, total[0])
        for route, (rx, tx) in by_route.items():
            received.add_metric([route], rx)
            sent.add_metric([route], tx)
        yield requests
        yield latency
        yield received
        yield sent
        yield GaugeMetricFamily(
            "regproxy_http_requests_in_flight",
            "Requests being handled right now.",
            value=self.in_flight,
        )


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


def route_of(request: web.Request) -> str:
    """The route template that matched (`/v2/{name}/manifests/{reference}`), never the path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


# ---- upstreams --------------------------------------------------------------------------


class UpstreamMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram(
            "regproxy_upstream_request_duration_seconds",
            "Time until an upstream answered with response headers (auth and redirects "
            "included), by upstream.",
            ["upstream"],
            buckets=UPSTREAM_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "regproxy_upstream_errors",
            "Upstream requests that failed: reason is connect (network, timeout, TLS), "
            "auth (refused credentials), http_429 or http_5xx.",
            ["upstream", "reason"],
            registry=registry,
        )

    def instrument(self, upstream: Upstream) -> None:
        """Be told of every request `upstream` sends (manifests, blobs, tags, HEADs)."""
        upstream.observer = self

    def observe(
        self, upstream: str, seconds: float, status: int | None, error: UpstreamError | None
    ) -> None:
        self.latency.labels(upstream).observe(seconds)
        if error is not None:
            self.errors.labels(upstream, "auth" if error.denied else "connect").inc()
        elif status is not None and (status == 429 or status >= 500):
            self.errors.labels(upstream, "http_429" if status == 429 else "http_5xx").inc()


# ---- stores and offline runs ------------------------------------------------------------


@dataclass(frozen=True)
class StoreTotals:
    blobs: int
    bytes: int
    repositories: int
    scanned_at: float
    seconds: float


def scan_store(store: Store) -> StoreTotals:
    """Blob count and bytes, and repository count, of one store (blocking: run it offloaded)."""
    started = time.monotonic()
    blobs = size = 0
    for _digest, blob_size, _mtime in store.iter_blobs():
        blobs += 1
        size += blob_size
    repositories = len(store.repositories())
    return StoreTotals(blobs, size, repositories, time.time(), time.monotonic() - started)


def count_uploads(temp_root: Path) -> int:
    try:
        with os.scandir(Path(temp_root) / "uploads") as entries:
            return sum(1 for entry in entries if entry.is_dir(follow_symlinks=False))
    except OSError:
        return 0


# ---- the per-app object -----------------------------------------------------------------


class Metrics:
    """Every metric of one application, in its own registry (apps in one process never mix).

    `process` holds what counts this process's own work (summed over workers); `registry`
    is what a scrape renders: those families (or, for one worker of several, their sum over
    all workers) and the ones read from shared state."""

    def __init__(self, config: Config, worker: workers.Worker | None = None) -> None:
        self.config = config
        self.worker = worker
        self.process = CollectorRegistry(auto_describe=False)
        self.requests = RequestMetrics()
        self.upstreams = UpstreamMetrics(self.process)
        self.evictions = Counter(
            "regproxy_proxy_evictions",
            "Runs of the server's LRU eviction of the proxy cache that removed something.",
            registry=self.process,
        )
        self.evicted_bytes = Counter(
            "regproxy_proxy_evicted_bytes",
            "Bytes removed from the proxy cache by the server's LRU eviction.",
            registry=self.process,
        )
        self.stores: dict[str, StoreTotals] = {}
        self.uploads = 0
        self.runs: dict[str, dict[str, Any]] = {}
        self._scan: asyncio.Task[None] | None = None
        self._app: web.Application | None = None
        self.started = time.time()
        #: one worker of several: every worker's last snapshot and the retired workers'
        self.snapshots: list[dict[str, Any]] = []
        self.retired: dict[str, Any] | None = None
        self._snapshots: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()  # this worker's snapshots reach the file in order
        self.process.register(_ProcessCollector(self))
        self.registry = CollectorRegistry(auto_describe=False)
        if worker is None:
            self.registry.register(_Forward(self.process))
        else:
            self.registry.register(_WorkersCollector(self))
        self.registry.register(_AppCollector(self))

    def evicted(self, blobs_removed: int, bytes_freed: int) -> None:
        if blobs_removed:
            self.evictions.inc()
            self.evicted_bytes.inc(bytes_freed)

    async def refresh(self, app: web.Application) -> None:
        """Gather what the scrape reports from disk: cheap reads, and a store walk when due."""
        offload = app[OFFLOAD]
        temp_root = self.config.temporary_registry_storage
        self.uploads = await offload.run(count_uploads, temp_root)
        self.runs = await offload.run(_read_runs, temp_root)
        if self.worker is not None:
            await self.write_snapshot(app)  # this worker's own figures as of this scrape
            self.snapshots, self.retired = await offload.run(workers.read_snapshots, self.worker)
        interval = self.config.metrics.store_scan_interval
        newest = min((t.scanned_at for t in self.stores.values()), default=None)
        due = newest is None or time.time() - newest >= interval
        if due and (self._scan is None or self._scan.done()):
            self._scan = asyncio.ensure_future(self._scan_stores(app))
        if self._scan is not None and not self._scan.done() and (interval == 0 or not newest):
            await asyncio.shield(self._scan)  # nothing to show yet (or asked to be exact)

    async def _scan_stores(self, app: web.Application) -> None:
        for label, store in (("registry", app[REGISTRY]), ("proxy", app[PROXY_STORE])):
            try:
                self.stores[label] = await app[OFFLOAD].run(scan_store, store)
            except Exception as exc:  # OSError on disk; botocore's errors for a bucket
                log.warning("cannot walk the %s store for metrics: %s", label, exc)

    def stop(self) -> None:
        if self._scan is not None:
            self._scan.cancel()
        if self._snapshots is not None:
            self._snapshots.cancel()

    # ---- one worker of several ----------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """This process's own figures, as its siblings' scrapes read them (`workers.py`)."""
        assert self.worker is not None
        return {
            "worker": self.worker.number,
            "pid": os.getpid(),
            "at": time.time(),
            "started": self.started,
            "cpu": time.process_time(),
            "requests": self.requests.answered(),
            "families": [family_json(f) for f in self.process.collect()],
        }

    async def write_snapshot(self, app: web.Application) -> None:
        assert self.worker is not None
        async with self._writing:
            await app[OFFLOAD].run(workers.write_json, self.worker.snapshot, self.snapshot())

    def start_snapshots(self, app: web.Application) -> None:
        self._snapshots = asyncio.ensure_future(self._write_snapshots(app))

    async def _write_snapshots(self, app: web.Application) -> None:
        """Every `SNAPSHOT_INTERVAL` when this worker answered anything since (and at least
        every 30 s, for its CPU time); once more when it stops."""
        written, quiet, failing = -1, 0, False
        try:
            while True:
                answered = self.requests.answered() + self.requests.in_flight
                if answered != written or quiet >= 30:
                    try:
                        await self.write_snapshot(app)
                        written, quiet, failing = answered, 0, False
                    except OSError as exc:
                        if not failing:
                            log.warning("cannot write this worker's metrics snapshot: %s", exc)
                        failing = True
                else:
                    quiet += 1
                await asyncio.sleep(workers.SNAPSHOT_INTERVAL)
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):
                await self.write_snapshot(app)
            raise

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def bind(self, app: web.Application) -> None:
        self._app = app


def _read_runs(temp_root: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for command in RUN_COMMANDS:
        status = read_run(Path(temp_root) / STATUS_DIR / f"{command}.json")
        if status is not None:
            found[command] = status
    return found


def family_json(family: Metric) -> dict[str, Any]:
    """A family as JSON (`workers.merge`'s form)."""
    return {
        "name": family.name,
        "type": family.type,
        "help": family.documentation,
        "samples": [[s.name, dict(s.labels), s.value] for s in family.samples],
    }


def family_of(data: dict[str, Any]) -> Metric:
    family = Metric(data["name"], data["help"], data["type"])
    for name, labels, value in data["samples"]:
        family.add_sample(name, labels, value)
    return family


class _Forward:
    """The families of another registry (a single process: its own, as they are)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.source = registry

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self.source.collect()


class _ProcessCollector:
    """Families counting this process's own work, read from its state at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        yield from m.requests.collect()
        app = m._app
        if app is not None and PROXY in app:
            yield from _proxy_families(app)


class _WorkersCollector:
    """One worker of several: the process families summed over every worker's last
    snapshot (this one's written by the scrape itself) and the retired workers', and
    per-worker series. Only files, never this worker's live figures: whichever worker
    answers, a total never goes backwards from one scrape to the next."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        assert m.worker is not None
        parts = [s.get("families", []) for s in m.snapshots]
        if m.retired is not None:
            parts.append(m.retired.get("families", []))
        for family in workers.merge(parts):
            yield family_of(family)
        yield GaugeMetricFamily(
            "regproxy_workers", "Worker processes serving the address.", value=m.worker.count
        )
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for name, kind, text, number, value in workers.per_worker(m.snapshots, m.retired):
            if name not in families:
                make = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                families[name] = make(name, text, labels=["worker"])
            families[name].add_metric([number], value)
        yield from families.values()


class _AppCollector:
    """Families read from shared state at scrape time (the same whichever worker answers)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        yield GaugeMetricFamily(
            "regproxy_uploads_in_progress", "Open upload sessions.", value=m.uploads
        )
        yield from _store_families(m.stores)
        yield from _run_families(m.runs)
        yield _info()


def _info() -> Metric:
    family = GaugeMetricFamily("regproxy_info", "regproxy version.", labels=["version"])
    family.add_metric([__version__], 1)
    return family


def _proxy_families(app: web.Application) -> Iterator[Metric]:
    cache = app[PROXY]
    stats = cache.stats
    answers = CounterMetricFamily(
        "regproxy_proxy_requests",
        "Pull-through answers by upstream and result: hit (from the cache), miss (fetched), "
        "revalidated (tag checked upstream), stale (served cached while the upstream failed).",
        labels=["upstream", "result"],
    )
    coalesced = CounterMetricFamily(
        "regproxy_proxy_coalesced",
        "Requests that joined a fetch already in flight instead of asking the upstream again.",
        labels=["upstream"],
    )
    requests = CounterMetricFamily(
        "regproxy_upstream_requests",
        "HTTP requests sent to each upstream (token requests and redirect hops included).",
        labels=["upstream"],
    )
    received = CounterMetricFamily(
        "regproxy_upstream_received_bytes",
        "Manifest and blob bytes received from each upstream.",
        labels=["upstream"],
    )
    for name, upstream in cache.upstreams.items():
        for result, counter in (
            ("hit", stats.hits),
            ("miss", stats.misses),
            ("revalidated", stats.revalidations),
            ("stale", stats.stale),
        ):
            answers.add_metric([name, result], counter.get(name, 0))
        coalesced.add_metric([name], stats.coalesced.get(name, 0))
        requests.add_metric([name], upstream.requests)
        received.add_metric([name], stats.upstream_bytes.get(name, 0))
    yield answers
    yield coalesced
    yield requests
    yield received


def _store_families(stores: dict[str, StoreTotals]) -> Iterator[Metric]:
    families = [
        (
            GaugeMetricFamily(
                "regproxy_store_bytes", "Bytes of blobs in each store.", labels=["store"]
            ),
            "bytes",
        ),
        (
            GaugeMetricFamily(
                "regproxy_store_blobs",
                "Blobs (layers, configs, manifests) in each store.",
                labels=["store"],
            ),
            "blobs",
        ),
        (
            GaugeMetricFamily(
                "regproxy_store_repositories", "Repositories in each store.", labels=["store"]
            ),
            "repositories",
        ),
        (
            GaugeMetricFamily(
                "regproxy_store_scan_timestamp_seconds",
                "When the store figures were computed (they are refreshed every "
                "metrics.store_scan_interval).",
                labels=["store"],
            ),
            "scanned_at",
        ),
        (
            GaugeMetricFamily(
                "regproxy_store_scan_duration_seconds",
                "How long the last walk of each store took.",
                labels=["store"],
            ),
            "seconds",
        ),
    ]
    for family, attribute in families:
        for label, totals in stores.items():
            family.add_metric([label], getattr(totals, attribute))
        yield family


def _run_families(runs: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    total = CounterMetricFamily(
        "regproxy_command_runs", "Runs of `gc` and `verify` recorded.", labels=["command"]
    )
    failures = CounterMetricFamily(
        "regproxy_command_failures",
        "Runs of `gc` and `verify` that failed (verify: found problems).",
        labels=["command"],
    )
    last = GaugeMetricFamily(
        "regproxy_command_last_run_timestamp_seconds",
        "When the last run finished.",
        labels=["command"],
    )
    duration = GaugeMetricFamily(
        "regproxy_command_last_run_duration_seconds",
        "How long the last run took.",
        labels=["command"],
    )
    success = GaugeMetricFamily(
        "regproxy_command_last_run_success", "1 if the last run succeeded.", labels=["command"]
    )
    freed = CounterMetricFamily("regproxy_gc_freed_bytes", "Bytes freed by recorded gc runs.")
    for command, status in runs.items():
        with contextlib.suppress(TypeError, ValueError):
            total.add_metric([command], float(status.get("runs", 0)))
            failures.add_metric([command], float(status.get("failures", 0)))
            last.add_metric([command], float(status.get("last_finished", 0)))
            duration.add_metric([command], float(status.get("last_seconds", 0)))
            success.add_metric([command], 1.0 if status.get("last_ok") else 0.0)
            if command == "gc":
                freed.add_metric([], float(status.get("bytes_freed", 0)))
    yield from (total, failures, last, duration, success, freed)


# ---- wiring -----------------------------------------------------------------------------

METRICS = web.AppKey("metrics", Metrics)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def scrape_handler(app: web.Application) -> Handler:
    """`GET /metrics` of `app` (on its own router, or the ops listener's: `ops.py`)."""

    async def scrape(_request: web.Request) -> web.Response:
        metrics = app[METRICS]
        await metrics.refresh(app)
        body = metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return scrape


async def _instrument_upstreams(app: web.Application) -> AsyncIterator[None]:
    metrics = app[METRICS]
    metrics.bind(app)
    if PROXY in app:
        for upstream in app[PROXY].upstreams.values():
            metrics.upstreams.instrument(upstream)
    if metrics.worker is not None:
        metrics.start_snapshots(app)
    yield
    metrics.stop()
    if metrics._snapshots is not None:
        await asyncio.gather(metrics._snapshots, return_exceptions=True)


def setup(app: web.Application) -> None:
    """Create the app's metrics; serve /metrics here unless `metrics.listen` moves it."""
    config = app[CONFIG]
    app[METRICS] = Metrics(config, app.get(workers.WORKER))
    app.cleanup_ctx.append(_instrument_upstreams)
    if config.metrics.listen is None:
        app.router.add_get(METRICS_PATH, scrape_handler(app), allow_head=False)
