"""Turn the `{name}` of a request path into a validated repository name.

Names under the proxy prefix (`p/<upstream>/…`) are read-only: any write there
is `DENIED` before a byte is stored.
"""

from __future__ import annotations

from aiohttp import web

from regproxy.errors import Denied
from regproxy.reference import validate_name
from regproxy.server.keys import CONFIG


def is_proxy_name(request: web.Request, name: str) -> bool:
    prefix = request.app[CONFIG].proxy.prefix
    return name == prefix or name.startswith(prefix + "/")


def local_name_for_write(request: web.Request) -> str:
    """The repository a push, delete or upload goes to; refuses the proxy namespace."""
    name = request.match_info["name"]
    if is_proxy_name(request, name):
        raise Denied("the proxy namespace is read-only", detail={"name": name})
    return validate_name(name)


def local_name_for_read(request: web.Request) -> str:
    return validate_name(request.match_info["name"])
