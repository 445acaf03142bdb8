"""Discovery: `tags/list` and `_catalog`, both with `n`/`last` pagination and `Link`."""

from __future__ import annotations

import bisect
from urllib.parse import urlencode

from aiohttp import web

from regproxy.errors import PaginationInvalid
from regproxy.proxy.cache import CACHE_STATUS, STALE
from regproxy.server.keys import MAY, OFFLOAD, PROXY, REGISTRY
from regproxy.server.names import read_target

#: The largest page a client may ask for, and the catalog's page without `n`.
MAX_PAGE = 10_000
DEFAULT_CATALOG_PAGE = 1_000


def parse_page_size(raw_n: str) -> int:
    """`n`: a non-negative integer, capped at `MAX_PAGE`; anything else is 400."""
    # isascii: "²".isdigit() is true but int("²") raises; long: int() caps at 4300 digits
    if not (raw_n.isascii() and raw_n.isdigit()):
        raise PaginationInvalid(f"n must be a non-negative integer, got {raw_n[:50]!r}")
    return MAX_PAGE if len(raw_n) > 9 else min(int(raw_n), MAX_PAGE)


def paginate(
    request: web.Request, items: list[str], default_page: int | None
) -> tuple[list[str], str | None]:
    """Slice a sorted list by `last` and `n`; return the page and the `Link` for the next one."""
    raw_n = request.query.get("n")
    page_size = default_page if raw_n is None or raw_n == "" else parse_page_size(raw_n)
    last = request.query.get("last")
    start = bisect.bisect_right(items, last) if last else 0
    end = len(items) if page_size is None else start + page_size
    page = items[start:end]
    link = None
    if page_size is not None and end < len(items) and page:
        query = urlencode({"n": page_size, "last": page[-1]})
        link = f'<{request.path}?{query}>; rel="next"'
    return page, link


def _json(body: dict, link: str | None) -> web.Response:
    response = web.json_response(body)
    if link:
        response.headers["Link"] = link
    return response


async def list_tags(request: web.Request) -> web.Response:
    target = await read_target(request)
    if isinstance(target, str):
        store = request.app[REGISTRY]
        tags = await request.app[OFFLOAD].metadata(
            store.backend.local, store.cached_tags, target
        )  # on disk: one stat
        if tags is None:
            tags = await request.app[OFFLOAD].run(store.tags, target)
        page, link = paginate(request, tags, None)
        return _json({"name": target, "tags": page}, link)
    params = {k: v for k, v in request.query.items() if k in ("n", "last") and v}
    if "n" in params:  # checked and capped here: the upstream sees a sane page size only
        params["n"] = str(parse_page_size(params["n"]))
    tags, next_query, status = await request.app[PROXY].tags(target, params)
    if status == STALE:  # the cached tags, paginated here
        page, link = paginate(request, sorted(tags), None)
    else:  # the upstream's page; its next page is reached through us
        page, link = tags, (f'<{request.path}?{next_query}>; rel="next"' if next_query else None)
    response = _json({"name": target.local, "tags": page}, link)
    response.headers[CACHE_STATUS] = status
    return response


async def catalog(request: web.Request) -> web.Response:
    store = request.app[REGISTRY]
    names = await request.app[OFFLOAD].run(store.repositories)
    may = request.get(MAY)
    if may is not None:  # with auth: only what the caller may pull
        names = [name for name in names if may("pull", name)]
    page, link = paginate(request, names, DEFAULT_CATALOG_PAGE)
    return _json({"repositories": page}, link)
