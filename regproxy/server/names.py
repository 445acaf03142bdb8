"""Turn the `{name}` of a request path into a validated repository name or a proxy target.

Names under the proxy prefix (`p/<upstream>/…`) are read-only: any write there
is `DENIED` before a byte is stored. Reads may also be routed to an upstream
by containerd's `?ns=<registry>` parameter, or (dockerd `registry-mirrors`)
for repositories that do not exist locally when `proxy.mirror_upstream` is set.
"""

from __future__ import annotations

from aiohttp import web

from regproxy.errors import Denied, NameUnknown
from regproxy.reference import ProxyName, remote_name, split_proxy_name, validate_name
from regproxy.server.keys import CONFIG, REGISTRY


def is_proxy_name(request: web.Request, name: str) -> bool:
    prefix = request.app[CONFIG].proxy.prefix
    return name == prefix or name.startswith(prefix + "/")


def local_name_for_write(request: web.Request) -> str:
    """The repository a push, delete or upload goes to; refuses the proxy namespace."""
    name = request.match_info["name"]
    if is_proxy_name(request, name):
        raise Denied("the proxy namespace is read-only", detail={"name": name[:300]})
    return validate_name(name)


def read_target(request: web.Request) -> str | ProxyName:
    """A local repository name, or the upstream image a pull is for."""
    proxy = request.app[CONFIG].proxy
    name = request.match_info["name"]
    upstreams = proxy.upstreams.keys()
    if is_proxy_name(request, name):
        target = split_proxy_name(name, proxy.prefix, upstreams)
        if target is None:  # the bare prefix (`/v2/p/...`) names no upstream image
            raise NameUnknown(f"{name!r} names no image under an upstream", detail={"name": name})
        return target
    validate_name(name)
    ns = request.query.get("ns")
    if ns:
        if ns not in upstreams:
            raise NameUnknown(f"registry {ns[:100]!r} is not a configured upstream")
        return ProxyName(ns, remote_name(ns, name), name)
    mirror = proxy.mirror_upstream
    # only GETs: a push checks for existing blobs with HEAD, and must see local content only
    if mirror and request.method == "GET" and not request.app[REGISTRY].repository_exists(name):
        return ProxyName(mirror, remote_name(mirror, name), name)
    return name
