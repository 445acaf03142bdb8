"""Who may pull, push and delete where: the access matrix of issue 5, in both auth modes.

{anonymous, alice (user), bob (other user), root (admin, group `@admins`)} ×
{pull, push, delete} × {public/app, alice/app, misc/app (no rule: authenticated
only), p/up/lib/app (the proxy namespace, `proxy_pull`)}, each answered with an
exact status: 200/201/202, 401 with a challenge, or 403 `DENIED`.

In token mode every request goes the way a client sends it: without credentials
first, then, on a Bearer challenge, with a token fetched from the realm (Basic
credentials, or none) for the challenged scope. In basic mode users send Basic
credentials with every request.
"""

from __future__ import annotations

import os

import pytest

from tests.support.auth import (
    LOCAL_REPOS,
    PROXY_REPO,
    Caller,
    Registry,
    RegistryFactory,
    Result,
    challenge_params,
    fetch_token,
)
from tests.support.digests import sha256

MODES = ("token", "basic")
PARTIES = ("anonymous", "alice", "bob", "root")
ACCEPT = {
    "Accept": "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
}

# repository → action → status per party (anonymous, alice, bob, root)
EXPECTED: dict[str, dict[str, tuple[int, int, int, int]]] = {
    "public/app": {"pull": (200, 200, 200, 200), "push": (401, 201, 201, 201),
                   "delete": (401, 403, 403, 202)},
    "alice/app": {"pull": (401, 200, 403, 200), "push": (401, 201, 403, 403),
                  "delete": (401, 202, 403, 202)},
    "misc/app": {"pull": (401, 200, 200, 200), "push": (401, 201, 201, 201),
                 "delete": (401, 202, 202, 202)},
    PROXY_REPO: {"pull": (401, 200, 200, 200), "push": (401, 403, 403, 403),
                 "delete": (401, 403, 403, 403)},
}  # fmt: skip
SCOPE_ACTIONS = {"pull": "pull", "push": "pull,push", "delete": "delete"}


def caller(party: str) -> Caller:
    return Caller(None if party == "anonymous" else party)


async def attempt(registry: Registry, who: Caller, action: str, name: str) -> Result:
    client, mode = registry.client, registry.mode
    if action == "pull":
        return await who.request(client, mode, "GET", f"/v2/{name}/manifests/v1", headers=ACCEPT)
    if action == "push":
        blob = os.urandom(333)
        path = f"/v2/{name}/blobs/uploads/?digest={sha256(blob)}"
        return await who.request(client, mode, "POST", path, data=blob)
    return await who.request(client, mode, "DELETE", f"/v2/{name}/manifests/d")


def check_denial(registry: Registry, result: Result, name: str, action: str) -> str | None:
    """What is wrong with a 401/403 answer, or None."""
    if result.status == 403:
        return None if result.codes() == ["DENIED"] else f"403 without DENIED: {result.body!r}"
    if result.codes() != ["UNAUTHORIZED"]:
        return f"401 without UNAUTHORIZED: {result.body!r}"
    scheme, params = challenge_params(result.headers.get("WWW-Authenticate", ""))
    if registry.mode == "basic":
        return None if scheme == "basic" and "realm" in params else f"bad challenge {params}"
    want = {
        "realm": f"{registry.url}/auth/token",
        "service": "regproxy",
        "scope": f"repository:{name}:{SCOPE_ACTIONS[action]}",
    }
    if scheme != "bearer" or {k: params.get(k) for k in want} != want:
        return f"challenge {params}, expected {want}"
    return None


@pytest.mark.parametrize("party", PARTIES)
@pytest.mark.parametrize("mode", MODES)
async def test_access_matrix(registry_factory: RegistryFactory, mode: str, party: str) -> None:
    registry = await registry_factory(mode)
    who = caller(party)
    column = PARTIES.index(party)
    got: dict[tuple[str, str], int] = {}
    want: dict[tuple[str, str], int] = {}
    problems = []
    for name in (*LOCAL_REPOS, PROXY_REPO):
        for action in ("pull", "push", "delete"):
            result = await attempt(registry, who, action, name)
            got[name, action] = result.status
            want[name, action] = EXPECTED[name][action][column]
            if result.status in (401, 403):
                problem = check_denial(registry, result, name, action)
                if problem:
                    problems.append(f"{action} {name}: {problem}")
            if result.status == 200 and action == "pull":
                assert result.body == registry.images[name].manifest
            if mode == "token" and party != "anonymous":
                # a user's token request always succeeds: what it grants is the question
                assert all(status == 200 for status, _ in result.token_requests), result
    assert got == want
    assert problems == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("proxy_pull", "expected"),
    [
        (["anonymous"], (200, 200, 200, 200)),
        (["@admins"], (401, 403, 403, 200)),
        (["bob"], (401, 403, 200, 403)),
        ([], (401, 403, 403, 403)),
    ],
)
async def test_proxy_pull_rule(
    registry_factory: RegistryFactory,
    mode: str,
    proxy_pull: list[str],
    expected: tuple[int, ...],
) -> None:
    """`[auth] proxy_pull` alone decides pulls through the cache; writes there never pass."""
    registry = await registry_factory(mode, auth={"proxy_pull": proxy_pull}, seed=False)
    got = []
    for party in PARTIES:
        result = await attempt(registry, caller(party), "pull", PROXY_REPO)
        got.append(result.status)
        push = await attempt(registry, caller(party), "push", PROXY_REPO)
        assert push.status == (401 if party == "anonymous" else 403)
    assert tuple(got) == expected


@pytest.mark.parametrize("mode", MODES)
async def test_version_check_needs_valid_credentials(
    registry_factory: RegistryFactory, mode: str
) -> None:
    registry = await registry_factory(mode, seed=False)
    client = registry.client
    async with client.get("/v2/") as resp:
        assert resp.status == 401
        scheme, params = challenge_params(resp.headers["WWW-Authenticate"])
        if mode == "token":
            assert scheme == "bearer"
            assert params == {"realm": f"{registry.url}/auth/token", "service": "regproxy"}
        else:
            assert scheme == "basic"
    for user, password in (("alice", "wrong"), ("nobody", "alice-secret"), ("alice", "")):
        result = await Caller(user, password).request(client, "basic", "GET", "/v2/")
        assert result.status == 401, (user, password)
        assert "WWW-Authenticate" in result.headers
        assert result.codes() == ["UNAUTHORIZED"]
    for bad in ("Basic !!!", "Basic " + "YWxpY2U=", "Digest abc", "Bearer"):
        async with client.get("/v2/", headers={"Authorization": bad}) as resp:
            assert resp.status == 401, bad
            assert "WWW-Authenticate" in resp.headers
    for party in ("alice", "root"):
        result = await Caller(party).request(client, mode, "GET", "/v2/")
        assert result.status == 200
    if mode == "token":
        # docker's first step: GET /v2/, then a token for it (no scope), then GET /v2/ again
        wrong = await Caller("alice", "wrong").request(client, mode, "GET", "/v2/")
        assert wrong.status == 401
        assert wrong.token_requests == [(401, "")]
        anonymous = await Caller(None).request(client, mode, "GET", "/v2/")
        assert anonymous.status == 200  # an anonymous token is a valid credential


@pytest.mark.parametrize("mode", MODES)
async def test_catalog_lists_only_what_the_caller_may_pull(
    registry_factory: RegistryFactory, mode: str
) -> None:
    registry = await registry_factory(mode)
    visible = {
        "alice": ["alice/app", "misc/app", "public/app"],
        "bob": ["misc/app", "public/app"],
        "root": ["alice/app", "misc/app", "public/app"],
    }
    for party, names in visible.items():
        result = await Caller(party).request(registry.client, mode, "GET", "/v2/_catalog")
        assert result.status == 200, result
        assert result.json() == {"repositories": names}, party
    anonymous = await Caller(None).request(registry.client, mode, "GET", "/v2/_catalog")
    if mode == "basic":
        assert anonymous.status == 401
    else:
        assert anonymous.status == 200
        assert anonymous.json() == {"repositories": ["public/app"]}


@pytest.mark.parametrize("mode", MODES)
async def test_upload_session_belongs_to_the_user_who_started_it(
    registry_factory: RegistryFactory, mode: str
) -> None:
    registry = await registry_factory(mode, seed=False)
    client = registry.client
    alice, bob, root = Caller("alice"), Caller("bob"), Caller("root")
    started = await alice.request(client, mode, "POST", "/v2/public/shared/blobs/uploads/")
    assert started.status == 202
    location = started.headers["Location"]
    data = b"x" * 100
    for other in (bob, root):
        for method, body, query in (
            ("GET", None, ""),
            ("PATCH", data, ""),
            ("PUT", data, f"?digest={sha256(data)}"),
            ("DELETE", None, ""),
        ):
            result = await other.request(client, mode, method, location + query, data=body)
            assert result.status == 404, (other.label, method, result)
            assert result.codes() == ["BLOB_UPLOAD_UNKNOWN"]
    anonymous = await Caller(None).request(client, mode, "GET", location)
    assert anonymous.status == 401
    patched = await alice.request(client, mode, "PATCH", location, data=data)
    assert patched.status == 202
    assert patched.headers["Range"] == "0-99"
    done = await alice.request(
        client, mode, "PUT", f"{patched.headers['Location']}?digest={sha256(data)}"
    )
    assert done.status == 201


@pytest.mark.parametrize("mode", MODES)
async def test_mount_from_a_repository_the_caller_cannot_read_falls_back(
    registry_factory: RegistryFactory, mode: str
) -> None:
    """bob cannot read alice/app: mounting from it is a plain 202 upload, never a 201."""
    registry = await registry_factory(mode)
    client = registry.client
    secret_blob = sha256(registry.images["alice/app"].layers[0])
    for user, expected in (("bob", 202), ("alice", 201), ("root", 201)):
        target = f"public/{user}"
        who = Caller(user)
        if mode == "token":
            # as docker asks: push on the target, pull on the source, in one token
            scopes = [f"repository:{target}:pull,push", "repository:alice/app:pull"]
            status, answer = await fetch_token(
                client, f"{registry.url}/auth/token", "regproxy", scopes, user
            )
            assert status == 200
            who = Caller(user, token=answer["token"])
        path = f"/v2/{target}/blobs/uploads/?mount={secret_blob}&from=alice/app"
        result = await who.request(client, mode, "POST", path)
        assert result.status == expected, (user, result)
        head = await who.request(client, mode, "HEAD", f"/v2/{target}/blobs/{secret_blob}")
        assert head.status == (200 if expected == 201 else 404), user
        if expected == 202:
            assert "/blobs/uploads/" in result.headers["Location"]


@pytest.mark.parametrize("mode", MODES)
async def test_upload_sessions_per_client_are_limited(
    registry_factory: RegistryFactory, mode: str
) -> None:
    registry = await registry_factory(mode, seed=False, server={"max_uploads_per_client": 2})
    client = registry.client
    alice, bob = Caller("alice"), Caller("bob")
    path = "/v2/public/many/blobs/uploads/"
    first = await alice.request(client, mode, "POST", path)
    second = await alice.request(client, mode, "POST", path)
    assert (first.status, second.status) == (202, 202)
    third = await alice.request(client, mode, "POST", path)
    assert third.status == 429
    assert third.codes() == ["TOOMANYREQUESTS"]
    assert (await bob.request(client, mode, "POST", path)).status == 202
    cancelled = await alice.request(client, mode, "DELETE", first.headers["Location"])
    assert cancelled.status == 204
    assert (await alice.request(client, mode, "POST", path)).status == 202
    # a finished upload frees its slot as well
    data = b"done"
    finished = await alice.request(
        client, mode, "PUT", f"{second.headers['Location']}?digest={sha256(data)}", data=data
    )
    assert finished.status == 201
    assert (await alice.request(client, mode, "POST", path)).status == 202
