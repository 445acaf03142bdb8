"""`GET /healthz` (the process answers) and `GET /readyz` (it can do its work).

Ready means every storage folder (both stores and `temporary_registry_storage`)
is writable and has at least `health.min_free_space` free. Writable is checked
three ways, so it holds for root too (root ignores permission bits): the
filesystem's read-only flag (`statvfs`), `access(W_OK)` on the folders a
commit writes to (it reports read-only mounts and immutable folders even to
root), and a real probe file created and removed in the folder's temp area.

Upstream reachability is reported, never fails readiness: the cache serves
what it has while an upstream is down. It is each upstream client's own
`state` (`proxy.upstream.UpstreamState`): the newest of the last real request
and a background probe (`GET <url>/v2/`, any answer below 500 counts as
reachable) started by /readyz at most every `PROBE_INTERVAL` seconds; the
probe never delays the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from regproxy.proxy.upstream import Upstream
from regproxy.server.keys import CONFIG, OFFLOAD, PROXY, PROXY_STORE, REGISTRY
from regproxy.storage.layout import temp_name
from regproxy.storage.store import Store

HEALTHZ_PATH = "/healthz"
READYZ_PATH = "/readyz"
PROBE_INTERVAL = 30.0
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5)

Handler = Callable[[web.Request], Awaitable[web.Response]]


def check_folder(folder: Path, writable: tuple[Path, ...], min_free: int) -> dict[str, Any]:
    """Whether a storage folder can take writes (blocking: run it offloaded)."""
    result: dict[str, Any] = {"path": str(folder), "ok": False}
    try:
        st = os.statvfs(folder)
    except OSError as exc:
        result["error"] = f"cannot stat {folder}: {exc.strerror}"
        return result
    free = st.f_bavail * st.f_frsize
    result["free_bytes"] = free
    if st.f_flag & os.ST_RDONLY:
        result["error"] = "read-only filesystem"
        return result
    for path in (folder, *writable):
        if not os.access(path, os.W_OK):
            result["error"] = f"{path} is not writable"
            return result
    probe = temp_name(folder, "readyz")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"ready\n")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        result["error"] = f"cannot write in {folder}: {exc.strerror}"
        with contextlib.suppress(OSError):
            os.unlink(probe)
        return result
    if free < min_free:
        result["error"] = f"{free} bytes free, less than health.min_free_space ({min_free})"
        return result
    result["ok"] = True
    return result


def check_object_store(store: Store) -> dict[str, Any]:
    """Whether a store on an object store takes writes: a probe object created and
    removed through the backend (blocking: run it offloaded)."""
    backend = store.backend
    where = getattr(backend, "bucket", "")
    result: dict[str, Any] = {"path": f"s3://{where}/{getattr(backend, 'prefix', '')}"}
    probe = store.layout.root / "_probe" / f"readyz-{uuid.uuid4().hex}"
    try:
        backend.create(probe, b"ready\n")
        backend.remove(probe)
    except Exception as exc:  # any failure of the store's client means not ready
        result.update(ok=False, error=f"object store unreachable or refusing writes: {exc}")
        return result
    result["ok"] = True
    return result


def check_storage(app: web.Application) -> dict[str, dict[str, Any]]:
    min_free = app[CONFIG].health.min_free_space
    checks = {}
    for label, key in (("registry", REGISTRY), ("proxy", PROXY_STORE)):
        store = app[key]
        if not store.backend.local:
            checks[label] = check_object_store(store)
            continue
        layout = store.layout
        checks[label] = check_folder(
            layout.tmp, (layout.root, layout.blobs, layout.repositories), min_free
        )
        checks[label]["path"] = str(layout.root)
    temp_root = Path(app[CONFIG].temporary_registry_storage)
    checks["temporary"] = check_folder(temp_root, (temp_root / "uploads",), min_free)
    return checks


@dataclass
class UpstreamProbes:
    """The background probe of every upstream; results go into each `Upstream.state`."""

    started: float = 0.0
    task: asyncio.Task[None] | None = None

    def due(self) -> bool:
        idle = self.task is None or self.task.done()
        return idle and time.monotonic() - self.started >= PROBE_INTERVAL

    async def run(self, upstreams: Iterable[Upstream]) -> None:
        async with aiohttp.ClientSession(timeout=PROBE_TIMEOUT) as session:
            await asyncio.gather(*(self._one(session, upstream) for upstream in upstreams))

    async def _one(self, session: aiohttp.ClientSession, upstream: Upstream) -> None:
        try:
            async with session.get(f"{upstream.base}/v2/", allow_redirects=False) as resp:
                if resp.status < 500:
                    upstream.state.succeeded()
                else:
                    upstream.state.failed(f"HTTP {resp.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            upstream.state.failed(str(exc) or type(exc).__name__)


PROBES = web.AppKey("upstream_probes", UpstreamProbes)


def _upstreams(app: web.Application) -> dict[str, dict[str, Any]]:
    """Each upstream as its client last saw it (real requests and the probe alike)."""
    if PROXY not in app:
        return {}
    upstreams = app[PROXY].upstreams
    probes = app[PROBES]
    if upstreams and probes.due():
        probes.started = time.monotonic()
        probes.task = asyncio.ensure_future(probes.run(list(upstreams.values())))
    report = {}
    for name, upstream in upstreams.items():
        state = upstream.state
        entry: dict[str, Any] = {
            "url": upstream.base,
            "reachable": state.reachable,
            "checked_at": state.checked_at,
        }
        if state.reachable is False:
            entry["error"] = state.last_error
        report[name] = entry
    return report


def healthz_handler(_app: web.Application) -> Handler:
    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    return healthz


def readyz_handler(app: web.Application) -> Handler:
    async def readyz(_request: web.Request) -> web.Response:
        storage = await app[OFFLOAD].run(check_storage, app)
        ready = all(check["ok"] for check in storage.values())
        body = {
            "status": "ready" if ready else "not ready",
            "storage": storage,
            "upstreams": _upstreams(app),
        }
        return web.json_response(body, status=200 if ready else 503)

    return readyz


async def _probes(app: web.Application) -> AsyncIterator[None]:
    yield
    task = app[PROBES].task
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def add_routes(router: web.UrlDispatcher, app: web.Application) -> None:
    """The health routes of `app`, on its own router or the ops listener's (`ops.py`)."""
    router.add_get(HEALTHZ_PATH, healthz_handler(app))
    router.add_get(READYZ_PATH, readyz_handler(app))


def setup(app: web.Application) -> None:
    app[PROBES] = UpstreamProbes()
    app.cleanup_ctx.append(_probes)
    add_routes(app.router, app)
