"""One of several processes serving one address: who a worker is, and what workers share.

With `[server] workers = N > 1`, `serve` runs a supervisor (`supervisor.py`) that binds
the listening sockets and pre-forks N workers; each runs an ordinary app built with
`create_app(config, worker)`. What must hold across them lives on disk, never only in
one process's memory:

- upload sessions in `temporary_registry_storage/uploads/` (`storage.uploads`, shared
  mode: a lock file per session, the running hash caught up when a session moves);
- pull-through fetches claimed per digest in the spool folder (`proxy.flights.Claim`);
- what the workers alone share, in `temporary_registry_storage/workers/`:

```
workers/state.json             the supervisor: its pid, each worker's pid, start, restarts
workers/metrics/<n>.json       worker n's counters (a snapshot, rewritten every second)
workers/metrics/retired.json   counters of workers that died, merged by the supervisor
workers/uploads.lock           flock: one session created at a time (limits across workers)
workers/evict.lock             flock: one proxy-cache eviction at a time
```

Metrics: the request counters are plain integers on each worker's event loop (see
`metrics.py`), and several families are built at scrape time from state that is not a
prometheus-client metric at all (the cache's `ProxyStats`, each upstream's request count).
prometheus-client's multiprocess mode only aggregates its own metric objects, through a
memory-mapped file per process and a lock per increment; moving the hot path onto it would
cost every request. Instead each worker writes the families that count *its own* work
(counters, histograms, requests in flight) as a JSON snapshot every `SNAPSHOT_INTERVAL`
when they changed; the worker that answers a scrape writes its own first, then adds up
every worker's file (`merge`). Only files, never its live figures: whichever worker
answers, each worker's share is its newest file, so a total never goes backwards from
one scrape to the next (Prometheus would take that for a counter reset). Families read
from shared state (store totals, upload sessions on disk, gc/verify runs) are reported
once, by the answering worker. A sibling's figures are at most `SNAPSHOT_INTERVAL` old;
a worker that dies loses at most that much, as the supervisor folds its last snapshot
into `retired.json` before replacing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from regproxy.config import Config

#: seconds between a worker's metric snapshots (when something changed)
SNAPSHOT_INTERVAL = 1.0
#: the response header naming the process that answered
REPLICA_HEADER = "X-Regproxy-Replica"
FOLDER = "workers"
RETIRED = "retired"
_UNSAFE = re.compile(r"[^A-Za-z0-9._:@+=-]")
T = TypeVar("T")


@dataclass(frozen=True)
class Worker:
    """Worker `number` (1…`count`) of one `serve`, sharing `folder` with its siblings."""

    number: int
    count: int
    folder: Path

    @property
    def metrics_dir(self) -> Path:
        return self.folder / "metrics"

    @property
    def snapshot(self) -> Path:
        return self.metrics_dir / f"{self.number}.json"

    @property
    def uploads_lock(self) -> Path:
        return self.folder / "uploads.lock"

    @property
    def evict_lock(self) -> Path:
        return self.folder / "evict.lock"


WORKER = web.AppKey("worker", Worker)
REPLICA = web.AppKey("replica", str)


def folder_of(config: Config) -> Path:
    return Path(config.temporary_registry_storage) / FOLDER


def replica_name(config: Config, worker: Worker | None) -> str:
    """`[server] replica_name` or the host name, with `-<n>` for worker n of several."""
    base = config.server.replica_name or _UNSAFE.sub("-", socket.gethostname()) or "regproxy"
    return base if worker is None else f"{base}-{worker.number}"


def replica_hook(name: str) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An `on_response_prepare` hook that names the replica on every response."""

    async def add_replica(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers[REPLICA_HEADER] = name

    return add_replica


# ---- files ------------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    """Replace `path` atomically (readers see the old or the new content, never a part)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    temp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(temp, path)


def read_json(path: Path) -> Any:
    """The content of `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def unless_busy(lock: Path, work: Callable[[], T]) -> T | None:
    """`work()` under an exclusive flock on `lock`, or None at once when another process
    holds it (blocking: run it offloaded)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        return work()
    finally:
        os.close(fd)  # releases the lock


def read_snapshots(worker: Worker) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Every worker's last snapshot, and the retired workers' totals. The retired file is
    read first and names the processes it absorbed: a snapshot the supervisor is folding
    into it right now is counted once, never twice."""
    retired = read_json(worker.metrics_dir / f"{RETIRED}.json")
    if not isinstance(retired, dict):
        retired = None
    absorbed = set(retired.get("absorbed", [])) if retired is not None else set()
    snapshots = []
    for number in range(1, worker.count + 1):
        snapshot = read_json(worker.metrics_dir / f"{number}.json")
        if isinstance(snapshot, dict) and snapshot.get("pid") not in absorbed:
            snapshots.append(snapshot)
    return snapshots, retired


# ---- merging metric families ------------------------------------------------------------
# A family is {"name", "type", "help", "samples": [[sample name, {label: value}, value]]}:
# what prometheus-client's `Metric` holds, as JSON. `_created` samples are left out (the
# creation time of a sum of counters from several processes means nothing).


def merge(snapshots: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Families of several processes added up, sample by sample (same name and labels)."""
    families: dict[str, dict[str, Any]] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for snapshot in snapshots:
        for family in snapshot:
            name = family["name"]
            if name not in families:
                families[name] = {k: family[k] for k in ("name", "type", "help")}
                sums[name] = {}
            samples = sums[name]
            for sample_name, labels, value in family["samples"]:
                if sample_name.endswith("_created"):
                    continue
                key = (sample_name, tuple(sorted(labels.items())))
                samples[key] = samples.get(key, 0.0) + value
    merged = []
    for name, family in families.items():
        family["samples"] = [[s, dict(labels), v] for (s, labels), v in sums[name].items()]
        merged.append(family)
    return merged


def retire(worker_folder: Path, number: int, restarted: bool = True) -> None:
    """Fold worker `number`'s last snapshot into the retired totals (the supervisor, once
    it has reaped the worker and before it starts the next one in its place)."""
    metrics_dir = worker_folder / "metrics"
    path = metrics_dir / f"{number}.json"
    snapshot = read_json(path)
    retired = read_json(metrics_dir / f"{RETIRED}.json")
    if not isinstance(retired, dict):
        retired = {"families": [], "slots": {}, "absorbed": []}
    slot = retired["slots"].setdefault(str(number), {"requests": 0, "cpu": 0.0, "restarts": 0})
    if isinstance(snapshot, dict):
        retired["families"] = merge([retired["families"], snapshot.get("families", [])])
        slot["requests"] += snapshot.get("requests", 0)
        slot["cpu"] += snapshot.get("cpu", 0.0)
        # until its file is gone, readers skip it (see `read_snapshots`)
        retired["absorbed"] = [*retired.get("absorbed", [])[-63:], snapshot.get("pid")]
    if restarted:
        slot["restarts"] += 1
    metrics_dir.mkdir(parents=True, exist_ok=True)
    write_json(metrics_dir / f"{RETIRED}.json", retired)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def per_worker(
    snapshots: list[dict[str, Any]], retired: dict[str, Any] | None
) -> Iterator[tuple[str, str, str, str, float]]:
    """(family, type, help, worker label, value) of the per-worker series."""
    slots = (retired or {}).get("slots", {})
    live = {str(s["worker"]): s for s in snapshots if "worker" in s}
    numbers = sorted(set(live) | set(slots), key=int)
    for number in numbers:
        snap, gone = live.get(number, {}), slots.get(number, {})
        yield (
            "regproxy_worker_requests",
            "counter",
            "Requests answered by each worker (its earlier processes included).",
            number,
            snap.get("requests", 0) + gone.get("requests", 0),
        )
        yield (
            "regproxy_worker_cpu_seconds",
            "counter",
            "CPU time (user and system, all threads) used by each worker.",
            number,
            snap.get("cpu", 0.0) + gone.get("cpu", 0.0),
        )
        yield (
            "regproxy_worker_restarts",
            "counter",
            "Times the supervisor replaced each worker after it died.",
            number,
            gone.get("restarts", 0),
        )
        if snap:
            yield (
                "regproxy_worker_start_time_seconds",
                "gauge",
                "When each worker's current process started (Unix time).",
                number,
                snap.get("started", 0.0),
            )
