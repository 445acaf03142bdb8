"""Issue 15: the web page, in-process — what each page shows, its headers, its 404s.

The browser tests (`test_browser.py`) drive the same pages through Debian's chromium;
these check the HTML itself, fast, with a real aiohttp server and client.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from regproxy import manifest as mf
from regproxy.server.metrics import METRICS
from regproxy.storage.runs import record_run
from tests.support.digests import sha256
from tests.support.fake_upstream import FakeUpstream
from tests.support.inprocess import make_config, start_client
from tests.support.oci import OCI_CONFIG, OCI_LAYER, Image, descriptor, push_image
from tests.ui.conftest import SIGNATURE_TYPE, Pushed, repo_names, shown_names

#: anything that would load or send something to another host
FOREIGN = re.compile(
    r"""(?:src|href|action|formaction|data|poster|srcset)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:|//)"""
    r"""|url\(\s*["']?\s*(?:[a-z][a-z0-9+.-]*:|//)|@import""",
    re.IGNORECASE,
)


def assert_page_headers(resp: Any) -> None:
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


def assert_self_contained(html: str) -> None:
    assert not FOREIGN.search(html), FOREIGN.search(html)
    assert "<script>" not in html and " style=" not in html and "<style" not in html
    assert "Traceback" not in html


async def page(client: TestClient, path: str, status: int = 200, **kw: Any) -> str:
    resp = await client.get(path, **kw)
    html = await resp.text()
    assert resp.status == status, (path, resp.status, html[:2000])
    assert resp.headers["Content-Type"].startswith("text/html")
    assert_page_headers(resp)
    assert_self_contained(html)
    return html


def rich_image() -> Image:
    """An image whose config has everything the image page shows."""
    layers = [os.urandom(700), os.urandom(1300)]
    config = {
        "created": "2026-01-02T03:04:05Z",
        "architecture": "arm64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/server"],
            "Cmd": ["--port", "8080"],
            "Env": ["PATH=/usr/bin", "API_TOKEN=s3cr3t-value"],
            "Labels": {"org.opencontainers.image.title": "<b>server</b>"},
            "ExposedPorts": {"8080/tcp": {}},
            "WorkingDir": "/srv",
        },
        "history": [
            {"created": "2026-01-02T03:04:00Z", "created_by": "ADD rootfs.tar /"},
            {"created_by": "ENV API_TOKEN=…", "empty_layer": True},
            {"created_by": "COPY server /bin/server"},
        ],
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer) for layer in layers]},
    }
    config_bytes = json.dumps(config).encode()
    doc = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config_bytes),
        "layers": [descriptor(OCI_LAYER, layer) for layer in layers],
    }
    data = json.dumps(doc).encode()
    return Image(data, sha256(data), config_bytes, layers)


# ---- what the pages show -----------------------------------------------------------------


async def test_overview_lists_every_repository(open_ui: Pushed) -> None:
    html = await page(open_ui.client, "/")
    assert repo_names(html) == ["team/app", "team/multi", "tools/cli", "web/frontend"]
    assert "4 repositories, 5 tags" in html
    row = html.split('data-name="team/app"', 1)[1].split("</tr>", 1)[0]
    assert 'data-label="Tags" class="num">2<' in row  # v1, latest
    assert "pushed" in row and "KiB" in row
    # the storage bars and the maintenance table are there (no auth: everybody sees them)
    assert "<meter" in html and "Pushed images" in html and 'id="runs"' in html
    # the page's one script and stylesheet, by path
    assert re.search(r'<script src="/ui/static/ui\.js\?v=[0-9a-f]+" defer>', html)


async def test_overview_filter_without_script(open_ui: Pushed) -> None:
    """`?q=` hides the rows that do not match (the script does the same as one types)."""
    html = await page(open_ui.client, "/?q=FRONT")
    assert shown_names(html) == ["web/frontend"]
    assert len(repo_names(html)) == 4  # still there, hidden: the filter can widen again
    assert "Showing 1 of 4" in html
    assert 'value="FRONT"' in html


async def test_repository_page(open_ui: Pushed) -> None:
    client = open_ui.client
    host = f"127.0.0.1:{client.port}"
    html = await page(client, "/ui/repo/team/app")
    assert re.findall(r'<tr data-tag="([^"]+)"', html) == ["latest", "v1"] or re.findall(
        r'<tr data-tag="([^"]+)"', html
    ) == ["v1", "latest"]
    digest = open_ui.app_image.digest
    assert f'href="/ui/image/team/app@{digest}"' in html
    assert "OCI manifest" in html and "linux/amd64" in html
    for tool in ("docker", "podman", "nerdctl"):
        assert f'data-copy="{tool} pull {host}/team/app:v1"' in html
        assert f'data-copy="{tool} pull {host}/team/app@{digest}"' in html
    # the signature is listed under its subject, not as an image of its own
    assert SIGNATURE_TYPE in html
    assert f'data-digest="{open_ui.signature.digest}"' not in html
    assert f"/ui/image/team/app@{open_ui.signature.digest}" in html


async def test_copy_commands_use_the_host_the_browser_used(open_ui: Pushed) -> None:
    html = await page(
        open_ui.client, "/ui/repo/tools/cli", headers={"Host": "registry.example:5000"}
    )
    assert 'data-copy="podman pull registry.example:5000/tools/cli:1.0"' in html
    # a Host header that is no host name is never put into a command
    html = await page(open_ui.client, "/ui/repo/tools/cli", headers={"Host": "x;rm -rf /"})
    assert "rm -rf" not in html and "REGISTRY-HOST/tools/cli:1.0" in html


async def test_index_shows_its_platforms(open_ui: Pushed) -> None:
    html = await page(open_ui.client, "/ui/repo/team/multi")
    assert "OCI index" in html and "linux/amd64, linux/arm64" in html
    image = await page(open_ui.client, f"/ui/image/team/multi@{open_ui.index_digest}")
    for child in open_ui.children:
        assert f"/ui/image/team/multi@{child.digest}" in image
    assert "Manifests in this index" in image


async def test_image_page(open_ui: Pushed) -> None:
    client = open_ui.client
    image = rich_image()
    await push_image(client, "tools/server", image, "2.1")
    html = await page(client, f"/ui/image/tools/server@{image.digest}")
    assert "2026-01-02T03:04:05Z" in html and "linux/arm64" in html
    assert "[&#34;/bin/server&#34;]" in html or '["/bin/server"]' in html
    assert "--port" in html and "8080/tcp" in html and "/srv" in html
    # labels are escaped, never markup
    assert "&lt;b&gt;server&lt;/b&gt;" in html and "<b>server</b>" not in html
    # environment values are inside a closed <details>: hidden until expanded
    env = html.split('<details class="env" id="env">', 1)[1].split("</details>", 1)[0]
    assert "2 variables" in env and "s3cr3t-value" in env
    assert "s3cr3t-value" not in html.replace(env, "")
    # layers with sizes, and the history
    layers = html.split('id="layers"', 1)[1].split("</tbody>", 1)[0].split("<tbody>", 1)[1]
    assert layers.count("<tr>") == 2
    assert "700 B" in layers and "1.3 KiB" in layers
    assert "ADD rootfs.tar /" in html and "COPY server /bin/server" in html
    # the signature of team/app is a referrer there
    signed = await page(client, f"/ui/image/team/app@{open_ui.app_image.digest}")
    assert SIGNATURE_TYPE in signed and open_ui.signature.digest[:19] in signed


# ---- 404s, headers, and the API left alone -------------------------------------------------


async def test_bad_paths_are_html_404s(open_ui: Pushed) -> None:
    client = open_ui.client
    digest = open_ui.app_image.digest
    for path in (
        "/ui/nope",
        "/ui/repo/no/such",
        "/ui/repo/UPPER/case",
        "/ui/repo/a%2F..%2F..%2Fetc",
        "/ui/repo/_x",
        "/ui/repo/p/nope/x",
        "/ui/repo/p/docker.io/library/alpine",
        f"/ui/image/team/app@{digest[:-1]}{'1' if digest.endswith('0') else '0'}",  # another
        f"/ui/image/tools/cli@{digest}",  # a digest of another repository
        "/ui/image/team/app@sha256:zz",
        "/ui/image/@",
        "/ui/static/nope.js",
        "/ui/static/..%2F__init__.py",
        "/ui/" + "é" * 1000,
    ):
        html = await page(client, path, 404)
        assert "Not found" in html, path
    resp = await client.put("/ui/anything", data=b"x")
    assert resp.status == 404 and resp.headers["Content-Type"].startswith("text/html")


async def test_api_is_unchanged(open_ui: Pushed) -> None:
    client = open_ui.client
    resp = await client.get("/v2/")
    assert resp.status == 200 and await resp.json() == {}
    resp = await client.get("/v2/no/such/manifests/latest")
    assert resp.status == 404 and (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    resp = await client.get("/not/ui/at/all")
    assert resp.status == 404 and resp.headers["Content-Type"] == "application/json"


async def test_static_files_are_cached_by_version(open_ui: Pushed) -> None:
    client = open_ui.client
    resp = await client.get("/ui/static/ui.css")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/css")
    assert "prefers-color-scheme: dark" in await resp.text()
    again = await client.get("/ui/static/ui.css", headers={"If-None-Match": resp.headers["ETag"]})
    assert again.status == 304
    js = await (await client.get("/ui/static/ui.js")).text()
    assert not FOREIGN.search(js) and "fetch(" not in js and "XMLHttpRequest" not in js


async def test_ui_can_be_turned_off(tmp_path: Path) -> None:
    client = await start_client(make_config(tmp_path, ui={"enabled": False}))
    try:
        for path in ("/", "/ui/repo/x", "/ui/static/ui.css"):
            resp = await client.get(path)
            assert resp.status == 404 and resp.headers["Content-Type"] == "application/json"
    finally:
        await client.close()


async def test_title_is_configurable_and_escaped(tmp_path: Path) -> None:
    config = make_config(tmp_path, ui={"title": "Registry <of> Ops"})
    client = await start_client(config)
    try:
        html = await page(client, "/")
        assert "<title>Registry &lt;of&gt; Ops</title>" in html
    finally:
        await client.close()


# ---- the operational panels -----------------------------------------------------------------


async def test_cache_numbers_follow_pulls(tmp_path: Path, fake: FakeUpstream) -> None:
    image = fake.add_image("lib/tool", "v1")
    config = make_config(
        tmp_path,
        ui={"refresh_interval": 0},
        proxy={"upstreams": {"up": {"url": fake.url}}},
    )
    client = await start_client(config)
    try:
        html = await page(client, "/")
        assert 'data-upstream="up"' in html and "not asked yet" in html
        for _ in range(2):
            resp = await client.get("/v2/p/up/lib/tool/manifests/v1")
            assert resp.status == 200
            for layer in image.layers:
                resp = await client.get(f"/v2/p/up/lib/tool/blobs/{sha256(layer)}")
                assert await resp.read() == layer
        html = await page(client, "/")
        row = html.split('data-upstream="up"', 1)[1].split("</tr>", 1)[0]
        cells = dict(re.findall(r'data-label="([^"]+)"[^>]*>([^<]*)<', row))
        assert cells["Misses"] == str(1 + len(image.layers))
        assert cells["Hits"] == str(1 + len(image.layers))
        assert cells["Hit ratio"] == "50 %"
        assert cells["From upstream"] != "0 B" and cells["From cache"] != "0 B"
        assert "reachable" in html
        # the cached repository is listed under its pull name
        assert "p/up/lib/tool" in repo_names(html)
        repo = await page(client, "/ui/repo/p/up/lib/tool")
        assert f"pull 127.0.0.1:{client.port}/p/up/lib/tool:v1" in repo
    finally:
        await client.close()


async def test_docker_hub_quota_is_shown(tmp_path: Path) -> None:
    """An upstream answering with `ratelimit-remaining` (Docker Hub) shows its quota."""

    async def answer(request: web.Request) -> web.Response:
        headers = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "76;w=21600"}
        if request.path == "/v2/":
            return web.json_response({}, headers=headers)
        return web.json_response(
            {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no"}]}, status=404, headers=headers
        )

    hub = web.Application()
    hub.router.add_route("*", "/{tail:.*}", answer)
    server = TestServer(hub, host="127.0.0.1", port=0)
    await server.start_server()
    config = make_config(
        tmp_path,
        proxy={"upstreams": {"docker.io": {"url": f"http://127.0.0.1:{server.port}"}}},
    )
    client = await start_client(config)
    try:
        resp = await client.get("/v2/p/docker.io/library/alpine/manifests/latest")
        assert resp.status == 404
        html = await page(client, "/")
        assert "76 pulls left (6 h window)" in html
    finally:
        await client.close()
        await server.close()


async def test_gc_and_verify_runs_are_shown(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    client = await start_client(config)
    try:
        html = await page(client, "/")
        assert html.count("never recorded") == 2
        record_run(config.temporary_registry_storage, "gc", True, 1.5, bytes_freed=2048)
        record_run(config.temporary_registry_storage, "verify", False, 0.25)
        html = await page(client, "/")
        runs = html.split('id="runs"', 1)[1].split("</table>", 1)[0]
        assert "2.0 KiB freed" in runs and "found problems" in runs and "1.5 s" in runs
    finally:
        await client.close()


async def test_snapshot_is_shared_with_metrics(open_ui: Pushed) -> None:
    """The overview's scan hands its store totals to /metrics (no second walk)."""
    app = open_ui.client.app
    assert app is not None
    await page(open_ui.client, "/")
    totals = app[METRICS].stores["registry"]
    assert totals.repositories == 4 and totals.blobs > 0 and totals.bytes > 0


def test_history_steps_show_environment_names_not_values() -> None:
    from regproxy.ui.views import _without_env_values as hide

    assert (
        hide('/bin/sh -c #(nop)  ENV PATH=/bin TOKEN="s e"')
        == "/bin/sh -c #(nop)  ENV PATH=… TOKEN=…"
    )
    assert hide("ENV TOKEN abc def") == "ENV TOKEN …"
    assert hide("RUN echo TOKEN=abc") == "RUN echo TOKEN=abc"
    assert hide(None) is None
