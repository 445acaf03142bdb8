"""One HTTP client per upstream registry: token challenge flow, redirects, timeouts.

Credentials go only to the upstream's own host: a redirect to another host
(Docker Hub's CDN) is followed without the Authorization header, and the
redirect target is never cached.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp

from regproxy.aiohttp_adapter import take_response_body
from regproxy.config import Secret, UpstreamConfig
from regproxy.manifest import ACCEPT_ALL
from regproxy.sockbody import TakenBody, direct_length

log = logging.getLogger("regproxy.upstream")

_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
MAX_REDIRECTS = 5
TOKEN_MARGIN = 10.0
#: manifests, tags, HEADs and tokens: a stalled upstream must not hold a pull for long
SMALL_TIMEOUT = aiohttp.ClientTimeout(total=20, sock_connect=10)


class UpstreamError(Exception):
    """The upstream could not answer: unreachable, 5xx, 429, auth refused, or bad data."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def denied(self) -> bool:
        return self.status in (401, 403)


@dataclass(slots=True)
class UpstreamState:
    """What the newest outcome said about an upstream: /readyz reports it.

    Written where requests complete (`Upstream.request`) and by the readiness probe;
    the newest event wins, so a recovered upstream reads reachable again at once.
    """

    last_ok: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    #: the newest `ratelimit-remaining` header (Docker Hub: `76;w=21600`), and when it came
    ratelimit_remaining: str | None = None
    ratelimit_at: float | None = None

    def succeeded(self) -> None:
        self.last_ok = time.time()

    def failed(self, reason: str) -> None:
        self.last_error, self.last_error_at = reason, time.time()

    def record(self, status: int | None, error: UpstreamError | None) -> None:
        """One request's outcome: a transport error, 429 and 5xx are failures."""
        if error is not None:
            self.failed(str(error))
        elif status is not None and (status == 429 or status >= 500):
            self.failed(f"HTTP {status}")
        else:
            self.succeeded()

    @property
    def checked_at(self) -> float | None:
        """When anything was last learned (None: never)."""
        times = [t for t in (self.last_ok, self.last_error_at) if t is not None]
        return max(times) if times else None

    @property
    def reachable(self) -> bool | None:
        """Whether the newest outcome was a success (None: nothing known yet)."""
        if self.checked_at is None:
            return None
        return (self.last_ok or 0.0) >= (self.last_error_at or 0.0)


class UpstreamObserver(Protocol):
    """Told the outcome of every upstream request: latency, status or error (metrics)."""

    def observe(
        self, upstream: str, seconds: float, status: int | None, error: UpstreamError | None
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """Parse `WWW-Authenticate: Bearer realm="…",service="…",scope="…"` (or Basic)."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return Challenge(scheme.lower(), params)


@dataclass(slots=True)
class _Token:
    value: str
    expires: float


class Upstream:
    """A configured upstream registry; one aiohttp session shared by all its requests."""

    def __init__(self, name: str, config: UpstreamConfig, session: aiohttp.ClientSession) -> None:
        self.name = name
        self.config = config
        self.base = config.url.rstrip("/")
        self._host = urlsplit(self.base).netloc
        self._session = session
        self._username = config.username
        self._password: Secret | None = config.resolved_password()
        self._tokens: dict[str, _Token] = {}
        self._token_locks: dict[str, asyncio.Lock] = {}
        self._basic = False  # the upstream asked for Basic auth
        self.requests = 0  # requests sent (for metrics and tests)
        self.state = UpstreamState()
        self.observer: UpstreamObserver | None = None

    # ---- authentication ----------------------------------------------------------------

    def _basic_header(self) -> str | None:
        if self._username is None or self._password is None:
            return None
        raw = f"{self._username}:{self._password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _auth_header(self, scope: str) -> str | None:
        token = self._tokens.get(scope)
        if token is not None and token.expires > time.monotonic():
            return f"Bearer {token.value}"
        if self._basic:
            return self._basic_header()
        return None

    async def _fetch_token(self, challenge: Challenge, scope: str) -> None:
        realm = challenge.params.get("realm")
        if not realm:
            raise UpstreamError(f"{self.name}: Bearer challenge without a realm", 401)
        query = {"scope": challenge.params.get("scope") or scope}
        if challenge.params.get("service"):
            query["service"] = challenge.params["service"]
        headers = {}
        basic = self._basic_header()
        if basic:
            headers["Authorization"] = basic
        url = f"{realm}{'&' if '?' in realm else '?'}{urlencode(query)}"
        self.requests += 1
        try:
            async with self._session.get(
                url, headers=headers, allow_redirects=True, timeout=SMALL_TIMEOUT
            ) as resp:
                if resp.status != 200:
                    raise UpstreamError(f"{self.name}: token endpoint answered {resp.status}", 401)
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise UpstreamError(f"token request failed: {_describe(exc)}") from None
        value = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise UpstreamError(f"{self.name}: token endpoint returned no token", 401)
        lifetime = body.get("expires_in") if isinstance(body.get("expires_in"), int) else 60
        self._tokens[scope] = _Token(value, time.monotonic() + max(lifetime - TOKEN_MARGIN, 1))

    async def _authenticate(self, header: str, scope: str, sent: str | None) -> bool:
        """React to a 401: fetch a token (once for concurrent callers) or switch to Basic."""
        challenge = parse_challenge(header)
        if challenge is None:
            return False
        if challenge.scheme == "basic":
            if self._basic or self._basic_header() is None:
                return False
            self._basic = True
            return True
        if challenge.scheme != "bearer":
            return False
        lock = self._token_locks.setdefault(scope, asyncio.Lock())
        async with lock:
            if self._auth_header(scope) not in (None, sent):
                return True  # another request renewed the token meanwhile
            self._tokens.pop(scope, None)
            await self._fetch_token(challenge, scope)
        return True

    # ---- requests ----------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        scope: str,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        small: bool = True,
    ) -> aiohttp.ClientResponse:
        """Send a request, answering one auth challenge and following redirects.

        `small` requests (manifests, tags, HEADs) must complete within
        `SMALL_TIMEOUT`; blob bodies may stream for as long as data keeps coming.

        The caller must release the response. Raises `UpstreamError` on transport
        errors; HTTP error statuses are returned for the caller to judge. Each outcome
        is recorded in `state` and reported to `observer` (metrics), when one is set.
        """
        started = time.perf_counter()
        try:
            resp = await self._request(method, path, scope, headers, params, small)
        except UpstreamError as exc:
            self._completed(started, None, exc)
            raise
        self._completed(started, resp.status, None)
        remaining = resp.headers.get("ratelimit-remaining")
        if remaining is not None:  # Docker Hub's pull quota, shown on the web page
            self.state.ratelimit_remaining, self.state.ratelimit_at = remaining[:64], time.time()
        return resp

    def _completed(self, started: float, status: int | None, error: UpstreamError | None) -> None:
        self.state.record(status, error)
        if self.observer is not None:
            self.observer.observe(self.name, time.perf_counter() - started, status, error)

    async def _request(
        self,
        method: str,
        path: str,
        scope: str,
        headers: dict[str, str] | None,
        params: dict[str, str] | None,
        small: bool,
    ) -> aiohttp.ClientResponse:
        url = self.base + path
        for attempt in range(2):
            sent = self._auth_header(scope)
            hdrs = dict(headers or {})
            if sent:
                hdrs["Authorization"] = sent
            resp = await self._send(method, url, hdrs, params, small)
            if resp.status != 401 or attempt == 1:
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.release()
            if not await self._authenticate(challenge, scope, sent):
                raise UpstreamError(f"{self.name}: authentication refused", 401)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        params: dict[str, str] | None,
        small: bool,
    ) -> aiohttp.ClientResponse:
        for _ in range(MAX_REDIRECTS + 1):
            self.requests += 1
            try:
                resp = await self._session.request(
                    method,
                    url,
                    headers=headers,
                    params=params,
                    allow_redirects=False,
                    # the session's own timeout is what passing none at all means
                    timeout=SMALL_TIMEOUT if small else self._session.timeout,
                )
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise UpstreamError(f"{method} {urlsplit(url).path}: {_describe(exc)}") from None
            if resp.status not in (301, 302, 303, 307, 308) or "Location" not in resp.headers:
                return resp
            target = urljoin(url, resp.headers["Location"])
            resp.release()
            if urlsplit(target).netloc != self._host:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url, params = target, None
            if method not in ("GET", "HEAD"):
                method = "GET"
        raise UpstreamError(f"{self.name}: too many redirects")

    @staticmethod
    def scope(remote: str) -> str:
        return f"repository:{remote}:pull"

    async def manifest(
        self, remote: str, reference: str, method: str = "GET", accept: str = ACCEPT_ALL
    ) -> aiohttp.ClientResponse:
        return await self.request(
            method,
            f"/v2/{remote}/manifests/{reference}",
            self.scope(remote),
            headers={"Accept": accept},
        )

    async def blob(self, remote: str, digest: str) -> aiohttp.ClientResponse:
        return await self.request(
            "GET", f"/v2/{remote}/blobs/{digest}", self.scope(remote), small=False
        )

    @staticmethod
    def take_body(resp: aiohttp.ClientResponse) -> TakenBody | None:
        """A blob body taken from aiohttp for `sockbody.pump` (large, Content-Length, no
        content coding, plain TCP), else None. The caller must then `close()` the
        response: its connection cannot go back to the pool."""
        length = direct_length(resp.content_length, resp.headers)
        if length is None:
            return None
        return take_response_body(resp, length)

    async def get_json(
        self, path: str, remote: str, params: dict[str, str] | None = None
    ) -> tuple[Any, dict[str, str]]:
        """A small JSON document (tags, referrers) and the response headers."""
        resp = await self.request("GET", path, self.scope(remote), params=params)
        try:
            if resp.status != 200:
                raise UpstreamError(f"GET {path} answered {resp.status}", resp.status)
            try:
                return await resp.json(content_type=None), dict(resp.headers)
            except (aiohttp.ClientError, ValueError, asyncio.TimeoutError) as exc:
                raise UpstreamError(f"bad JSON from {path}: {_describe(exc)}") from None
        finally:
            resp.release()


def _describe(exc: BaseException) -> str:
    """A short reason for logs and error messages (aiohttp reprs are long)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    return str(exc) or type(exc).__name__


def client_timeout() -> aiohttp.ClientTimeout:
    """Connect quickly or fail; never wait forever for a stalled body."""
    return aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10, sock_read=60)
