"""`create_app(config)`: the route table and the resources every handler shares."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from regproxy import ui
from regproxy.aiohttp_adapter import request_handler_args
from regproxy.config import Config, S3Location
from regproxy.proxy.cache import ProxyCache
from regproxy.server import (
    auth,
    base,
    blobs,
    health,
    listings,
    logs,
    manifests,
    metrics,
    referrers,
    uploads,
)
from regproxy.server.budget import MemoryBudget
from regproxy.server.forward import FORWARDER, Forwarder, advertise_url
from regproxy.server.keys import (
    BODY_BUDGET,
    CONFIG,
    OFFLOAD,
    PROXY,
    PROXY_STORE,
    REGISTRY,
    REPLICAS,
    UPLOADS,
)
from regproxy.server.middleware import add_api_version, errors_middleware
from regproxy.server.workers import (
    REPLICA,
    WORKER,
    Worker,
    replica_hook,
    replica_name,
    unless_busy,
)
from regproxy.storage import gc
from regproxy.storage.aio import Offload
from regproxy.storage.layout import TEMP_MAX_AGE
from regproxy.storage.replicas import Replica, Replicas, local_id
from regproxy.storage.stores import open_store
from regproxy.storage.uploads import Uploads

log = logging.getLogger("regproxy.server")

NAME = "{name:[^{}]+}"
EVICTION_INTERVAL = 10.0
TOKEN_FORM_MAX = 64 * 1024


def _route_table() -> list[tuple[str, str, auth.Handler, str]]:
    """(method, path, handler, what it needs): `pull`/`push`/`delete` on the repository,
    `base` (any valid credentials), `catalog`, or `public`."""
    upload = f"/v2/{NAME}/blobs/uploads/{{upload_id}}"
    blob = f"/v2/{NAME}/blobs/{{digest}}"
    manifest = f"/v2/{NAME}/manifests/{{reference}}"
    # the busiest routes first: aiohttp tries them in order
    return [
        ("GET", manifest, manifests.get_manifest, "pull"),
        ("GET", blob, blobs.get_blob, "pull"),
        ("GET", "/v2/", base.version_check, "base"),
        ("GET", "/v2", base.version_check, "base"),
        ("GET", "/v2/_catalog", listings.catalog, "catalog"),
        ("GET", f"/v2/{NAME}/tags/list", listings.list_tags, "pull"),
        ("GET", f"/v2/{NAME}/referrers/{{digest}}", referrers.list_referrers, "pull"),
        ("POST", f"/v2/{NAME}/blobs/uploads/", uploads.start_upload, "push"),
        ("POST", f"/v2/{NAME}/blobs/uploads", uploads.start_upload, "push"),
        ("GET", upload, uploads.upload_status, "push"),
        ("PATCH", upload, uploads.patch_upload, "push"),
        ("PUT", upload, uploads.put_upload, "push"),
        ("DELETE", upload, uploads.cancel_upload, "push"),
        ("DELETE", blob, blobs.delete_blob, "delete"),
        ("PUT", manifest, manifests.put_manifest, "push"),
        ("DELETE", manifest, manifests.delete_manifest, "delete"),
        ("GET", auth.TOKEN_PATH, auth.token_endpoint, "public"),
        ("POST", auth.TOKEN_PATH, auth.token_endpoint, "public"),
    ]


def _routes(app: web.Application, authenticator: auth.Authenticator | None) -> None:
    for method, path, handler, kind in _route_table():
        if handler is auth.token_endpoint and authenticator is None:
            continue
        if method == "GET":
            # upload status has no HEAD form; everything else readable answers HEAD too
            allow_head = handler is not uploads.upload_status
            app.router.add_get(path, handler, allow_head=allow_head)
        else:
            app.router.add_route(method, path, handler)
        if authenticator is not None and kind != "public":
            authenticator.requires(handler, method, kind)


async def _purge_uploads_forever(app: web.Application) -> None:
    """Drop abandoned upload sessions, often enough that they free the session limits
    within about a quarter of the shorter of `upload_idle_timeout` and `upload_max_age`."""
    server = app[CONFIG].server
    max_age, idle_timeout = server.upload_max_age, server.upload_idle_timeout
    interval = max(1.0, min(min(max_age, idle_timeout) / 4, 600.0))
    while True:
        await asyncio.sleep(interval)
        try:
            removed = await app[OFFLOAD].run(app[UPLOADS].purge, max_age, idle_timeout=idle_timeout)
            if removed:
                log.info("purged %d stale upload session(s)", removed)
        except OSError as exc:
            log.warning("upload purge failed: %s", exc)


async def _evict_proxy_forever(app: web.Application) -> None:
    """Keep the proxy cache under `proxy_max_size`, checking after it grows (at most every 10 s)."""
    budget = app[CONFIG].proxy_max_size
    assert budget is not None
    cache = app[PROXY]
    while True:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(cache.grew.wait(), timeout=300)
        cache.grew.clear()
        try:
            evict: Callable[[], gc.EvictionReport | None]
            evict = functools.partial(gc.evict_lru, cache.store, budget)
            worker = app.get(WORKER)
            if worker is not None:  # one worker at a time walks the cache
                evict = functools.partial(unless_busy, worker.evict_lock, evict)
            report = await app[OFFLOAD].run(evict)
            if report is None:
                continue
            app[metrics.METRICS].evicted(report.blobs_removed, report.bytes_freed)
            if report.blobs_removed:
                log.info(
                    "proxy cache over budget: evicted %d blob(s), %d bytes",
                    report.blobs_removed,
                    report.bytes_freed,
                )
        except OSError as exc:
            log.warning("proxy cache eviction failed: %s", exc)
        await asyncio.sleep(EVICTION_INTERVAL)


async def _resources(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    offload = Offload()
    app[OFFLOAD] = offload
    app[REGISTRY] = await offload.run(open_store, config.registry_storage, config.s3)
    app[PROXY_STORE] = await offload.run(open_store, config.proxy_storage, config.s3)
    worker = app.get(WORKER)
    # this host among the replicas serving the same stores: its upload sessions and
    # fetches are reached through it (`storage.replicas`, `server.forward`)
    own_id = await offload.run(local_id, config.temporary_registry_storage)
    own = Replica(own_id, advertise_url(config), replica_name(config, None))
    replicas = app[REPLICAS] = Replicas(own, app[REGISTRY], app[PROXY_STORE])
    await offload.run(replicas.register)
    app[FORWARDER] = Forwarder(config, own_id)
    app[UPLOADS] = await offload.run(
        functools.partial(
            Uploads,
            config.temporary_registry_storage,
            # a blob bound for an object store is read back at once to be uploaded: keep
            # it in the page cache rather than writing it past it
            config.server.direct_writes and not isinstance(config.registry_storage, S3Location),
            lock_folder=worker.folder if worker is not None else None,
            id_prefix=own_id,
        )
    )
    for store in (app[REGISTRY], app[PROXY_STORE]):
        # leftovers of writes a crash interrupted: never visible; young ones may belong to
        # an offline command (prefetch) writing right now
        await offload.run(
            store.backend.sweep_leftovers, store.layout.tmp, TEMP_MAX_AGE, time.time(), False
        )
    session = ProxyCache.new_session()
    app[PROXY] = ProxyCache(
        config, app[PROXY_STORE], offload, session, shared=worker is not None, replicas=replicas
    )
    tasks = [asyncio.create_task(_purge_uploads_forever(app))]
    if config.proxy_max_size is not None:
        tasks.append(asyncio.create_task(_evict_proxy_forever(app)))
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await app[PROXY].close()
    await session.close()
    await app[FORWARDER].close()
    offload.close()


def create_app(config: Config, worker: Worker | None = None) -> web.Application:
    """The application; `worker`: one of several processes serving one address (`workers`)."""
    authenticator = auth.Authenticator(config) if config.auth.enabled else None
    app = web.Application(
        # no auth middleware at all without auth: one coroutine less on every request
        middlewares=[logs.access_middleware, errors_middleware]
        + ([auth.auth_middleware] if authenticator is not None else []),
        # bodies are taken as sent: a content coding is refused (middleware), never
        # inflated, so a deflate bomb costs nothing
        handler_args=request_handler_args(max_field_size=16384, auto_decompress=False),
        # only the token endpoint's form is read whole by aiohttp; manifests have their
        # own cap and budget (bodies.read_capped), blobs are streamed
        client_max_size=TOKEN_FORM_MAX,
    )
    if authenticator is not None:
        app[auth.AUTH] = authenticator

        async def close_authenticator(_app: web.Application) -> None:
            authenticator.close()

        app.on_cleanup.append(close_authenticator)
    app[CONFIG] = config
    if worker is not None:
        app[WORKER] = worker
    app[REPLICA] = replica_name(config, worker)
    app[BODY_BUDGET] = MemoryBudget(config.server.body_memory)
    app[uploads.SESSION_LOCKS] = weakref.WeakValueDictionary()
    app.cleanup_ctx.append(_resources)
    app.on_response_prepare.append(add_api_version)
    app.on_response_prepare.append(replica_hook(app[REPLICA]))
    _routes(app, authenticator)
    metrics.setup(app)  # after _resources: instruments the upstream clients it made
    health.setup(app)
    logs.setup(app)
    ui.setup(app)  # `/` and `/ui/…`, unless [ui] enabled = false
    return app
