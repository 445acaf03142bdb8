"""One HTTP client per upstream registry: token challenge flow, redirects, timeouts,
forward proxies and TLS trust.

Credentials go only to the upstream's own host: a redirect to another host
(Docker Hub's CDN) is followed without the Authorization header, and the
redirect target is never cached.

Forward proxy: every request made for an upstream (the registry, its token realm,
each redirect hop, the /readyz probe) picks its proxy by its own URL. With the
upstream's `proxy` set, that proxy carries them all; otherwise `ProxyRules` from the
environment as curl reads it: `https_proxy` for https:// URLs (tunnelled with
CONNECT), `http_proxy` for http:// ones, each lower- or upper-case (lower-case
first), and `no_proxy` naming hosts to reach directly (see `ProxyRules.bypass`).
Unlike Go's clients, loopback addresses are not exempt unless `no_proxy` names them.

TLS: an https:// URL is always verified, against the system's CAs plus the upstream's
`ca_file`; its `tls_client_certificate` is offered to the upstream's own host only
(a CDN it redirects to gets none). Plain http:// URLs stay allowed. A certificate
problem is an `UpstreamError` that names the host and OpenSSL's reason.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import ipaddress
import logging
import os
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp

from regproxy.aiohttp_adapter import take_response_body
from regproxy.config import Secret, UpstreamConfig
from regproxy.errors import ConfigError
from regproxy.manifest import ACCEPT_ALL
from regproxy.sockbody import TakenBody, direct_length

log = logging.getLogger("regproxy.upstream")

_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
MAX_REDIRECTS = 5
TOKEN_MARGIN = 10.0
#: manifests, tags, HEADs and tokens: a stalled upstream must not hold a pull for long
SMALL_TIMEOUT = aiohttp.ClientTimeout(total=20, sock_connect=10)
#: how much of a blob body aiohttp's reader holds before it pauses the connection (it
#: pauses at twice this). Plain-HTTP bodies of known length skip aiohttp (`take_body`);
#: over TLS every byte goes through it, and with aiohttp's 64 KiB the connection paused
#: and resumed every few records. Per fetch in flight, at most ~2 MiB more memory.
BLOB_READ_BUFFER = 1024 * 1024


# ---- forward proxies -------------------------------------------------------------------


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _proxy_url(value: str, where: str) -> str:
    """A proxy setting as a URL: `host:port` means `http://host:port` (as curl reads it);
    anything but an http:// proxy is an error naming `where` (never the password)."""
    value = value.strip()
    if "://" not in value:
        value = "http://" + value
    parts = urlsplit(value)
    if parts.scheme.lower() != "http" or not parts.hostname:
        shown = re.sub(r"//[^@/]*@", "//***@", value)
        raise ConfigError(f"{where}: expected an http:// proxy, got {shown!r}")
    return value.rstrip("/")


def shown_proxy(url: str) -> str:
    """A proxy URL fit for logs: the password, if any, replaced by `***`."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


@dataclass(frozen=True)
class ProxyRules:
    """Which forward proxy, if any, a URL goes through (curl's reading of the variables).

    `no_proxy`: comma-separated entries; `*` (everything), a host name (itself and its
    subdomains; a leading `.` or `*.` changes nothing), an IP address, a CIDR block
    (`10.0.0.0/8`), each optionally with `:port` (only that port then). Case does not
    matter, blanks around entries are ignored.
    """

    http: str | None = None
    https: str | None = None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ProxyRules:
        env = os.environ if environ is None else environ

        def read(name: str) -> str | None:
            for variable in (name, name.upper()):
                value = env.get(variable, "").strip()
                if value:
                    return _proxy_url(value, variable)
            return None

        no_proxy = next((env[v] for v in ("no_proxy", "NO_PROXY") if env.get(v, "").strip()), "")
        entries = tuple(e.strip().lower() for e in no_proxy.split(",") if e.strip())
        return cls(read("http_proxy"), read("https_proxy"), entries)

    def proxy_for(self, url: str) -> str | None:
        """The proxy for `url`, or None: connect directly."""
        parts = urlsplit(url)
        proxy = self.https if parts.scheme == "https" else self.http
        if proxy is None or self.bypass(url):
            return None
        return proxy

    def bypass(self, url: str) -> bool:
        """Whether `no_proxy` sends `url` directly."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower().rstrip(".")
        port = parts.port or _default_port(parts.scheme)
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        return any(_no_proxy_matches(entry, host, address, port) for entry in self.no_proxy)


def _no_proxy_matches(
    entry: str,
    host: str,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    port: int,
) -> bool:
    if entry == "*":
        return True
    # split off a port: `host:port`, `[v6]:port`, `1.2.3.4:port` (a bare v6 address has
    # several colons and no port)
    entry_port: int | None = None
    if entry.startswith("["):
        inside, _, rest = entry[1:].partition("]")
        entry, entry_port = inside, int(rest[1:]) if rest[1:].isdigit() else None
    elif entry.count(":") == 1:
        name, _, digits = entry.partition(":")
        if digits.isdigit():
            entry, entry_port = name, int(digits)
    if entry_port is not None and entry_port != port:
        return False
    if address is not None:
        try:
            return address in ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return False  # a name never matches an IP address
    name = entry.removeprefix("*").removeprefix(".").rstrip(".")
    return bool(name) and (host == name or host.endswith("." + name))


# ---- TLS -------------------------------------------------------------------------------


def tls_contexts(name: str, config: UpstreamConfig) -> tuple[ssl.SSLContext | bool, ...]:
    """(for the upstream's own host, for any other host): `True` (aiohttp's default
    verification) when the upstream has neither a CA file nor a client certificate.
    Files that cannot be read are `ConfigError`s naming the key."""
    if config.ca_file is None and config.tls_client_certificate is None:
        return True, True
    key = f"proxy.upstreams.{name}"
    contexts: list[ssl.SSLContext] = []
    for with_client in (True, False):
        context = ssl.create_default_context()  # CERT_REQUIRED, hostname checked
        if config.ca_file is not None:
            try:
                context.load_verify_locations(cafile=str(config.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"{key}.ca_file: cannot load {config.ca_file}: {_ssl_reason(exc)}"
                ) from None
        if with_client and config.tls_client_certificate is not None:
            try:
                context.load_cert_chain(
                    str(config.tls_client_certificate),
                    str(config.tls_client_key) if config.tls_client_key else None,
                )
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"{key}.tls_client_certificate: cannot load "
                    f"{config.tls_client_certificate} with {config.tls_client_key}: "
                    f"{_ssl_reason(exc)}"
                ) from None
        contexts.append(context)
    return tuple(contexts)


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# ---- errors ----------------------------------------------------------------------------


class UpstreamError(Exception):
    """The upstream could not answer: unreachable, 5xx, 429, auth refused, or bad data."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        #: why no answer came (a transport error), without the request: set by `Upstream`
        self.reason: str | None = None

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
        key = f"proxy.upstreams.{name}"
        #: the upstream's own proxy for all its requests, or the environment's rules
        self.proxy = _proxy_url(config.proxy, f"{key}.proxy") if config.proxy else None
        self.proxy_rules = ProxyRules.from_environment() if self.proxy is None else None
        self._tls_own, self._tls_other = tls_contexts(name, config)
        self._client_certificate = config.tls_client_certificate is not None
        self._reported: str | None = None  # the last failure reason logged
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
                url,
                headers=headers,
                allow_redirects=True,
                timeout=SMALL_TIMEOUT,
                **self._connection(url),
            ) as resp:
                if resp.status != 200:
                    raise UpstreamError(f"{self.name}: token endpoint answered {resp.status}", 401)
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            reason = _describe(exc, url, self.proxy_for(url), self._client_certificate)
            raise UpstreamError(f"{self.name}: token request failed: {reason}") from None
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

    # ---- connections -------------------------------------------------------------------

    def proxy_for(self, url: str) -> str | None:
        """The forward proxy a request to `url` goes through (None: directly)."""
        if self.proxy is not None:
            return self.proxy
        assert self.proxy_rules is not None
        return self.proxy_rules.proxy_for(url)

    def _connection(self, url: str) -> dict[str, Any]:
        """aiohttp's `proxy` and `ssl` arguments for a request to `url`."""
        own = urlsplit(url).netloc == self._host
        return {"proxy": self.proxy_for(url), "ssl": self._tls_own if own else self._tls_other}

    def _failure(self, method: str, url: str, exc: BaseException) -> UpstreamError:
        """The `UpstreamError` for a request that got no answer, naming the upstream."""
        reason = _describe(exc, url, self.proxy_for(url), self._client_certificate)
        error = UpstreamError(f"{self.name}: {method} {urlsplit(url).path}: {reason}")
        error.reason = reason
        return error

    async def probe(self, timeout: aiohttp.ClientTimeout) -> None:
        """`GET /v2/` as /readyz's background probe: any answer below 500 is reachable.
        Through the same proxy and TLS settings as every request; not counted."""
        url = f"{self.base}/v2/"
        try:
            async with self._session.get(
                url, allow_redirects=False, timeout=timeout, **self._connection(url)
            ) as resp:
                if resp.status < 500:
                    self.state.succeeded()
                else:
                    self.state.failed(f"HTTP {resp.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self._report(self._failure("GET", url, exc))

    def _report(self, error: UpstreamError) -> None:
        """Record a failure; log it when it is news: the first since a success, or another
        reason (whatever the path: one line for a thousand failing pulls)."""
        reason = error.reason or str(error)
        if self._reported != reason or self.state.reachable is not False:
            log.warning("upstream %s unreachable: %s", self.name, error)
        self._reported = reason
        self.state.failed(str(error))

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
        if error is not None and error.status is None:  # no answer: unreachable
            self._report(error)
        else:
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
                    # a blob body over TLS is read by aiohttp: let it buffer more before
                    # it pauses the connection (see BLOB_READ_BUFFER)
                    read_bufsize=None if small else BLOB_READ_BUFFER,
                    # each hop its own: a CDN host may be in NO_PROXY, or not
                    **self._connection(url),
                )
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise self._failure(method, url, exc) from None
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
        content coding; plain TCP or asyncio's TLS), else None. The caller must then `close()` the
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


def _describe(
    exc: BaseException,
    url: str | None = None,
    proxy: str | None = None,
    client_certificate: bool = False,
) -> str:
    """A short reason for logs and error messages (aiohttp reprs are long): what failed
    where (the proxy, the TLS handshake with which host), never a proxy's password."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    via = f" through proxy {shown_proxy(proxy)}" if proxy else ""
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        target = urlsplit(url).netloc if url else "?"
        return f"proxy {shown_proxy(proxy or '?')} answered {exc.status} {exc.message} for {target}"
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return f"cannot connect to proxy {shown_proxy(proxy or '?')}: {_ssl_reason(exc.os_error)}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS with {exc.host}:{exc.port}{via}: {_ssl_reason(exc.certificate_error)}"
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return f"TLS with {exc.host}:{exc.port}{via} failed: {_ssl_reason(exc.os_error)}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect{via}: {_ssl_reason(exc.os_error)}"
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, ssl.SSLError):
        reason = _ssl_reason(exc)
    closed = isinstance(exc, aiohttp.ServerDisconnectedError) or (
        isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE)
    )
    tls = url is not None and urlsplit(url).scheme == "https"
    if tls and (closed or "certificate required" in reason.lower()) and not client_certificate:
        host = urlsplit(url or "").netloc
        return (
            f"{reason}{via} (TLS with {host}: a server that requires a client "
            "certificate closes the connection like this; see tls_client_certificate)"
        )
    return f"{reason}{via}"


def client_timeout() -> aiohttp.ClientTimeout:
    """Connect quickly or fail; never wait forever for a stalled body."""
    return aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10, sock_read=60)
