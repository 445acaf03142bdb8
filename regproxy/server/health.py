"""`GET /healthz` (the process answers) and `GET /readyz` (it can do its work).

Ready means every storage folder (both stores and `temporary_registry_storage`)
is writable and has at least `health.min_free_space` free. Writable is checked
three ways, so it holds for root too (root ignores permission bits): the
filesystem's read-only flag (`statvfs`), `access(W_OK)` on the folders a
commit writes to (it reports read-only mounts and immutable folders even to
root), and a real probe file created and removed in the folder's temp area.

Upstream reachability is reported, never fails readiness: the cache serves
what it has while an upstream is down. It comes from the last real upstream
requests and from a background probe (`GET <url>/v2/`, any HTTP answer counts
as reachable) started by /readyz at most every `PROBE_INTERVAL` seconds; the
probe never delays the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from regproxy.server.keys import CONFIG, OFFLOAD, PROXY, PROXY_STORE, REGISTRY
from regproxy.server.metrics import METRICS, Handler
from regproxy.storage.layout import temp_name

HEALTHZ_PATH = "/healthz"
READYZ_PATH = "/readyz"
PROBE_INTERVAL = 30.0
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5)


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


def check_storage(app: web.Application) -> dict[str, dict[str, Any]]:
    min_free = app[CONFIG].health.min_free_space
    checks = {}
    for label, key in (("registry", REGISTRY), ("proxy", PROXY_STORE)):
        layout = app[key].layout
        checks[label] = check_folder(
            layout.tmp, (layout.root, layout.blobs, layout.repositories), min_free
        )
        checks[label]["path"] = str(layout.root)
    temp_root = Path(app[CONFIG].temporary_registry_storage)
    checks["temporary"] = check_folder(temp_root, (temp_root / "uploads",), min_free)
    return checks


@dataclass
class _Probe:
    reachable: bool | None = None
    checked_at: float | None = None
    status: int | None = None
    error: str | None = None


@dataclass
class UpstreamProbes:
    results: dict[str, _Probe] = field(default_factory=dict)
    started: float = 0.0
    task: asyncio.Task[None] | None = None

    def due(self) -> bool:
        idle = self.task is None or self.task.done()
        return idle and time.monotonic() - self.started >= PROBE_INTERVAL

    async def run(self, urls: dict[str, str]) -> None:
        async with aiohttp.ClientSession(timeout=PROBE_TIMEOUT) as session:
            await asyncio.gather(*(self._one(session, name, url) for name, url in urls.items()))

    async def _one(self, session: aiohttp.ClientSession, name: str, url: str) -> None:
        probe = _Probe(checked_at=time.time())
        try:
            async with session.get(f"{url.rstrip('/')}/v2/", allow_redirects=False) as resp:
                probe.status = resp.status
                probe.reachable = resp.status < 500
                if resp.status >= 500:
                    probe.error = f"HTTP {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            probe.reachable = False
            probe.error = str(exc) or type(exc).__name__
        self.results[name] = probe


PROBES = web.AppKey("upstream_probes", UpstreamProbes)


def _upstreams(app: web.Application) -> dict[str, dict[str, Any]]:
    """Each upstream: the newest of the background probe and the last real request."""
    probes = app[PROBES]
    if PROXY not in app:
        return {}
    if app[PROXY].upstreams and probes.due():
        probes.started = time.monotonic()
        urls = {name: u.base for name, u in app[PROXY].upstreams.items()}
        probes.task = asyncio.ensure_future(probes.run(urls))
    metrics = app.get(METRICS)
    seen = metrics.upstreams.state if metrics is not None else {}
    report = {}
    for name, upstream in app[PROXY].upstreams.items():
        probe = probes.results.get(name, _Probe())
        entry: dict[str, Any] = {
            "url": upstream.base,
            "reachable": probe.reachable,
            "checked_at": probe.checked_at,
        }
        if probe.error:
            entry["error"] = probe.error
        state = seen.get(name)
        if state is not None:
            newest_ok = state.last_ok or 0.0
            newest_error = state.last_error_at or 0.0
            if max(newest_ok, newest_error) > (probe.checked_at or 0.0):
                entry["reachable"] = newest_ok >= newest_error
                entry["checked_at"] = max(newest_ok, newest_error)
                if newest_error > newest_ok:
                    entry["error"] = state.last_error
                else:
                    entry.pop("error", None)
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
    """The health routes of `app`, on its own router or the separate metrics listener's."""
    router.add_get(HEALTHZ_PATH, healthz_handler(app))
    router.add_get(READYZ_PATH, readyz_handler(app))


def setup(app: web.Application) -> None:
    app[PROBES] = UpstreamProbes()
    app.cleanup_ctx.append(_probes)
    add_routes(app.router, app)
