"""Users, rules and a client that speaks the Docker token flow, for the access-control tests.

`auth_config(...)` builds an `[auth]` table over an htpasswd file of bcrypt entries
(cost 4: bcrypt's minimum, so tests stay fast). `Caller` is one party (anonymous or a
user) and does what a registry client does: try the request, and on a Bearer
challenge fetch a token from the realm (Basic credentials, or none) for the
challenged scope and try once more.

`Registry` and `RegistryFactory` describe what the `registry_factory` fixture of
tests/auth starts: an authenticating regproxy holding `LOCAL_REPOS`, whose proxy
upstream `up` (an open regproxy) holds `lib/app:v1`.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import bcrypt
from aiohttp.test_utils import TestClient

from regproxy.config import Config

from .oci import Image, push_image

PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret", "root": "root-secret"}
GROUPS = {"admins": ["root"]}

#: first match wins; `misc/*` matches no rule (the default: authenticated users only)
RULES: list[dict[str, Any]] = [
    {"repository": "public/*", "pull": ["anonymous"], "push": ["@authenticated"],
     "delete": ["@admins"]},
    {"repository": "alice/*", "pull": ["alice", "@admins"], "push": ["alice"],
     "delete": ["alice", "@admins"]},
]  # fmt: skip

LOCAL_REPOS = ("public/app", "alice/app", "misc/app")
PROXY_REPO = "p/up/lib/app"
#: who may push each local repository in the setup
SEEDER = {"public/app": "alice", "alice/app": "alice", "misc/app": "bob"}

_PARAM = re.compile(r'(\w+)="([^"]*)"')


def write_htpasswd(path: Path, users: dict[str, str] | None = None) -> Path:
    users = PASSWORDS if users is None else users
    lines = [
        f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}"
        for user, password in users.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by the regproxy tests\n" + "\n".join(lines) + "\n")
    return path


def auth_config(
    tmp_path: Path, mode: str = "token", rules: list[dict[str, Any]] | None = None, **extra: Any
) -> dict[str, Any]:
    """An `[auth]` table (for `make_config(auth=...)`) with the test users and rules."""
    htpasswd = write_htpasswd(tmp_path / "htpasswd")
    return {
        "htpasswd": str(htpasswd),
        "mode": mode,
        "groups": GROUPS,
        "rules": RULES if rules is None else rules,
        **extra,
    }


def basic(user: str, password: str | None = None) -> str:
    secret = PASSWORDS[user] if password is None else password
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


def auth_header(user: str) -> dict[str, str]:
    """A test user's Basic credentials, as the header to send."""
    return {"Authorization": basic(user)}


async def push_image_as(
    client: TestClient, name: str, image: Image, tags: tuple[str, ...], user: str | None
) -> None:
    """Push `image` under `tags` with `user`'s Basic credentials (accepted in both modes);
    `None` pushes anonymously."""
    await push_image(client, name, image, *tags, headers=auth_header(user) if user else None)


def challenge_params(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="…",service="…"` → ("bearer", {realm, service, …})."""
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(_PARAM.findall(rest))


def token_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@dataclass
class Result:
    status: int
    headers: dict[str, str]
    body: bytes
    #: the token requests made on the way (status, scope)
    token_requests: list[tuple[int, str]] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)

    def codes(self) -> list[str]:
        try:
            return [entry["code"] for entry in self.json()["errors"]]
        except (ValueError, KeyError, TypeError):
            return []


async def fetch_token(
    client: TestClient,
    realm: str,
    service: str,
    scopes: list[str],
    user: str | None = None,
    password: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """GET the token endpoint like docker does: Basic credentials (or none), `scope=`."""
    params = [("service", service)] + [("scope", scope) for scope in scopes]
    headers = {"Authorization": basic(user, password)} if user else {}
    async with client.session.get(realm, params=params, headers=headers) as resp:
        body = await resp.read()
        return resp.status, (json.loads(body) if resp.status == 200 else {})


@dataclass
class Caller:
    """One party: `user` None is anonymous."""

    user: str | None
    password: str | None = None  # default: the user's right password
    token: str | None = None  # a bearer token to start with

    @property
    def label(self) -> str:
        return self.user or "anonymous"

    async def request(
        self,
        client: TestClient,
        mode: str,
        method: str,
        path: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Result:
        """Send the request the way a client would under `mode` ("token" or "basic")."""
        headers = dict(headers or {})
        if mode == "basic" and self.user:
            headers["Authorization"] = basic(self.user, self.password)
        elif self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        result = await _send(client, method, path, data, headers)
        if mode != "token" or result.status != 401:
            return result
        scheme, params = challenge_params(result.headers.get("WWW-Authenticate", ""))
        if scheme != "bearer":
            return result
        scopes = [params["scope"]] if "scope" in params else []
        status, answer = await fetch_token(
            client, params["realm"], params["service"], scopes, self.user, self.password
        )
        if status != 200:
            result.token_requests.append((status, " ".join(scopes)))
            return result
        headers["Authorization"] = f"Bearer {answer['token']}"
        retried = await _send(client, method, path, data, headers)
        retried.token_requests = [*result.token_requests, (status, " ".join(scopes))]
        return retried


async def _send(
    client: TestClient, method: str, path: str, data: bytes | None, headers: dict[str, str]
) -> Result:
    async with client.request(method, path, data=data, headers=headers) as resp:
        body = await resp.read()
        return Result(resp.status, dict(resp.headers), body)


@dataclass
class Registry:
    """An authenticating regproxy, its configuration and its upstream."""

    client: TestClient
    config: Config
    mode: str
    upstream: TestClient
    images: dict[str, Image]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client.port}"


class RegistryFactory(Protocol):
    """The `registry_factory` fixture: `mode`, `[auth]` keys, seeding, top-level keys."""

    def __call__(
        self,
        mode: str = "token",
        auth: dict[str, Any] | None = None,
        seed: bool = True,
        **top: Any,
    ) -> Awaitable[Registry]: ...
