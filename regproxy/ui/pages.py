"""The web page's handlers: overview, repository, image, sign-in, static files, 404.

Every answer is server-rendered HTML from the Jinja2 templates beside this module
(autoescaped), with a strict Content-Security-Policy (`default-src 'self'`, no
inline script or style), `X-Frame-Options: DENY` and `Cache-Control: no-store`.

Authorisation is the API's own: with `[auth]` on, each repository shown passes
`Policy.allows(viewer, "pull", name)`, and a repository (or image) the viewer may
not pull answers the same 404 as one that does not exist. Signing in checks the
password with `Authenticator.check_password` (the bcrypt pool and the per-address
failure throttle of the token endpoint).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from regproxy import __version__
from regproxy.config import Config
from regproxy.digest import Digest
from regproxy.errors import RegistryError, TooManyRequests
from regproxy.proxy.cache import cache_name
from regproxy.reference import split_proxy_name, under_prefix, validate_name
from regproxy.server.auth import AUTH, Authenticator
from regproxy.server.keys import CONFIG, OFFLOAD, PROXY, PROXY_STORE, REGISTRY
from regproxy.storage.runs import STATUS_DIR, read_run
from regproxy.storage.store import Store
from regproxy.ui import views
from regproxy.ui.sessions import (
    LOGIN_COOKIE,
    LOGIN_SECONDS,
    SESSION_COOKIE,
    SESSION_SECONDS,
    SessionSigner,
)
from regproxy.ui.snapshot import SNAPSHOTS, RepoRow, Snapshot

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
STATIC_FILES = {"ui.css": "text/css", "ui.js": "text/javascript"}

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
#: what a pull command may name as the registry host (anything else: a placeholder)
_HOST_RE = re.compile(r"[A-Za-z0-9.\-_]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
_MAX_FIELD = 1024
PULL_TOOLS = ("docker", "podman", "nerdctl")


# ---- formatting (template filters) --------------------------------------------------------


def human_size(value: int | float | None) -> str:
    if value is None:
        return "–"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


def iso_time(value: float | None) -> str:
    if value is None:
        return ""
    return datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def ago(value: float | None, now: float | None = None) -> str:
    if value is None:
        return "never"
    seconds = (time.time() if now is None else now) - value
    if seconds < 0:
        return "just now"
    for limit, unit, div in (
        (60, "s", 1),
        (3600, "min", 60),
        (86400, "h", 3600),
        (86400 * 60, "d", 86400),
    ):
        if seconds < limit:
            return f"{int(seconds // div)} {unit} ago"
    return datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%d")


def short_digest(value: str | None) -> str:
    if not value:
        return ""
    algorithm, _, hex_ = value.partition(":")
    return f"{algorithm}:{hex_[:12]}" if hex_ else value[:19]


def url_path(value: str) -> str:
    """A name or `name@digest` as a URL path (names and digests need no escaping of `/:@`)."""
    return quote(value, safe="/:@")


def quota_text(raw: str | None) -> str | None:
    """Docker Hub's `76;w=21600` → `76 pulls left (6 h window)`."""
    if not raw:
        return None
    count, _, rest = raw.partition(";")
    window = rest.strip().removeprefix("w=")
    text = f"{count.strip()} pulls left"
    if window.isdigit():
        seconds = int(window)
        text += f" ({seconds // 3600} h window)" if seconds >= 3600 else f" ({seconds} s window)"
    return text


# ---- the per-app object -------------------------------------------------------------------


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


class Ui:
    """Templates, static files, the session signer and the config cache of one app."""

    def __init__(self, config: Config, authenticator: Authenticator | None) -> None:
        self.config = config
        self.title = config.ui.title
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(TEMPLATES)),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(
            size=human_size,
            iso=iso_time,
            ago=ago,
            short=short_digest,
            kind=views.short_type,
            urlpath=url_path,
        )
        self.static: dict[str, StaticFile] = {}
        for name, content_type in STATIC_FILES.items():
            body = (STATIC / name).read_bytes()
            etag = hashlib.sha256(body).hexdigest()[:16]
            self.static[name] = StaticFile(body, content_type, etag)
        self.env.globals.update(
            version=__version__,
            title=self.title,
            asset={name: f"/ui/static/{name}?v={f.etag}" for name, f in self.static.items()},
            auth_enabled=authenticator is not None,
        )
        self.signer = SessionSigner(authenticator.signer.key) if authenticator else None
        self.configs = views.ConfigCache()


UI = web.AppKey("ui", Ui)


# ---- who is looking, and what they may see -------------------------------------------------


@dataclass(frozen=True)
class Viewer:
    user: str | None
    logout_csrf: str | None = None


def viewer(request: web.Request) -> Viewer:
    """The signed-in user of a valid session (None: anonymous, or auth is off)."""
    ui = request.app[UI]
    if ui.signer is None:
        return Viewer(None)
    session = ui.signer.verify(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return Viewer(None)
    if session.stamp != request.app[AUTH].htpasswd.stamp(session.user):
        return Viewer(None)  # the password changed or the user is gone: the session died
    return Viewer(session.user, ui.signer.csrf("logout", session.nonce))


def may_pull(request: web.Request, user: str | None, name: str) -> bool:
    auth = request.app.get(AUTH)
    if auth is None:
        return True
    prefix = request.app[CONFIG].proxy.prefix
    return auth.policy.allows(user, "pull", name, under_prefix(name, prefix))


def pull_host(request: web.Request) -> str:
    """The registry host as the browser named it (for the copied pull commands)."""
    host = request.host
    if request.app[CONFIG].server.trust_forwarded_headers:
        host = request.headers.get("X-Forwarded-Host", host).split(",")[0].strip()
    return host if _HOST_RE.fullmatch(host) else "REGISTRY-HOST"


def pull_commands(
    host: str, name: str, tag: str | None, digest: str | None
) -> list[dict[str, str]]:
    ref = f"{host}/{name}:{tag}" if tag is not None else f"{host}/{name}@{digest}"
    return [{"tool": tool, "command": f"{tool} pull {ref}"} for tool in PULL_TOOLS]


# ---- rendering ----------------------------------------------------------------------------


def render(
    request: web.Request,
    template: str,
    status: int = 200,
    who: Viewer | None = None,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> web.Response:
    ui = request.app[UI]
    who = viewer(request) if who is None else who
    body = ui.env.get_template(template).render(
        viewer=who, path=request.path_qs, now=time.time(), **context
    )
    response = web.Response(
        text=body,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers={**SECURITY_HEADERS, "Cache-Control": "no-store", **(headers or {})},
    )
    return response


def error_page(
    request: web.Request, status: int, heading: str, message: str, **kw: Any
) -> web.Response:
    return render(request, "error.html", status, heading=heading, message=message, **kw)


def not_found_page(request: web.Request, message: str | None = None) -> web.Response:
    return error_page(
        request,
        404,
        "Not found",
        message or "There is no page here, or nothing you may see.",
    )


# ---- the overview -------------------------------------------------------------------------


def _matches(row: RepoRow, words: list[str]) -> bool:
    return all(word in row.name for word in words)


async def overview(request: web.Request) -> web.Response:
    app = request.app
    who = viewer(request)
    snapshot: Snapshot | None = await app[SNAPSHOTS].get(app)
    query = request.query.get("q", "")[:200]
    words = query.lower().split()
    rows = [r for r in snapshot.rows if may_pull(request, who.user, r.name)] if snapshot else []
    shown = [(r, _matches(r, words)) for r in rows]
    # with auth on, the figures below are for signed-in users only: an upstream's error
    # can name an image, and anonymous viewers see nothing but what they may pull
    operations = app.get(AUTH) is None or who.user is not None
    context: dict[str, Any] = {
        "snapshot": snapshot,
        "scan_error": app[SNAPSHOTS].failed,
        "rows": shown,
        "visible": sum(1 for _, ok in shown if ok),
        "tags": sum(r.tags for r in rows),
        "query": query,
        "operations": operations,
    }
    if operations:
        context.update(await _operations(request, snapshot))
    return render(request, "overview.html", who=who, **context)


async def _operations(request: web.Request, snapshot: Snapshot | None) -> dict[str, Any]:
    app = request.app
    config = app[CONFIG]
    stores = []
    if snapshot is not None:
        scale = max([s.bytes for s in snapshot.stores] + [config.proxy_max_size or 0, 1])
        for use in snapshot.stores:
            budget = config.proxy_max_size if use.label == "proxy" else None
            stores.append({"use": use, "scale": scale, "budget": budget})
    cache = app[PROXY]
    stats = cache.stats
    upstreams = []
    for name, upstream in cache.upstreams.items():
        hits = stats.hits.get(name, 0)
        revalidated = stats.revalidations.get(name, 0)
        stale = stats.stale.get(name, 0)
        misses = stats.misses.get(name, 0)
        answers = hits + revalidated + stale + misses
        state = upstream.state
        upstreams.append(
            {
                "name": name,
                "url": upstream.base,
                "hits": hits,
                "revalidated": revalidated,
                "stale": stale,
                "misses": misses,
                "ratio": (hits + revalidated + stale) / answers if answers else None,
                "served": stats.served_bytes.get(name, 0),
                "fetched": stats.upstream_bytes.get(name, 0),
                "reachable": state.reachable,
                "last_ok": state.last_ok,
                "last_error": state.last_error,
                "last_error_at": state.last_error_at,
                "quota": quota_text(state.ratelimit_remaining),
                "quota_at": state.ratelimit_at,
            }
        )
    runs = await app[OFFLOAD].run(_read_runs, Path(config.temporary_registry_storage))
    return {"stores": stores, "upstreams": upstreams, "runs": runs}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _read_runs(temp_root: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """The status files `gc` and `verify` leave (see `storage.runs`), with typed values."""
    found: list[tuple[str, dict[str, Any] | None]] = []
    for command in ("gc", "verify"):
        raw = read_run(temp_root / STATUS_DIR / f"{command}.json")
        if raw is None:
            found.append((command, None))
            continue
        found.append(
            (
                command,
                {
                    "runs": int(_number(raw.get("runs"))),
                    "failures": int(_number(raw.get("failures"))),
                    "bytes_freed": int(_number(raw.get("bytes_freed"))),
                    "last_finished": _number(raw.get("last_finished")) or None,
                    "last_seconds": _number(raw.get("last_seconds")),
                    "last_ok": raw.get("last_ok") is True,
                },
            )
        )
    return found


# ---- a repository and an image ------------------------------------------------------------


@dataclass(frozen=True)
class Located:
    store: Store
    store_name: str
    kind: str
    upstream: str | None


def locate(request: web.Request, name: str) -> Located | None:
    """Which store holds `name` and under what name; None for a name that cannot exist."""
    config = request.app[CONFIG]
    try:
        target = split_proxy_name(name, config.proxy.prefix, config.proxy.upstreams)
        if target is None:
            return Located(request.app[REGISTRY], validate_name(name), "local", None)
        if target.local != name:  # Docker Hub's `library/` rule: one page per image
            return None
        return Located(request.app[PROXY_STORE], cache_name(target), "proxy", target.upstream)
    except RegistryError:
        return None


async def repository(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    who = viewer(request)
    found = locate(request, name)
    if found is None or not may_pull(request, who.user, name):
        return not_found_page(request)
    view = await request.app[OFFLOAD].run(
        views.repository_view,
        found.store,
        found.store_name,
        name,
        found.kind,
        found.upstream,
        request.app[UI].configs,
    )
    if view is None:
        return not_found_page(request)
    host = pull_host(request)
    return render(
        request,
        "repository.html",
        who=who,
        repo=view,
        host=host,
        by_tag={t.tag: pull_commands(host, name, t.tag, None) for t in view.tags},
        by_digest={
            i.facts.digest: pull_commands(host, name, None, i.facts.digest) for i in view.images
        },
    )


async def image(request: web.Request) -> web.Response:
    name, _, reference = request.match_info["ref"].rpartition("@")
    who = viewer(request)
    found = locate(request, name) if name else None
    if found is None or not may_pull(request, who.user, name):
        return not_found_page(request)
    try:
        digest = Digest.parse(reference)
    except RegistryError:
        return not_found_page(request)
    view = await request.app[OFFLOAD].run(
        views.image_view, found.store, found.store_name, name, digest, request.app[UI].configs
    )
    if view is None:
        return not_found_page(request)
    host = pull_host(request)
    return render(
        request,
        "image.html",
        who=who,
        image=view,
        commands=pull_commands(host, name, None, str(digest)),
    )


# ---- signing in and out -------------------------------------------------------------------


def _safe_next(value: str | None) -> str:
    """Only a path on this site: never `//host`, a scheme, or a backslash trick."""
    if not value or len(value) > 2048 or not value.startswith("/"):
        return "/"
    if value.startswith("//") or "\\" in value or any(ord(c) < 32 for c in value):
        return "/"
    return value


def _secure(request: web.Request) -> bool:
    auth = request.app.get(AUTH)
    base = auth.base_url(request) if auth is not None else f"{request.scheme}://"
    return base.startswith("https://")


def _same_origin(request: web.Request) -> bool:
    """A POST's `Origin`, when the browser sent one, is this site."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin in (request.app[AUTH].base_url(request), f"{request.scheme}://{request.host}")


def _login_form(
    request: web.Request,
    status: int = 200,
    error: str | None = None,
    headers: dict[str, str] | None = None,
    nonce: str | None = None,
    next_path: str = "/",
) -> web.Response:
    ui = request.app[UI]
    assert ui.signer is not None
    fresh = nonce is None
    nonce = nonce or ui.signer.new_nonce()
    response = render(
        request,
        "login.html",
        status,
        headers=headers,
        error=error,
        csrf=ui.signer.csrf("login", nonce),
        next_path=next_path,
    )
    if fresh:
        response.set_cookie(
            LOGIN_COOKIE,
            nonce,
            max_age=LOGIN_SECONDS,
            path="/ui/login",
            httponly=True,
            samesite="Strict",
            secure=_secure(request),
        )
    return response


async def login_form(request: web.Request) -> web.Response:
    if request.app[UI].signer is None:
        return not_found_page(request, "Signing in is off: this registry has no [auth].")
    nonce = request.cookies.get(LOGIN_COOKIE)
    valid = nonce is not None and re.fullmatch(r"[0-9a-f]{32}", nonce) is not None
    next_path = _safe_next(request.query.get("next"))
    return _login_form(request, nonce=nonce if valid else None, next_path=next_path)


async def _form(request: web.Request) -> dict[str, str] | None:
    """The posted urlencoded form (text fields only), or None when it is not one."""
    try:
        async with asyncio.timeout(request.app[CONFIG].server.body_timeout):
            posted = await request.post()
    except TimeoutError:
        if request.transport is not None:
            request.transport.close()
        return None
    except (ValueError, LookupError, HttpProcessingError, web.HTTPException):
        return None
    return {k: v for k, v in posted.items() if isinstance(v, str) and len(v) <= _MAX_FIELD}


def _see_other(location: str) -> web.Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-store", "Location": location}
    return web.Response(status=303, headers=headers)


async def login(request: web.Request) -> web.Response:
    ui = request.app[UI]
    if ui.signer is None:
        return not_found_page(request, "Signing in is off: this registry has no [auth].")
    form = await _form(request)
    if form is None:
        return _login_form(request, 400, "The form could not be read. Please try again.")
    next_path = _safe_next(form.get("next"))
    nonce = request.cookies.get(LOGIN_COOKIE)
    if not _same_origin(request) or not ui.signer.csrf_ok("login", nonce, form.get("csrf")):
        return _login_form(
            request, 403, "The form expired. Please sign in again.", next_path=next_path
        )
    user, password = form.get("username", ""), form.get("password", "")
    auth = request.app[AUTH]
    try:
        ok = bool(user) and await auth.check_password(request, user, password)
    except TooManyRequests as exc:
        wait = exc.headers.get("Retry-After", "")
        return _login_form(
            request,
            429,
            f"Too many sign-ins. Try again in {wait or 'a few'} seconds.",
            headers={"Retry-After": wait} if wait else None,
            nonce=nonce,
            next_path=next_path,
        )
    if not ok:
        return _login_form(
            request, 401, "Wrong user name or password.", nonce=nonce, next_path=next_path
        )
    response = _see_other(next_path)
    response.set_cookie(
        SESSION_COOKIE,
        ui.signer.issue(user, auth.htpasswd.stamp(user)),
        max_age=SESSION_SECONDS,
        path="/",
        httponly=True,
        samesite="Lax",
        secure=_secure(request),
    )
    response.del_cookie(LOGIN_COOKIE, path="/ui/login")
    return response


async def logout(request: web.Request) -> web.Response:
    ui = request.app[UI]
    if ui.signer is None:
        return not_found_page(request)
    form = await _form(request)
    session = ui.signer.verify(request.cookies.get(SESSION_COOKIE))
    token = form.get("csrf") if form else None
    if session is not None and (
        not _same_origin(request) or not ui.signer.csrf_ok("logout", session.nonce, token)
    ):
        return error_page(request, 403, "Not signed out", "The form expired. Please try again.")
    response = _see_other("/")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


# ---- static files and everything else -----------------------------------------------------


async def static(request: web.Request) -> web.Response:
    found = request.app[UI].static.get(request.match_info["file"])
    if found is None:
        return not_found_page(request)
    headers = {
        **SECURITY_HEADERS,
        "ETag": f'"{found.etag}"',
        # the page links each file with ?v=<its hash>: a new file is a new URL
        "Cache-Control": "public, max-age=31536000, immutable",
    }
    if request.headers.get("If-None-Match") == f'"{found.etag}"':
        return web.Response(status=304, headers=headers)
    return web.Response(body=found.body, content_type=found.content_type, headers=headers)


async def no_icon(_request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Cache-Control": "public, max-age=86400"})


async def not_found(request: web.Request) -> web.Response:
    return not_found_page(request)
