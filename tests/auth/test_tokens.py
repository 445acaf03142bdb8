"""The built-in token endpoint and what the registry makes of the tokens it signs.

Refused: expired tokens, wrong passwords, tampered tokens (payload or signature),
tokens for another scope (`insufficient_scope`), for another service or signed
with another key. An anonymous token grants only what anonymous may do.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from tests.support.auth import (
    Registry,
    RegistryFactory,
    challenge_params,
    fetch_token,
    token_claims,
)
from tests.support.digests import sha256

PULL_ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


async def token_for(
    registry: Registry, scopes: list[str], user: str | None = None, password: str | None = None
) -> str:
    status, answer = await fetch_token(
        registry.client, f"{registry.url}/auth/token", "regproxy", scopes, user, password
    )
    assert status == 200, answer
    return answer["token"]


async def status_with(
    registry: Registry, token: str, method: str, path: str, data: bytes | None = None
) -> tuple[int, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}", **PULL_ACCEPT}
    async with registry.client.request(method, path, headers=headers, data=data) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


def assert_invalid_token(
    status: int, headers: dict[str, str], error: str = "invalid_token"
) -> None:
    assert status == 401
    scheme, params = challenge_params(headers["WWW-Authenticate"])
    assert scheme == "bearer"
    assert params.get("error") == error, params


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_token_response_and_grants(registry_factory: RegistryFactory) -> None:
    registry = await registry_factory(auth={"token_ttl": "2m"})
    status, answer = await fetch_token(
        registry.client,
        f"{registry.url}/auth/token",
        "regproxy",
        ["repository:alice/app:pull,push,delete", "repository:public/app:pull,push,delete"],
        "alice",
    )
    assert status == 200
    assert answer["token"] == answer["access_token"]
    assert answer["expires_in"] == 120
    assert "issued_at" in answer
    claims = token_claims(answer["token"])
    assert claims["sub"] == "alice"
    assert claims["aud"] == "regproxy"
    assert claims["exp"] - claims["iat"] == 120
    granted = {entry["name"]: entry["actions"] for entry in claims["access"]}
    # public/*: delete is for @admins only
    assert granted == {"alice/app": ["delete", "pull", "push"], "public/app": ["pull", "push"]}
    status, _ = await status_with(registry, answer["token"], "GET", "/v2/alice/app/manifests/v1")
    assert status == 200


async def test_token_expires(registry_factory: RegistryFactory) -> None:
    registry = await registry_factory(auth={"token_ttl": "1s"})
    token = await token_for(registry, ["repository:alice/app:pull"], "alice")
    assert token_claims(token)["exp"] - token_claims(token)["iat"] == 1
    assert (await status_with(registry, token, "GET", "/v2/alice/app/manifests/v1"))[0] == 200
    await asyncio.sleep(1.1)  # exp is whole seconds: at most 1 s after issue
    assert_invalid_token(*await status_with(registry, token, "GET", "/v2/alice/app/manifests/v1"))
    assert_invalid_token(*await status_with(registry, token, "GET", "/v2/"))


async def test_wrong_password_at_the_token_endpoint(registry_factory: RegistryFactory) -> None:
    registry = await registry_factory(seed=False)
    realm = f"{registry.url}/auth/token"
    for user, password in (("alice", "wrong"), ("alice", ""), ("nobody", "x"), ("root", "ROOT")):
        status, _ = await fetch_token(
            registry.client, realm, "regproxy", ["repository:alice/app:pull"], user, password
        )
        assert status == 401, (user, password)
    for header in ("Basic %%%", "Bearer abc", "Basic " + _b64(b"no-colon")):
        async with registry.client.session.get(realm, headers={"Authorization": header}) as resp:
            assert resp.status == 401, header
            assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"


async def test_password_grant_by_post_form(registry_factory: RegistryFactory) -> None:
    """The OAuth2 form (containerd posts it when it has credentials): scope in the body."""
    registry = await registry_factory()
    realm = f"{registry.url}/auth/token"
    form = {
        "grant_type": "password",
        "service": "regproxy",
        "client_id": "containerd-client",
        "username": "alice",
        "password": "alice-secret",
        "scope": "repository:alice/app:pull,push repository:misc/app:pull",
    }
    async with registry.client.session.post(realm, data=form) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    token = answer["access_token"]
    granted = {e["name"]: e["actions"] for e in token_claims(token)["access"]}
    assert granted == {"alice/app": ["pull", "push"], "misc/app": ["pull"]}
    assert token_claims(token)["sub"] == "alice"
    blob = b"posted"
    push = f"/v2/alice/app/blobs/uploads/?digest={sha256(blob)}"
    assert (await status_with(registry, token, "POST", push, blob))[0] == 201

    async with registry.client.session.post(realm, data={**form, "password": "no"}) as resp:
        assert resp.status == 401
    refresh = {"grant_type": "refresh_token", "refresh_token": "x", "service": "regproxy"}
    async with registry.client.session.post(realm, data=refresh) as resp:
        assert resp.status == 401


async def test_tampered_tokens_are_refused(registry_factory: RegistryFactory) -> None:
    registry = await registry_factory()
    token = await token_for(registry, ["repository:alice/app:pull"], "bob")
    header, payload, signature = token.split(".")
    claims = token_claims(token)
    assert claims["access"] == []  # bob may not pull alice/app: nothing granted

    forged = dict(claims, sub="alice", access=[
        {"type": "repository", "name": "alice/app", "actions": ["pull", "push"]}
    ])  # fmt: skip
    forged_payload = _b64(json.dumps(forged, separators=(",", ":")).encode())
    flipped_payload = payload[:10] + ("A" if payload[10] != "A" else "B") + payload[11:]
    flipped_signature = signature[:-3] + ("A" if signature[-3] != "A" else "B") + signature[-2:]
    none_header = _b64(b'{"alg":"none","typ":"JWT"}')
    tampered = {
        "forged claims": f"{header}.{forged_payload}.{signature}",
        "flipped payload byte": f"{header}.{flipped_payload}.{signature}",
        "flipped signature byte": f"{header}.{payload}.{flipped_signature}",
        "no signature": f"{header}.{payload}.",
        "alg none": f"{none_header}.{forged_payload}.",
        "two parts": f"{header}.{payload}",
        "garbage": "not-a-token",
        "non-ascii": f"{header}.{payload}.{signature[:-1]}é",
    }
    for what, bad in tampered.items():
        status, headers = await status_with(registry, bad, "GET", "/v2/alice/app/manifests/v1")
        assert status == 401, what
        assert_invalid_token(status, headers)
    # the genuine token is valid, it just grants nothing there: bob is denied, not challenged
    assert (await status_with(registry, token, "GET", "/v2/alice/app/manifests/v1"))[0] == 403


async def test_token_for_another_scope(registry_factory: RegistryFactory) -> None:
    registry = await registry_factory()
    token = await token_for(registry, ["repository:alice/app:pull"], "alice")
    cases = [
        ("GET", "/v2/misc/app/manifests/v1", "repository:misc/app:pull"),
        ("POST", "/v2/alice/app/blobs/uploads/", "repository:alice/app:pull,push"),
        ("DELETE", "/v2/alice/app/manifests/d", "repository:alice/app:delete"),
        ("GET", "/v2/alice/app2/manifests/v1", "repository:alice/app2:pull"),
    ]
    for method, path, scope in cases:
        status, headers = await status_with(registry, token, method, path)
        assert_invalid_token(status, headers, "insufficient_scope")
        assert challenge_params(headers["WWW-Authenticate"])[1]["scope"] == scope
    assert (await status_with(registry, token, "GET", "/v2/alice/app/manifests/v1"))[0] == 200


async def test_token_for_another_service_or_key(
    registry_factory: RegistryFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RP_TEST_KEY_ONE", "one key for two servers")
    monkeypatch.setenv("RP_TEST_KEY_TWO", "another key")
    first = await registry_factory(auth={"signing_key_env": "RP_TEST_KEY_ONE"})
    # a restarted server or a second replica: the same key and the same htpasswd file
    shared = {"signing_key_env": "RP_TEST_KEY_ONE", "htpasswd": str(first.config.auth.htpasswd)}
    same = await registry_factory(auth=shared)
    other_service = await registry_factory(
        auth={"signing_key_env": "RP_TEST_KEY_ONE", "service": "elsewhere"}
    )
    other_key = await registry_factory(auth={"signing_key_env": "RP_TEST_KEY_TWO"})
    random_key = await registry_factory()  # no key configured: a random one
    token = await token_for(first, ["repository:alice/app:pull"], "alice")
    path = "/v2/alice/app/manifests/v1"
    assert (await status_with(first, token, "GET", path))[0] == 200
    # the same key and service: a restarted server (or a second replica) honours it
    assert (await status_with(same, token, "GET", path))[0] == 200
    for registry in (other_service, other_key, random_key):
        assert_invalid_token(*await status_with(registry, token, "GET", path))
    _, params = challenge_params(
        (await status_with(other_service, token, "GET", path))[1]["WWW-Authenticate"]
    )
    assert params["service"] == "elsewhere"


async def test_anonymous_token_grants_only_anonymous_actions(
    registry_factory: RegistryFactory,
) -> None:
    registry = await registry_factory()
    token = await token_for(
        registry,
        [
            "repository:public/app:pull,push,delete",
            "repository:alice/app:pull",
            "repository:misc/app:pull",
            "repository:p/up/lib/app:pull",
        ],
    )
    claims = token_claims(token)
    assert claims["sub"] == ""
    assert claims["access"] == [{"type": "repository", "name": "public/app", "actions": ["pull"]}]
    assert (await status_with(registry, token, "GET", "/v2/public/app/manifests/v1"))[0] == 200
    for method, path in (
        ("POST", "/v2/public/app/blobs/uploads/"),
        ("DELETE", "/v2/public/app/manifests/d"),
        ("GET", "/v2/alice/app/manifests/v1"),
        ("GET", "/v2/p/up/lib/app/manifests/v1"),
    ):
        status, headers = await status_with(registry, token, method, path)
        assert status == 401, (method, path)
        assert "WWW-Authenticate" in headers


async def test_bearer_tokens_are_refused_in_basic_mode(registry_factory: RegistryFactory) -> None:
    token_registry = await registry_factory("token", seed=False)
    basic_registry = await registry_factory("basic", seed=False)
    token = await token_for(token_registry, [], "alice")
    status, headers = await status_with(basic_registry, token, "GET", "/v2/")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Basic ")


async def test_malformed_token_forms_are_refused_not_errors(
    registry_factory: RegistryFactory,
) -> None:
    registry = await registry_factory(seed=False)
    cases = [
        ("multipart/form-data; boundary=x", b"not multipart"),
        ("multipart/form-data", b"no boundary"),
        ("application/x-www-form-urlencoded; charset=no-such-charset", b"grant_type=password"),
        ("application/x-www-form-urlencoded", b"\xff\xfe=1"),
    ]
    for content_type, body in cases:
        async with registry.client.post(
            "/auth/token", data=body, headers={"Content-Type": content_type}
        ) as resp:
            assert resp.status == 401, (content_type, await resp.text())
            assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"
