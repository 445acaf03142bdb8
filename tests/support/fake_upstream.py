"""A fault-injecting upstream registry for the proxy tests.

`FakeUpstream` is a real aiohttp server on a loopback port holding images that
tests add programmatically. It answers the pull side of the distribution API
(`/v2/`, manifests, blobs, tags/list, referrers), counts every request by
(method, kind) and every body byte it sends, and has fault knobs a test sets
and clears: delay before the first byte, truncated / wrong / reset bodies,
slow bodies, error statuses for the next K requests or always, a Bearer token
challenge (with an optional Basic-authenticated token endpoint) or Basic auth,
307 redirects of blob GETs to a "CDN" listener on a second port, and
`stop()` / `start()` on the same port to simulate an outage.

Request kinds: `ping` (`/v2/`), `manifest`, `blob`, `tags`, `referrers`,
`token`, `cdn` (a redirected blob GET), `other`.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from .digests import sha256

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
BLOB_CONTENT_TYPE = "application/octet-stream"

#: Kinds that error-status faults hit unless a test names others.
REGISTRY_KINDS = frozenset({"ping", "manifest", "blob", "tags", "referrers", "cdn"})
CHUNK = 64 * 1024

_MANIFEST_PATH = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")
_BLOB_PATH = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<ref>[^/]+)$")
_TAGS_PATH = re.compile(r"^/v2/(?P<name>.+)/tags/list$")
_REFERRERS_PATH = re.compile(r"^/v2/(?P<name>.+)/referrers/(?P<ref>[^/]+)$")
_CDN_PATH = re.compile(r"^/cdn/(?P<ref>[^/]+)$")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class Recorded:
    """One request the fake received (recorded before auth and faults; `status` after)."""

    method: str
    kind: str
    path: str
    query: str
    name: str | None
    reference: str | None
    headers: CIMultiDictProxy[str]
    listener: Literal["main", "cdn"]
    #: the status the fake answered with (0 while in progress or when the body broke)
    status: int = 0

    @property
    def authorization(self) -> str | None:
        return self.headers.get("Authorization")


@dataclass
class StatusFault:
    """Answer `status` to matching requests; `remaining=None` means always."""

    status: int
    remaining: int | None
    kinds: frozenset[str]
    methods: frozenset[str]
    retry_after: str | None = None


@dataclass
class Faults:
    """Per-test fault knobs; `FakeUpstream.clear_faults()` resets them all."""

    #: seconds to wait before sending the status line (slow first byte)
    delay: float = 0.0
    delay_kinds: frozenset[str] = frozenset({"manifest", "blob", "cdn"})
    #: send this many body bytes, then close the connection cleanly (FIN)
    truncate_after: int | None = None
    #: send this many body bytes, then reset the connection (RST)
    reset_after: int | None = None
    #: flip the first byte: same length, wrong digest
    wrong_bytes: bool = False
    #: seconds to pause after every `chunk_size` bytes (a slow upstream)
    chunk_delay: float = 0.0
    chunk_size: int = CHUNK
    #: request kinds the body faults above apply to (GET only)
    body_kinds: frozenset[str] = frozenset({"blob", "cdn"})
    statuses: list[StatusFault] = field(default_factory=list)


@dataclass
class FakeImage:
    """An image the fake holds: manifest bytes, digest, config and layer blobs."""

    repo: str
    manifest: bytes
    digest: str
    media_type: str
    config: bytes
    layers: list[bytes]

    @property
    def blobs(self) -> list[bytes]:
        return [self.config, *self.layers]


@dataclass
class _Repo:
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


class FakeUpstream:
    """An in-process upstream registry with request accounting and fault knobs."""

    def __init__(
        self, host: str = "127.0.0.1", cdn_host: str = "127.0.0.1", service: str = "fake"
    ) -> None:
        self.host = host
        self.cdn_host = cdn_host
        self.service = service
        self.port = 0
        self.cdn_port = 0
        self._runner: web.AppRunner | None = None
        self._cdn_runner: web.AppRunner | None = None
        self._repos: dict[str, _Repo] = {}
        self._all_blobs: dict[str, bytes] = {}
        self.faults = Faults()
        #: None, "bearer" (token challenge) or "basic" (registry asks for Basic directly)
        self.auth: Literal["bearer", "basic"] | None = None
        #: Basic credentials the token endpoint (bearer) or the registry (basic) demands
        self.credentials: tuple[str, str] | None = None
        #: lifetime of issued tokens (seconds); the fake enforces it
        self.token_ttl: float = 300.0
        self._tokens: dict[str, tuple[float, frozenset[str]]] = {}
        self._token_ids = itertools.count(1)
        #: None, "cdn" (307 to the CDN listener) or "same-host" (307 to /cdn/ on this port)
        self.redirect_blobs: Literal["cdn", "same-host"] | None = None
        self.requests: list[Recorded] = []
        self._bytes: Counter[str] = Counter()
        self.in_flight = 0

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """Base URL of the registry listener (stable across stop/start)."""
        return f"http://{self.host}:{self.port}"

    @property
    def cdn_url(self) -> str:
        return f"http://{self.cdn_host}:{self.cdn_port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        """Listen (again) on the registry port; the first call also starts the CDN."""
        if self._cdn_runner is None:
            self._cdn_runner, self.cdn_port = await self._listen(
                "cdn", self.cdn_host, self.cdn_port
            )
        if self._runner is None:
            self._runner, self.port = await self._listen("main", self.host, self.port)

    async def stop(self) -> None:
        """Close the registry listener and every open connection (the CDN stays up)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def close(self) -> None:
        await self.stop()
        runner, self._cdn_runner = self._cdn_runner, None
        if runner is not None:
            await runner.cleanup()

    async def _listen(
        self, listener: Literal["main", "cdn"], host: str, port: int
    ) -> tuple[web.AppRunner, int]:
        async def handler(request: web.Request) -> web.StreamResponse:
            self.in_flight += 1
            try:
                return await self._dispatch(request, listener)
            finally:
                self.in_flight -= 1

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        deadline = time.monotonic() + 5
        while True:
            try:
                await site.start()
                break
            except OSError:
                if port == 0 or time.monotonic() > deadline:
                    await runner.cleanup()
                    raise
                await asyncio.sleep(0.05)
        server = site._server  # the asyncio server: the only way to learn an ephemeral port
        assert server is not None
        bound = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return runner, bound

    # ----------------------------------------------------------------- content

    def _repo(self, name: str) -> _Repo:
        return self._repos.setdefault(name, _Repo())

    def add_blob(self, repo: str, data: bytes) -> str:
        """Store a blob in `repo`; returns its digest."""
        digest = sha256(data)
        self._repo(repo).blobs[digest] = data
        self._all_blobs[digest] = data
        return digest

    def add_manifest(self, repo: str, tag: str | None, data: bytes, media_type: str) -> str:
        """Store manifest bytes (and point `tag` at them); returns the digest."""
        digest = sha256(data)
        self._repo(repo).manifests[digest] = (data, media_type)
        if tag is not None:
            self._repo(repo).tags[tag] = digest
        return digest

    def set_tag(self, repo: str, tag: str, digest: str) -> None:
        """Re-point `tag` at a manifest already in `repo`."""
        assert digest in self._repo(repo).manifests, "add the manifest first"
        self._repo(repo).tags[tag] = digest

    def delete_tag(self, repo: str, tag: str) -> None:
        self._repo(repo).tags.pop(tag, None)

    def add_image(
        self,
        repo: str,
        tag: str | None = "latest",
        layer_sizes: Iterable[int] = (1024, 2048),
        media_type: str = OCI_MANIFEST,
        **extra: Any,
    ) -> FakeImage:
        """Random layers + config + a manifest referencing them, all stored in `repo`."""
        docker = media_type == DOCKER_MANIFEST
        layers = [os.urandom(size) for size in layer_sizes]
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "nonce": os.urandom(8).hex()}
        ).encode()
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": DOCKER_LAYER if docker else OCI_LAYER,
                    "digest": sha256(layer),
                    "size": len(layer),
                }
                for layer in layers
            ],
            **extra,
        }
        for blob in (config, *layers):
            self.add_blob(repo, blob)
        manifest = json.dumps(doc, indent=2).encode()
        digest = self.add_manifest(repo, tag, manifest, media_type)
        return FakeImage(repo, manifest, digest, media_type, config, layers)

    def add_index(
        self, repo: str, tag: str | None, children: list[FakeImage], media_type: str = OCI_INDEX
    ) -> str:
        """An image index over `children` (already added to `repo`); returns its digest."""
        arches = ["amd64", "arm64", "s390x", "ppc64le"]
        doc = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                {
                    "mediaType": child.media_type,
                    "digest": child.digest,
                    "size": len(child.manifest),
                    "platform": {"architecture": arch, "os": "linux"},
                }
                for child, arch in zip(children, arches, strict=False)
            ],
        }
        return self.add_manifest(repo, tag, json.dumps(doc).encode(), media_type)

    def add_referrer(self, repo: str, subject: FakeImage, artifact_type: str) -> str:
        """An artifact manifest whose `subject` is `subject`; returns its digest."""
        empty = b"{}"
        self.add_blob(repo, empty)
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": sha256(empty),
                "size": len(empty),
            },
            "layers": [],
            "subject": {
                "mediaType": subject.media_type,
                "digest": subject.digest,
                "size": len(subject.manifest),
            },
        }
        return self.add_manifest(repo, None, json.dumps(doc).encode(), OCI_MANIFEST)

    # ----------------------------------------------------------------- knobs

    def fail(
        self,
        status: int,
        count: int | None = None,
        kinds: Iterable[str] = REGISTRY_KINDS,
        methods: Iterable[str] = ("GET", "HEAD"),
        retry_after: str | None = None,
    ) -> None:
        """Answer `status` to the next `count` matching requests (None: until cleared)."""
        self.faults.statuses.append(
            StatusFault(status, count, frozenset(kinds), frozenset(methods), retry_after)
        )

    def clear_faults(self) -> None:
        """Drop every fault knob (auth, redirects and content stay as they are)."""
        self.faults = Faults()

    # ----------------------------------------------------------------- accounting

    def count(
        self,
        method: str | None = None,
        kind: str | None = None,
        name: str | None = None,
        status: int | None = None,
    ) -> int:
        """How many recorded requests match every given field."""
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method)
            and (kind is None or r.kind == kind)
            and (name is None or r.name == name)
            and (status is None or r.status == status)
        )

    def matching(
        self, method: str | None = None, kind: str | None = None, status: int | None = None
    ) -> list[Recorded]:
        return [
            r
            for r in self.requests
            if (method is None or r.method == method)
            and (kind is None or r.kind == kind)
            and (status is None or r.status == status)
        ]

    def counts(self) -> Counter[tuple[str, str]]:
        """Requests per (method, kind)."""
        return Counter((r.method, r.kind) for r in self.requests)

    def bytes_sent(self, kind: str | None = None) -> int:
        """Body bytes written to clients, for one kind or in total."""
        return self._bytes[kind] if kind is not None else sum(self._bytes.values())

    def reset_counts(self) -> None:
        self.requests.clear()
        self._bytes.clear()

    # ----------------------------------------------------------------- serving

    def _classify(self, path: str, listener: str) -> tuple[str, str | None, str | None]:
        if listener == "cdn":
            match = _CDN_PATH.match(path)
            return ("cdn", None, match["ref"]) if match else ("other", None, None)
        if path in ("/v2/", "/v2"):
            return "ping", None, None
        if path == "/token":
            return "token", None, None
        match = _CDN_PATH.match(path)
        if match:
            return "cdn", None, match["ref"]
        for kind, pattern in (
            ("tags", _TAGS_PATH),
            ("referrers", _REFERRERS_PATH),
            ("manifest", _MANIFEST_PATH),
            ("blob", _BLOB_PATH),
        ):
            match = pattern.match(path)
            if match:
                ref = match.groupdict().get("ref")
                return kind, match["name"], ref
        return "other", None, None

    async def _dispatch(
        self, request: web.Request, listener: Literal["main", "cdn"]
    ) -> web.StreamResponse:
        kind, name, ref = self._classify(request.path, listener)
        record = Recorded(
            request.method,
            kind,
            request.path,
            request.query_string,
            name,
            ref,
            CIMultiDictProxy(CIMultiDict(request.headers)),
            listener,
        )
        self.requests.append(record)
        response = await self._answer(request, kind, name, ref)
        if not (request.transport is None or request.transport.is_closing()):
            record.status = response.status
        return response

    async def _answer(
        self, request: web.Request, kind: str, name: str | None, ref: str | None
    ) -> web.StreamResponse:
        if kind == "token":
            return self._token(request)
        faulted = self._status_fault(request.method, kind)
        if faulted is not None:
            return faulted
        if request.method in ("GET", "HEAD") and kind in self.faults.delay_kinds:
            await asyncio.sleep(self.faults.delay)
        if kind not in ("cdn", "other"):
            denied = self._check_auth(request, name)
            if denied is not None:
                return denied
        if request.method not in ("GET", "HEAD"):
            return _error(405, "UNSUPPORTED", "the fake upstream is read-only")
        if kind == "ping":
            return web.json_response({})
        if kind == "manifest":
            return await self._manifest(request, name or "", ref or "")
        if kind == "blob":
            return await self._blob(request, name or "", ref or "")
        if kind == "cdn":
            return await self._cdn(request, ref or "")
        if kind == "tags":
            return self._tags(request, name or "")
        if kind == "referrers":
            return self._referrers(request, name or "", ref or "")
        return _error(404, "NAME_UNKNOWN", "unknown endpoint")

    def _status_fault(self, method: str, kind: str) -> web.Response | None:
        for fault in self.faults.statuses:
            if kind not in fault.kinds or method not in fault.methods:
                continue
            if fault.remaining is not None:
                if fault.remaining <= 0:
                    continue
                fault.remaining -= 1
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            code = {429: "TOOMANYREQUESTS", 401: "UNAUTHORIZED", 403: "DENIED"}.get(
                fault.status, "UNAVAILABLE" if fault.status in (502, 503, 504) else "UNKNOWN"
            )
            return _error(fault.status, code, f"injected {fault.status}", headers, method)
        return None

    # ----------------------------------------------------------------- auth

    def _challenge(self, name: str | None, error: str | None = None) -> dict[str, str]:
        if self.auth == "basic":
            return {"WWW-Authenticate": f'Basic realm="{self.service}"'}
        value = f'Bearer realm="{self.url}/token",service="{self.service}"'
        if name is not None:
            value += f',scope="repository:{name}:pull"'
        if error is not None:
            value += f',error="{error}"'
        return {"WWW-Authenticate": value}

    def _basic_ok(self, header: str | None) -> bool:
        if self.credentials is None:
            return True
        return header == basic_header(*self.credentials)

    def _check_auth(self, request: web.Request, name: str | None) -> web.Response | None:
        if self.auth is None:
            return None
        header = request.headers.get("Authorization")
        if self.auth == "basic":
            if header is not None and self._basic_ok(header):
                return None
            return _error(
                401,
                "UNAUTHORIZED",
                "authentication required",
                self._challenge(name),
                request.method,
            )
        error = None
        if header is not None and header.startswith("Bearer "):
            entry = self._tokens.get(header[len("Bearer ") :])
            if entry is None or entry[0] < time.monotonic():
                error = "invalid_token"
            elif name is None or f"repository:{name}:pull" in entry[1]:
                return None
            else:
                error = "insufficient_scope"
        return _error(
            401,
            "UNAUTHORIZED",
            "authentication required",
            self._challenge(name, error),
            request.method,
        )

    def _token(self, request: web.Request) -> web.Response:
        if request.query.get("service") != self.service:
            return web.json_response({"details": "unknown service"}, status=400)
        if self.credentials is not None and not self._basic_ok(
            request.headers.get("Authorization")
        ):
            return web.json_response(
                {"details": "incorrect username or password"},
                status=401,
                headers={"WWW-Authenticate": f'Basic realm="{self.service} token"'},
            )
        scopes = frozenset(
            scope for raw in request.query.getall("scope", []) for scope in raw.split(" ")
        )
        token = f"tok-{next(self._token_ids)}-{os.urandom(6).hex()}"
        self._tokens[token] = (time.monotonic() + self.token_ttl, scopes)
        body = {
            "token": token,
            "access_token": token,
            "expires_in": int(self.token_ttl) if self.token_ttl >= 1 else self.token_ttl,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return web.json_response(body)

    @property
    def token_requests(self) -> list[Recorded]:
        return self.matching(kind="token")

    # ----------------------------------------------------------------- handlers

    async def _manifest(self, request: web.Request, name: str, ref: str) -> web.StreamResponse:
        repo = self._repos.get(name)
        digest = ref if ref.startswith("sha256:") else (repo.tags.get(ref) if repo else None)
        if repo is None or digest is None or digest not in repo.manifests:
            return _error(404, "MANIFEST_UNKNOWN", "manifest unknown", method=request.method)
        data, media_type = repo.manifests[digest]
        if not _accepts(request.headers.getall("Accept", []), media_type):
            return _error(
                404,
                "MANIFEST_UNKNOWN",
                f"{media_type} found, but the Accept header does not allow it",
                method=request.method,
            )
        headers = {"Docker-Content-Digest": digest, "Content-Type": media_type, "ETag": digest}
        return await self._send(request, "manifest", data, headers)

    async def _blob(self, request: web.Request, name: str, digest: str) -> web.StreamResponse:
        repo = self._repos.get(name)
        if repo is None or digest not in repo.blobs:
            return _error(404, "BLOB_UNKNOWN", "blob unknown", method=request.method)
        if self.redirect_blobs is not None and request.method == "GET":
            base = self.cdn_url if self.redirect_blobs == "cdn" else self.url
            expires = int(time.time()) + 60
            location = f"{base}/cdn/{digest}?expires={expires}&sig={os.urandom(4).hex()}"
            return web.Response(status=307, headers={"Location": location})
        headers = {"Docker-Content-Digest": digest, "Content-Type": BLOB_CONTENT_TYPE}
        return await self._send(request, "blob", repo.blobs[digest], headers)

    async def _cdn(self, request: web.Request, digest: str) -> web.StreamResponse:
        data = self._all_blobs.get(digest)
        expires = request.query.get("expires", "")
        if data is None or not expires.isdigit() or int(expires) < time.time():
            return web.Response(status=403, text="signature expired or object unknown")
        return await self._send(request, "cdn", data, {"Content-Type": BLOB_CONTENT_TYPE})

    def _tags(self, request: web.Request, name: str) -> web.Response:
        repo = self._repos.get(name)
        if repo is None:
            return _error(404, "NAME_UNKNOWN", "repository unknown", method=request.method)
        tags = sorted(repo.tags)
        last = request.query.get("last")
        if last:
            tags = [t for t in tags if t > last]
        n = request.query.get("n")
        if n and n.isdigit():
            tags = tags[: int(n)]
        return web.json_response({"name": name, "tags": tags})

    def _referrers(self, request: web.Request, name: str, subject: str) -> web.Response:
        repo = self._repos.get(name) or _Repo()
        wanted = request.query.get("artifactType")
        descriptors = []
        for digest, (data, media_type) in sorted(repo.manifests.items()):
            try:
                doc = json.loads(data)
            except ValueError:
                continue
            if (doc.get("subject") or {}).get("digest") != subject:
                continue
            artifact_type = doc.get("artifactType") or doc.get("config", {}).get("mediaType")
            if wanted and artifact_type != wanted:
                continue
            entry = {"mediaType": media_type, "digest": digest, "size": len(data)}
            if artifact_type:
                entry["artifactType"] = artifact_type
            descriptors.append(entry)
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors})
        headers = {"Content-Type": OCI_INDEX}
        if wanted:
            headers["OCI-Filters-Applied"] = "artifactType"
        return web.Response(body=body.encode(), headers=headers)

    async def _send(
        self, request: web.Request, kind: str, data: bytes, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Write a body honouring Range and the body fault knobs."""
        status = 200
        start, end = 0, len(data)
        match = _RANGE.fullmatch(request.headers.get("Range", ""))
        if match and kind != "manifest":
            start = int(match[1])
            end = min(int(match[2]) + 1, len(data)) if match[2] else len(data)
            if start >= len(data) or start >= end:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start
        if request.method == "HEAD":
            await response.prepare(request)
            return response
        faults = self.faults
        faulty = kind in faults.body_kinds
        payload = data[start:end]
        if faulty and faults.wrong_bytes and payload:
            payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
        cut = None
        if faulty:
            limits = [x for x in (faults.truncate_after, faults.reset_after) if x is not None]
            cut = min(limits) if limits else None
        await response.prepare(request)
        sent = 0
        stop_at = len(payload) if cut is None else min(cut, len(payload))
        while sent < stop_at:
            piece = payload[sent : min(stop_at, sent + faults.chunk_size)]
            await response.write(piece)
            sent += len(piece)
            self._bytes[kind] += len(piece)
            if faults.chunk_delay and faulty:
                await asyncio.sleep(faults.chunk_delay)
        if cut is not None and cut < len(payload):
            _break_connection(request, reset=faults.reset_after == cut)
            return response
        await response.write_eof()
        return response


def _break_connection(request: web.Request, reset: bool) -> None:
    """Close (FIN) or reset (RST) the connection under a half-sent response."""
    transport = request.transport
    if transport is None:
        return
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()


def _accepts(accept_headers: list[str], media_type: str) -> bool:
    """Minimal Accept check: absent, `*/*`, or the media type listed."""
    types = {
        part.split(";")[0].strip().lower()
        for header in accept_headers
        for part in header.split(",")
        if part.strip()
    }
    return not types or "*/*" in types or media_type.lower() in types


def _error(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
) -> web.Response:
    """An OCI error envelope (aiohttp keeps Content-Length and drops the body for HEAD)."""
    del method  # kept so call sites read the same for HEAD and GET
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def basic_header(username: str, password: str) -> str:
    """The `Authorization` value for Basic credentials."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
