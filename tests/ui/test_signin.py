"""Issue 15 with `[auth]` on: the page shows what the viewer may pull; signing in and out.

`team/*` is for signed-in users, everything else for everybody (`conftest.RULES`).
"""

from __future__ import annotations

from http.cookies import SimpleCookie
from pathlib import Path

from aiohttp.test_utils import TestClient

from tests.support.auth import PASSWORDS, basic, write_htpasswd
from tests.ui.conftest import Pushed, csrf_of, repo_names
from tests.ui.test_pages import page

PUBLIC = ["tools/cli", "web/frontend"]
EVERYTHING = ["team/app", "team/multi", "tools/cli", "web/frontend"]


async def sign_in(
    client: TestClient, user: str = "alice", password: str | None = None, **form: str
) -> tuple[int, dict[str, str], str]:
    """GET the form, POST it; (status, headers, body) of the answer to the POST."""
    html = await page(client, "/ui/login")
    fields = {
        "csrf": csrf_of(html),
        "next": "/",
        "username": user,
        "password": PASSWORDS[user] if password is None else password,
        **form,
    }
    resp = await client.post("/ui/login", data=fields, allow_redirects=False)
    return resp.status, dict(resp.headers), await resp.text()


def cookie_attributes(headers: dict[str, str], name: str) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    jar.load(headers["Set-Cookie"])
    morsel = jar[name]
    return {key: str(morsel[key]) for key in morsel.keys() if morsel[key]}  # noqa: SIM118


async def test_anonymous_viewers_see_only_what_they_may_pull(auth_ui: Pushed) -> None:
    client = auth_ui.client
    html = await page(client, "/")
    assert repo_names(html) == PUBLIC
    assert "team/" not in html
    assert 'href="/ui/login?next=/"' in html or 'href="/ui/login?next=%2F"' in html
    # the operational panels are for signed-in users only
    assert "<meter" not in html and 'id="runs"' not in html and 'id="cache-h"' not in html
    # a repository (or image) they may not pull is the same 404 as one that does not exist
    for path in ("/ui/repo/team/app", f"/ui/image/team/app@{auth_ui.app_image.digest}"):
        assert "Not found" in await page(client, path, 404)
    assert "Not found" in await page(client, "/ui/repo/team/none", 404)
    assert "tools/cli" in await page(client, "/ui/repo/tools/cli")


async def test_a_signed_in_user_sees_team_repositories(auth_ui: Pushed) -> None:
    client = auth_ui.client
    login = await client.get("/ui/login")
    attributes = cookie_attributes(dict(login.headers), "regproxy_login")
    assert attributes["httponly"] and attributes["samesite"] == "Strict"
    status, headers, _ = await sign_in(client)
    assert status == 303 and headers["Location"] == "/"
    attributes = cookie_attributes(headers, "regproxy_session")
    assert attributes["httponly"] and attributes["samesite"] == "Lax"
    assert attributes["path"] == "/" and "secure" not in attributes  # plain HTTP here
    html = await page(client, "/")
    assert repo_names(html) == EVERYTHING
    assert "Signed in as <strong>alice</strong>" in html and 'id="runs"' in html
    assert "team/app" in await page(client, "/ui/repo/team/app")
    await page(client, f"/ui/image/team/app@{auth_ui.app_image.digest}")


async def test_sign_out_needs_the_form_token(auth_ui: Pushed) -> None:
    client = auth_ui.client
    assert (await sign_in(client))[0] == 303
    html = await page(client, "/")
    resp = await client.post("/ui/logout", data={"csrf": "forged"}, allow_redirects=False)
    assert resp.status == 403
    assert repo_names(await page(client, "/")) == EVERYTHING  # still signed in
    resp = await client.post("/ui/logout", data={"csrf": csrf_of(html)}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/"
    assert repo_names(await page(client, "/")) == PUBLIC


async def test_sign_in_refusals(auth_ui: Pushed) -> None:
    client = auth_ui.client
    status, headers, body = await sign_in(client, password="wrong")
    assert status == 401 and "Wrong user name or password" in body
    assert "regproxy_session" not in headers.get("Set-Cookie", "")
    status, headers, body = await sign_in(client, user="alice", csrf="forged")
    assert status == 403 and "regproxy_session" not in headers.get("Set-Cookie", "")
    status, headers, _ = await sign_in(client, next="/", **{})  # a control: this one works
    assert status == 303
    client.session.cookie_jar.clear()
    # a post from another site: refused even with a valid form
    html = await page(client, "/ui/login")
    resp = await client.post(
        "/ui/login",
        data={"csrf": csrf_of(html), "username": "alice", "password": PASSWORDS["alice"]},
        headers={"Origin": "http://evil.example"},
        allow_redirects=False,
    )
    assert resp.status == 403
    # garbage bodies are a 400 form, never a 5xx
    for body, content_type in (
        (b"\xff\xfe%%%", "application/x-www-form-urlencoded"),
        (b"--x\r\nbroken", "multipart/form-data; boundary=x"),
        (b"x" * 70_000, "application/x-www-form-urlencoded"),
    ):
        resp = await client.post(
            "/ui/login", data=body, headers={"Content-Type": content_type}, allow_redirects=False
        )
        assert 400 <= resp.status < 500, (resp.status, await resp.text())


async def test_only_local_paths_after_sign_in(auth_ui: Pushed) -> None:
    client = auth_ui.client
    for target, expected in (
        ("//evil.example/x", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("/ui/repo/team/app", "/ui/repo/team/app"),
    ):
        client.session.cookie_jar.clear()
        status, headers, _ = await sign_in(client, next=target)
        assert status == 303 and headers["Location"] == expected, target


async def test_sign_in_is_throttled_like_the_token_endpoint(auth_ui: Pushed) -> None:
    client = auth_ui.client
    statuses = [(await sign_in(client, "bob", "wrong"))[0] for _ in range(10)]
    assert statuses == [401] * 10
    # past the allowance even the right password waits (bob's was never checked before:
    # a remembered successful check, like alice's from the push, is answered at once)
    status, headers, body = await sign_in(client, "bob")
    assert status == 429 and int(headers["Retry-After"]) >= 1 and "Too many sign-ins" in body
    # the token endpoint counts the same failures for this address
    resp = await client.get(
        "/auth/token", params={"service": "regproxy"}, headers={"Authorization": basic("bob")}
    )
    assert resp.status == 429


async def test_forged_and_stale_sessions_are_anonymous(auth_ui: Pushed, tmp_path: Path) -> None:
    client = auth_ui.client
    assert (await sign_in(client))[0] == 303
    cookie = next(c for c in client.session.cookie_jar if c.key == "regproxy_session").value
    version, payload, signature = cookie.split(".")
    client.session.cookie_jar.clear()
    for forged in (
        f"{version}.{payload}.{signature[:-2]}AA",
        f"{version}.{payload[:-4]}.{signature}",
        "v1.e30.AAAA",
        "garbage",
    ):
        html = await page(client, "/", cookies={"regproxy_session": forged})
        assert repo_names(html) == PUBLIC, forged
    assert repo_names(await page(client, "/", cookies={"regproxy_session": cookie})) == EVERYTHING
    # a new password ends the sessions of the old one
    write_htpasswd(tmp_path / "htpasswd", {**PASSWORDS, "alice": "a-new-secret"})
    assert repo_names(await page(client, "/", cookies={"regproxy_session": cookie})) == PUBLIC
