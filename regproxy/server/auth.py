"""Authentication and authorisation at the HTTP edge: challenges, the token endpoint, checks.

Every route's handler is mapped to the action it needs (`pull`, `push`,
`delete`, or a special kind); one middleware identifies the caller (Basic
credentials or a bearer token), asks the `Policy`, and answers 401 with a
challenge (anonymous, or a token lacking the scope) or 403 `DENIED`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from regproxy.access.htpasswd import Htpasswd
from regproxy.access.policy import Policy
from regproxy.access.throttle import FailureThrottle
from regproxy.access.tokens import Grant, TokenSigner
from regproxy.config import Config
from regproxy.errors import Denied, RegistryError, TooManyRequests, Unauthorized
from regproxy.reference import ProxyName, under_prefix
from regproxy.server.keys import CONFIG, MAY, USER
from regproxy.server.names import resolve
from regproxy.server.peer import client_address
from regproxy.storage.aio import Offload

TOKEN_PATH = "/auth/token"
#: a scope that can go into the challenge as it is: printable ASCII without space, `"` or `\`
#: (a name with CR/LF or quotes is invalid anyway; it must not break the header)
_HEADER_SAFE = re.compile(r"[!#-\[\]-~]+")
#: route handler → (kind of check per HTTP method); filled by app.py
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Identity:
    user: str | None
    grant: Grant | None = None  # a bearer token's grant


#: bcrypt checks run on their own small pool, never on the storage threads: a flood of
#: wrong passwords must not delay a push. Checks beyond `MAX_PENDING_CHECKS` waiting at
#: once are refused (429) instead of queued without end.
PASSWORD_THREADS = 2
MAX_PENDING_CHECKS = 16


class Authenticator:
    """Everything auth needs for one app: users, policy, token signer, sign-in limits."""

    def __init__(self, config: Config) -> None:
        auth = config.auth
        assert auth.htpasswd is not None
        self.config = config
        self.mode = auth.mode
        self.service = auth.service
        self.htpasswd = Htpasswd(auth.htpasswd)
        self.policy = Policy(auth, config.proxy.prefix)
        self.signer = TokenSigner(auth.signing_key(), auth.service, auth.token_ttl)
        self.actions: dict[tuple[Handler, str], str] = {}
        self.throttle = FailureThrottle()
        self.hashing = Offload(PASSWORD_THREADS, "regproxy-bcrypt")
        self.pending_checks = 0

    def requires(self, handler: Handler, method: str, kind: str) -> None:
        self.actions[(handler, method)] = kind
        if method == "GET":
            self.actions[(handler, "HEAD")] = kind

    def close(self) -> None:
        self.hashing.close()

    # ---- identifying the caller ---------------------------------------------------------

    async def check_password(self, request: web.Request, user: str, password: str) -> bool:
        """Whether the password is right: remembered checks at once, others on the bcrypt
        pool, bounded overall and per client (429 when over either limit)."""
        if self.htpasswd.cached(user, password):
            return True
        client = client_address(request)
        wait = self.throttle.retry_after(client)
        if wait > 0:
            raise TooManyRequests(
                "too many failed sign-ins from this address",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        if self.pending_checks >= MAX_PENDING_CHECKS:
            raise TooManyRequests("too many sign-ins at once", headers={"Retry-After": "1"})
        self.pending_checks += 1
        try:
            ok = await self.hashing.run(self.htpasswd.check, user, password)
        finally:
            self.pending_checks -= 1
        if not ok:
            self.throttle.failed(client)
        return ok

    async def basic_user(self, request: web.Request, value: str) -> str:
        try:
            if not value.isascii():  # base64 is ASCII; anything else is no credential
                raise ValueError
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, ValueError):
            raise self.challenge(request, None, "malformed Basic credentials") from None
        user, sep, password = decoded.partition(":")
        if not sep or not await self.check_password(request, user, password):
            raise self.challenge(request, None, "invalid username or password")
        return user

    async def identify(self, request: web.Request) -> Identity:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if not header:
            return Identity(None)
        if scheme == "basic":
            return Identity(await self.basic_user(request, value.strip()))
        if scheme == "bearer" and self.mode == "token":
            grant = self.signer.verify(value.strip())
            if grant is None or not self.still_valid(grant):
                raise self.challenge(request, None, "invalid or expired token", "invalid_token")
            return Identity(grant.subject, grant)
        raise self.challenge(request, None, "unsupported authorization scheme")

    def still_valid(self, grant: Grant) -> bool:
        """A user's token dies with their password entry (removed, or the password changed)."""
        return grant.subject is None or grant.stamp == self.htpasswd.stamp(grant.subject)

    # ---- answers ------------------------------------------------------------------------

    def base_url(self, request: web.Request) -> str:
        scheme, host = request.scheme, request.host
        if self.config.server.trust_forwarded_headers:
            scheme = request.headers.get("X-Forwarded-Proto", scheme).split(",")[0].strip()
            host = request.headers.get("X-Forwarded-Host", host).split(",")[0].strip()
        return f"{scheme}://{host}"

    def challenge(
        self,
        request: web.Request,
        scope: str | None,
        message: str = "authentication required",
        error: str | None = None,
    ) -> RegistryError:
        if self.mode == "basic":
            header = f'Basic realm="{self.service}"'
        else:
            realm = self.base_url(request)
            if not _HEADER_SAFE.fullmatch(realm.replace(" ", "")):
                realm = f"{request.scheme}://{request.host}"
            header = f'Bearer realm="{realm}{TOKEN_PATH}",service="{self.service}"'
            if scope and _HEADER_SAFE.fullmatch(scope):
                header += f',scope="{scope}"'
            if error:
                header += f',error="{error}"'
        return Unauthorized(message, headers={"WWW-Authenticate": header})

    # ---- the decision -------------------------------------------------------------------

    def may(self, identity: Identity, action: str, name: str, proxied: bool) -> bool:
        if not self.policy.allows(identity.user, action, name, proxied):
            return False
        return identity.grant is None or identity.grant.permits(name, action)

    async def authorise(self, request: web.Request, kind: str) -> None:
        identity = await self.identify(request)
        request[USER] = identity.user

        def may(action: str, name: str) -> bool:
            return self.may(identity, action, name, False)

        request[MAY] = may
        if kind in ("base", "catalog"):
            if identity.user is None and identity.grant is None:
                raise self.challenge(request, None)
            if kind == "catalog":
                # a catalog token has no repository scopes: list what the rules let them pull
                user = identity.user
                request[MAY] = lambda action, name: self.policy.allows(user, action, name)
            return
        name = request.match_info.get("name", "")
        try:
            # the very target the handler will route by (names.resolve remembers it)
            proxied = isinstance(await resolve(request, write=kind != "pull"), ProxyName)
        except RegistryError:
            # a request no route can serve: the handler answers with this same error,
            # once the caller has passed the checks its name calls for
            proxied = under_prefix(name, self.config.proxy.prefix)
        if self.policy.allows(identity.user, kind, name, proxied):
            if identity.grant is None or identity.grant.permits(name, kind):
                return
            scope = f"repository:{name}:{'pull,push' if kind == 'push' else kind}"
            raise self.challenge(request, scope, "token does not grant this", "insufficient_scope")
        if identity.user is None:
            scope = f"repository:{name}:{'pull,push' if kind == 'push' else kind}"
            raise self.challenge(request, scope)
        raise Denied(f"{identity.user} may not {kind} {name}")


AUTH = web.AppKey("authenticator", Authenticator)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    auth = request.app.get(AUTH)
    if auth is not None:
        kind = auth.actions.get((request.match_info.handler, request.method))
        if kind is not None:
            await auth.authorise(request, kind)
    return await handler(request)


def _scopes(request: web.Request, posted: list[str]) -> list[tuple[str, list[str]]]:
    """`repository:<name>:<actions>` scopes of a token request (repeated or space-separated),
    from the query and, for the OAuth2 POST form, from the body (`posted`)."""
    found = []
    for raw in [*request.query.getall("scope", []), *posted]:
        for scope in raw.split(" "):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and name:
                found.append((name, [a for a in actions.split(",") if a]))
    return found


async def token_endpoint(request: web.Request) -> web.Response:
    """Issue a token for the granted part of the requested scopes (Basic credentials or none)."""
    auth = request.app[AUTH]
    user: str | None = None
    header = request.headers.get("Authorization", "")
    posted: list[str] = []
    if request.method == "POST":
        try:  # a form that stalls is cut off like any request body (slow clients)
            async with asyncio.timeout(request.app[CONFIG].server.body_timeout):
                form = await request.post()
        except TimeoutError:
            if request.transport is not None:
                request.transport.close()
            raise Unauthorized("the token request form did not arrive in time") from None
        except (ValueError, LookupError, HttpProcessingError):
            # a broken urlencoded or multipart body (aiohttp's parser errors), a bad charset
            raise Unauthorized("malformed token request form") from None
        posted = [str(scope) for scope in form.getall("scope", [])]
        if form.get("grant_type") == "password":
            username, password = str(form.get("username", "")), str(form.get("password", ""))
            if not await auth.check_password(request, username, password):
                raise Unauthorized("invalid username or password")
            user = username
        elif form.get("grant_type") not in (None, ""):
            raise Unauthorized("unsupported grant type")
    elif header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            raise Unauthorized("the token endpoint takes Basic credentials")
        try:
            user = await auth.basic_user(request, value.strip())
        except Unauthorized:
            raise Unauthorized("invalid username or password") from None
    prefix = request.app[CONFIG].proxy.prefix
    access: dict[str, list[str]] = {}
    for name, wanted in _scopes(request, posted):
        proxied = under_prefix(name, prefix)
        granted = auth.policy.granted(user, name, wanted, proxied)
        if granted:
            access.setdefault(name, [])
            access[name] = sorted(set(access[name]) | set(granted))
    stamp = None if user is None else auth.htpasswd.stamp(user)
    token, lifetime = auth.signer.issue(user, access, stamp=stamp)
    issued = datetime.fromtimestamp(time.time(), timezone.utc).isoformat()
    return web.json_response(
        {"token": token, "access_token": token, "expires_in": lifetime, "issued_at": issued}
    )
