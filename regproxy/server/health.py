"""`GET /healthz` (the process answers) and `GET /readyz` (it can do its work).

Ready means every storage folder (both stores and `temporary_registry_storage`)
is writable and has at least `health.min_free_space` free. Writable is checked
three ways, so it holds for root too (root ignores permission bits): the
filesystem's read-only flag (`statvfs`), `access(W_OK)` on the folders a
commit writes to (it reports read-only mounts and immutable folders even to
root), and a real probe file created and removed in the folder's temp area.
A store on an object store is ready when a probe object is created and removed
within `OBJECT_STORE_TIMEOUT` (a stalled store is reported, never waited for).

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
#: seconds /readyz waits for an object store to take its probe object
OBJECT_STORE_TIMEOUT = 5.0
STORES = (("registry", REGISTRY), ("proxy", PROXY_STORE))
#: the object-store probe running for each store label (at most one each)
STORE_PROBES = web.AppKey("object_store_probes", dict)

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


def _object_store_path(store: Store) -> str:
    backend = store.backend
    return f"s3://{getattr(backend, 'bucket', '')}/{getattr(backend, 'prefix', '')}"


def check_object_store(store: Store) -> dict[str, Any]:
    """Whether a store on an object store takes writes: a probe object created and
    removed through the backend (blocking: run it offloaded)."""
    backend = store.backend
    result: dict[str, Any] = {"path": _object_store_path(store)}
    probe = store.layout.root / "_probe" / f"readyz-{uuid.uuid4().hex}"
    try:
        backend.create(probe, b"ready\n")
        backend.remove(probe)
    except Exception as exc:  # any failure of the store's client means not ready
        result.update(ok=False, error=f"object store unreachable or refusing writes: {exc}")
        return result
    result["ok"] = True
    return result


async def probe_object_store(app: web.Application, label: str, store: Store) -> dict[str, Any]:
    """`check_object_store` in the storage pool, answered within `OBJECT_STORE_TIMEOUT`:
    a store that does not answer by then is not ready. Its probe goes on, and the next
    /readyz waits for that same one, so a stalled store holds one pool thread, not one
    per probe."""
    probes = app[STORE_PROBES]
    running = probes.get(label)
    if running is None or running.done():
        running = probes[label] = asyncio.ensure_future(app[OFFLOAD].run(check_object_store, store))
    try:
        return await asyncio.wait_for(asyncio.shield(running), OBJECT_STORE_TIMEOUT)
    except asyncio.TimeoutError:
        return {
            "path": _object_store_path(store),
            "ok": False,
            "error": f"the object store did not answer within {OBJECT_STORE_TIMEOUT:g} s",
        }


def check_storage(app: web.Application) -> dict[str, dict[str, Any]]:
    """The local storage folders (stores on an object store: `probe_object_store`)."""
    min_free = app[CONFIG].health.min_free_space
    checks = {}
    for label, key in STORES:
        store = app[key]
        if not store.backend.local:
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
        # each through its own client: the upstream's proxy and TLS settings apply
        await asyncio.gather(*(upstream.probe(PROBE_TIMEOUT) for upstream in upstreams))


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
        remote = [(label, app[key]) for label, key in STORES if not app[key].backend.local]
        local, *probed = await asyncio.gather(
            app[OFFLOAD].run(check_storage, app),
            *(probe_object_store(app, label, store) for label, store in remote),
        )
        found = {**local, **{name: probe for (name, _), probe in zip(remote, probed, strict=True)}}
        storage = {label: found[label] for label in ("registry", "proxy", "temporary")}
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
    app[STORE_PROBES] = {}
    app.cleanup_ctx.append(_probes)
    add_routes(app.router, app)
