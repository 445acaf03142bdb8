"""Turn the `{name}` of a request path into a validated repository name or a proxy target.

Names under the proxy prefix (`p/<upstream>/…`) are read-only: any write there
is `DENIED` before a byte is stored. Reads may also be routed to an upstream
by containerd's `?ns=<registry>` parameter, or (dockerd `registry-mirrors`)
for repositories that do not exist locally when `proxy.mirror_upstream` is set.

The answer is computed once per request and remembered on it: the auth
middleware decides from it, and the handler routes by it. Two readings of one
request (one seeing a proxy pull, the other a local one) can therefore never
disagree about which rules apply.
"""

from __future__ import annotations

from aiohttp import web

from regproxy.errors import Denied, NameInvalid, NameUnknown, RegistryError
from regproxy.reference import ProxyName, remote_name, split_proxy_name, under_prefix, validate_name
from regproxy.server.keys import CONFIG, OFFLOAD, REGISTRY, TARGET

#: What a request's name resolves to: a local repository name, or an upstream image.
Target = str | ProxyName


def is_proxy_name(request: web.Request, name: str) -> bool:
    return under_prefix(name, request.app[CONFIG].proxy.prefix)


def _namespace(request: web.Request) -> str | None:
    """containerd's `?ns=<registry>`: one non-empty value, or None when absent or empty.

    Repeating it is refused: which of two registries a pull means is not ours to guess.
    """
    values = request.query.getall("ns", ())
    if len(values) > 1:
        raise NameInvalid("the ns parameter is given more than once")
    return values[0] or None if values else None


def _resolve_write(request: web.Request) -> str:
    name = request.match_info["name"]
    if is_proxy_name(request, name):
        raise Denied("the proxy namespace is read-only", detail={"name": name[:300]})
    return validate_name(name)


async def _resolve_read(request: web.Request) -> Target:
    proxy = request.app[CONFIG].proxy
    name = request.match_info["name"]
    upstreams = frozenset(proxy.upstreams)
    if is_proxy_name(request, name):
        target = split_proxy_name(name, proxy.prefix, upstreams)
        assert target is not None  # is_proxy_name held
        return target
    validate_name(name)
    ns = _namespace(request)
    if ns is not None:
        if ns not in upstreams:
            raise NameUnknown(f"registry {ns[:100]!r} is not a configured upstream")
        return ProxyName(ns, remote_name(ns, name), name)
    mirror = proxy.mirror_upstream
    # only GETs: a push checks for existing blobs with HEAD, and must see local content only
    if mirror and request.method == "GET":
        store = request.app[REGISTRY]
        offload = request.app[OFFLOAD]
        if not await offload.metadata(store.backend.local, store.repository_exists, name):
            return ProxyName(mirror, remote_name(mirror, name), name)
    return name


async def resolve(request: web.Request, write: bool) -> Target:
    """The request's target, computed on first use and then the same for every reader.

    `write`: a push, delete or upload (the proxy namespace is refused, `ns` ignored).
    A request is only ever read one way: asking the other way is a bug in the route
    table, not a client error.
    """
    cached = request.get(TARGET)
    if cached is None:
        try:
            target: Target | RegistryError = (
                _resolve_write(request) if write else await _resolve_read(request)
            )
        except RegistryError as exc:
            target = exc
        cached = request[TARGET] = (write, target)
    was_write, target = cached
    if was_write != write:
        raise AssertionError("a request's target was read as both a pull and a write")
    if isinstance(target, RegistryError):
        raise target
    return target


async def read_target(request: web.Request) -> Target:
    """A local repository name, or the upstream image a pull is for."""
    return await resolve(request, write=False)


async def local_name_for_write(request: web.Request) -> str:
    """The repository a push, delete or upload goes to; refuses the proxy namespace."""
    target = await resolve(request, write=True)
    assert isinstance(target, str)
    return target
