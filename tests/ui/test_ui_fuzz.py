"""Issue 15: seeded fuzz of the web page's paths — no 5xx, no traceback, ever.

For each mode (no auth; `[auth]` on, some requests with a real session cookie) a few
hundred requests go to `/`, `/ui/…` and the sign-in forms: valid paths mutated into long,
unicode, percent-encoded and traversal paths, odd queries, forged cookies and Origins,
and garbage form bodies. `UI_FUZZ_SEED=<n>` replays a failing run's seed,
`UI_FUZZ_REQUESTS=<n>` changes how many requests each mode sends.
"""

from __future__ import annotations

import logging
import os
import random
import string
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from tests.support.auth import PASSWORDS, auth_config, auth_header
from tests.support.inprocess import make_config, start_client
from tests.ui.conftest import RULES, Pushed, csrf_of, push_examples

SEED = int(os.environ.get("UI_FUZZ_SEED", "15"))
REQUESTS = int(os.environ.get("UI_FUZZ_REQUESTS", "400"))

NAMES = [
    "team/app",
    "team/multi",
    "tools/cli",
    "web/frontend",
    "p/up/lib/x",
    "p/nope/x",
    "p",
    "p/up",
    "UPPER/case",
    "a//b",
    "..",
    "../../etc/passwd",
    "%2e%2e/%2e%2e/etc",
    "a%2fb",
    "_x",
    "a/_tags",
    "é/ü",
    "%00",
    "%zz",
    "%ff%fe",
    "a" * 300,
    "/".join(["a"] * 200),
    "team/app@sha256:" + "0" * 64,
    "<script>alert(1)</script>",
    "a\\b",
    "~root",
]
DIGESTS = [
    "sha256:" + "0" * 64,
    "sha256:" + "f" * 63,
    "sha256:",
    "sha512:" + "a" * 128,
    "md5:abc",
    "",
    "@",
    "sha256:" + "é" * 10,
]
TAILS = ["", "/", "//", "/..", "/%2e%2e", "?", "?q=", "#x", ";x=1", "/index.html"]
QUERIES = [
    "",
    "?q=team",
    "?q=" + "%ff" * 50,
    "?q=" + "é" * 300,
    "?next=//evil.example",
    "?next=%0d%0aSet-Cookie:x=1",
    "?q=a&q=b",
    "?" + "x=1&" * 200,
]
COOKIES = [
    None,
    "regproxy_session=garbage",
    "regproxy_session=v1.e30.AAAA",
    "regproxy_session=v1." + "A" * 5000 + ".B",
    "regproxy_login=" + "0" * 32,
    "regproxy_session=",
    'regproxy_session="quoted"',
]
FORMS: list[tuple[bytes, str]] = [
    (b"username=alice&password=x&csrf=y", "application/x-www-form-urlencoded"),
    (b"\xff\xfe\x00%%%&&&==", "application/x-www-form-urlencoded"),
    (b"--b\r\nContent-Disposition: form-data\r\n\r\nx", "multipart/form-data; boundary=b"),
    (b"--b\r\n\r\n", "multipart/form-data"),
    (b"{}", "application/json"),
    (b"x" * 65_000, "application/x-www-form-urlencoded"),
    (b"username=" + b"a" * 5000 + b"&password=b", "application/x-www-form-urlencoded"),
    (b"", "text/plain"),
]


def random_path(rng: random.Random) -> str:
    kind = rng.choice(["root", "repo", "image", "login", "logout", "static", "other", "other"])
    if kind == "root":
        base = rng.choice(["/", "/ui", "/ui/", "//", "/ui//"])
    elif kind == "repo":
        base = "/ui/repo/" + rng.choice(NAMES)
    elif kind == "image":
        base = f"/ui/image/{rng.choice(NAMES)}@{rng.choice(DIGESTS)}"
    elif kind in ("login", "logout"):
        base = f"/ui/{kind}"
    elif kind == "static":
        base = "/ui/static/" + rng.choice(
            ["ui.css", "ui.js", "../__init__.py", "%2e%2e%2fpages.py", "", "x" * 500]
        )
    else:
        junk = "".join(rng.choice(string.printable[:94] + "éü€") for _ in range(rng.randint(0, 40)))
        base = "/ui/" + junk.replace("?", "%3F").replace("#", "%23").replace(" ", "%20")
    tail = rng.choice(TAILS) if rng.random() < 0.3 else ""
    return base + tail + (rng.choice(QUERIES) if rng.random() < 0.5 else "")


async def send(client: TestClient, rng: random.Random, session: str | None) -> tuple[str, int, str]:
    method = rng.choice(["GET", "GET", "GET", "HEAD", "POST", "POST", "PUT", "DELETE"])
    path = random_path(rng)
    headers: dict[str, str] = {}
    cookie = rng.choice([*COOKIES, session, session])
    if cookie:
        headers["Cookie"] = cookie if "=" in cookie else f"regproxy_session={cookie}"
    if rng.random() < 0.2:
        headers["Origin"] = rng.choice(["http://evil.example", "null", "", "http://127.0.0.1"])
    if rng.random() < 0.1:
        headers["Host"] = rng.choice(["x;rm -rf /", "[::1]:5000", "é.example", "a" * 300])
    data: bytes | None = None
    if method in ("POST", "PUT"):
        data, headers["Content-Type"] = rng.choice(FORMS)
    # non-ASCII percent-encoded as a browser would; everything else as it is
    target = "".join(c if c.isascii() and c.isprintable() else quote(c) for c in path)
    try:
        url = URL(f"http://127.0.0.1:{client.port}{target}", encoded=True)
    except ValueError:
        return path, 0, ""
    async with client.session.request(
        method, url, data=data, headers=headers, allow_redirects=False
    ) as resp:
        body = await resp.read()
        return f"{method} {path}", resp.status, body.decode("utf-8", "replace")


@pytest.mark.parametrize("mode", ["open", "auth"])
async def test_no_5xx_and_no_traceback(
    mode: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    extra: dict[str, Any] = {"ui": {"refresh_interval": 0}}
    if mode == "auth":
        extra["auth"] = auth_config(tmp_path, rules=RULES)
    client = await start_client(make_config(tmp_path, **extra))
    try:
        pushed: Pushed = await push_examples(
            client, auth_header("alice") if mode == "auth" else None
        )
        session = None
        if mode == "auth":
            html = await (await client.get("/ui/login")).text()
            resp = await client.post(
                "/ui/login",
                data={"csrf": csrf_of(html), "username": "bob", "password": PASSWORDS["bob"]},
                allow_redirects=False,
            )
            assert resp.status == 303
            session = resp.cookies["regproxy_session"].value
        client.session.cookie_jar.clear()
        rng = random.Random(f"{SEED}-{mode}")
        failures = []
        caplog.set_level(logging.WARNING)
        for _ in range(REQUESTS):
            client.session.cookie_jar.clear()
            what, status, body = await send(client, rng, session)
            if status >= 500 or "Traceback" in body:
                failures.append((what, status, body[:300]))
        assert not failures, f"seed {SEED}: {failures[:5]}"
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert not tracebacks, [r.getMessage() for r in tracebacks[:5]]
        # and the page still works
        client.session.cookie_jar.clear()
        resp = await client.get("/")
        assert resp.status == 200 and "tools/cli" in await resp.text()
        assert pushed.app_image.digest
    finally:
        await client.close()
