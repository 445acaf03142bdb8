"""The ops listener: `/metrics`, `/healthz` and `/readyz` of the main app on `metrics.listen`.

A module of its own so that `health` and `metrics` need not know each other:
this one uses both, and neither imports it. The listener answers like the main
one: OCI JSON errors (a bad path is a 404 envelope, never a traceback) and one
access line per request with a request id. Its requests are not counted in the
main app's request metrics (this app has no `METRICS` of its own): scrapes and
probes every few seconds would drown the registry's own traffic.
"""

from __future__ import annotations

import logging

from aiohttp import web

from regproxy.config import split_listen
from regproxy.server import health, logs, metrics
from regproxy.server.keys import CONFIG
from regproxy.server.middleware import errors_middleware

log = logging.getLogger("regproxy.metrics")


def ops_app(main: web.Application) -> web.Application:
    """/metrics, /healthz and /readyz of `main`, for the separate `metrics.listen` address."""
    ops = web.Application(middlewares=[logs.access_middleware, errors_middleware])
    ops.router.add_get(metrics.METRICS_PATH, metrics.scrape_handler(main), allow_head=False)
    health.add_routes(ops.router, main)
    logs.setup(ops)
    return ops


async def start_listener(main: web.Application) -> web.AppRunner | None:
    """Listen on `metrics.listen` (when set); the caller cleans the runner up before `main`'s."""
    listen = main[CONFIG].metrics.listen
    if listen is None:
        return None
    host, port = split_listen(listen)
    # access lines come from logs.access_middleware, as on the main listener
    runner = web.AppRunner(ops_app(main), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    for address in runner.addresses:
        shown = f"[{address[0]}]" if ":" in address[0] else address[0]
        log.info("metrics listening on http://%s:%d%s", shown, address[1], metrics.METRICS_PATH)
    return runner
