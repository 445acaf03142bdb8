"""Typed application keys shared by the handlers."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from regproxy.config import Config
from regproxy.proxy.cache import ProxyCache
from regproxy.server.budget import MemoryBudget
from regproxy.storage.aio import Offload
from regproxy.storage.replicas import Replicas
from regproxy.storage.store import Store
from regproxy.storage.uploads import Uploads

CONFIG = web.AppKey("config", Config)
REGISTRY = web.AppKey("registry_store", Store)
PROXY_STORE = web.AppKey("proxy_store", Store)
UPLOADS = web.AppKey("uploads", Uploads)
OFFLOAD = web.AppKey("offload", Offload)
PROXY = web.AppKey("proxy_cache", ProxyCache)
BODY_BUDGET = web.AppKey("body_budget", MemoryBudget)
#: this replica and the others serving the same stores (`storage.replicas`)
REPLICAS = web.AppKey("replicas", Replicas)

#: per request: the signed-in user (None: anonymous), and "may this caller do ACTION on NAME?"
USER: web.RequestKey[str | None] = web.RequestKey("user")
MAY: web.RequestKey[Callable[[str, str], bool]] = web.RequestKey("may")
#: per request: the body was read past aiohttp, so the connection closes after the answer
CLOSE_AFTER = web.RequestKey("close_after", bool)
#: per request: (resolved as a write?, the repository or upstream image, or the error
#: naming it raised), computed once by `names.resolve` for auth and routing alike
TARGET = web.RequestKey("target", tuple)
