"""The web page: `GET /` and `/ui/…` (issue 15). The registry API under `/v2/` is untouched.

- `pages`: the handlers (overview, repository, image, sign-in and out, static, 404)
- `views`: what the repository and image pages show, read from one repository
- `snapshot`: the overview's inventory of both stores, scanned in the background
- `sessions`: signed session cookies and CSRF tokens (only with `[auth]` on)
- `templates/`, `static/`: Jinja2 templates, one stylesheet and one script, all served
  from this process (nothing on the page comes from another host)
"""

from __future__ import annotations

from aiohttp import web

from regproxy.server.auth import AUTH
from regproxy.server.keys import CONFIG
from regproxy.ui import pages
from regproxy.ui.snapshot import SNAPSHOTS, Snapshots, snapshots_ctx

__all__ = ["setup"]


def setup(app: web.Application) -> None:
    """Mount the page on `app` unless `[ui] enabled = false`; after the app's stores
    (its snapshot scans stop before they close)."""
    config = app[CONFIG]
    if not config.ui.enabled:
        return
    app[pages.UI] = pages.Ui(config, app.get(AUTH))
    app[SNAPSHOTS] = Snapshots(config.ui.refresh_interval)
    app.cleanup_ctx.append(snapshots_ctx)
    router = app.router
    router.add_get("/", pages.overview)
    router.add_get("/ui/", pages.overview)
    router.add_get("/ui/repo/{name:.+}", pages.repository)
    router.add_get("/ui/image/{ref:.+}", pages.image)
    router.add_get("/ui/login", pages.login_form)
    router.add_post("/ui/login", pages.login)
    router.add_post("/ui/logout", pages.logout)
    router.add_get("/ui/static/{file}", pages.static)
    # browsers ask for it on every site: nothing, rather than the API's JSON 404
    router.add_get("/favicon.ico", pages.no_icon)
    # anything else under /ui/ (any method) is the page's own 404, never the API's JSON
    router.add_route("*", "/ui/{tail:.*}", pages.not_found)
