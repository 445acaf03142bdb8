"""Warm the proxy cache without a running server (`regproxy prefetch IMAGE…`).

It drives the same `ProxyCache` as `serve` (upstream client, token flow, tag
TTL with HEAD revalidation, single-flight spool, digest-checked atomic commit),
so it writes into `proxy_storage` exactly what a pull would have written and a
server on the same directory serves the result at once. A tag that is fresh in
the cache costs no upstream request at all, a stale one a HEAD; blobs already
on disk are skipped. Blob downloads run with bounded concurrency.

Image references are the usual ones (`docker.io/library/alpine:3.20`,
`ghcr.io/org/app@sha256:…`, `alpine` for Docker Hub) or the proxy's own form
`p/<upstream>/<name>[:tag|@digest]`. A registry host maps to the upstream of
that name, or to the upstream whose URL has that host.
"""

from __future__ import annotations

import asyncio
import platform as platform_mod
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from regproxy import manifest as mf
from regproxy.config import Config
from regproxy.digest import Digest
from regproxy.errors import RegistryError
from regproxy.proxy.cache import ProxyCache
from regproxy.proxy.flights import FlightFailed
from regproxy.proxy.upstream import UpstreamError
from regproxy.reference import (
    DOCKER_HUB_UPSTREAM,
    ProxyName,
    remote_name,
    split_proxy_name,
    under_prefix,
    validate_name,
    validate_tag,
)
from regproxy.storage.aio import Offload
from regproxy.storage.store import Store

DOCKER_HUB_HOSTS = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
PROGRESS_INTERVAL = 0.1
DEFAULT_JOBS = 4


class ImageRefError(ValueError):
    """An image reference that cannot be prefetched: malformed, or no upstream for it."""


@dataclass(frozen=True)
class ImageRef:
    text: str
    target: ProxyName
    reference: str  # a tag or a digest

    @property
    def pull_name(self) -> str:
        """What a client pulls through the proxy: `p/<upstream>/<name>:tag` (or `@digest`)."""
        sep = "@" if ":" in self.reference else ":"
        return f"{self.target.local}{sep}{self.reference}"


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"expected os/arch[/variant], got {text!r}")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, p: dict | None) -> bool:
        if not isinstance(p, dict):
            return False
        if p.get("os") != self.os or p.get("architecture") != self.architecture:
            return False
        return self.variant is None or p.get("variant") in (None, self.variant)

    def __str__(self) -> str:
        return "/".join(x for x in (self.os, self.architecture, self.variant) if x)


_MACHINES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def host_platform() -> Platform:
    """What `docker pull` would pick on this machine (linux/<GOARCH>)."""
    machine = platform_mod.machine().lower()
    if machine.startswith("armv7"):
        return Platform("linux", "arm", "v7")
    return Platform("linux", _MACHINES.get(machine, machine))


def platform_text(p: dict | None) -> str:
    if not isinstance(p, dict):
        return "?"
    parts = (p.get("os"), p.get("architecture"), p.get("variant"))
    return "/".join(str(x) for x in parts if x) or "?"


# ---- references ---------------------------------------------------------------------------


def _upstream_for_host(host: str, config: Config) -> str:
    upstreams = config.proxy.upstreams
    if host in upstreams:
        return host
    hub = host in DOCKER_HUB_HOSTS
    for name, upstream in upstreams.items():
        netloc = urlsplit(upstream.url).netloc
        if netloc == host or (hub and (netloc in DOCKER_HUB_HOSTS or name in DOCKER_HUB_HOSTS)):
            return name
    configured = ", ".join(sorted(upstreams)) or "none"
    raise ImageRefError(f"no configured upstream for registry {host!r} (configured: {configured})")


def _looks_like_host(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def parse_image(text: str, config: Config) -> ImageRef:
    """`[host/]name[:tag][@digest]` or `p/<upstream>/name…` → what to ask the cache for."""
    raw = text.strip()
    if not raw:
        raise ImageRefError("empty image reference")
    name_part, at, digest_text = raw.partition("@")
    reference: str | None = None
    try:
        if at:
            reference = str(Digest.parse(digest_text))
        head, slash, last = name_part.rpartition("/")
        if ":" in last:
            last, _, tag = last.partition(":")
            if reference is None:  # name:tag@digest pulls the digest
                reference = validate_tag(tag)
            name_part = f"{head}{slash}{last}"
        reference = reference or "latest"
        prefix = config.proxy.prefix
        if under_prefix(name_part, prefix):
            validate_name(name_part)
            target = split_proxy_name(name_part, prefix, set(config.proxy.upstreams))
            assert target is not None
            return ImageRef(raw, target, reference)
        first, sep, rest = name_part.partition("/")
        if sep and _looks_like_host(first):
            host, path = first, rest
        else:
            host, path = DOCKER_HUB_UPSTREAM, name_part
        validate_name(path)
        upstream = _upstream_for_host(host, config)
        if host in DOCKER_HUB_HOSTS and "/" not in path:
            path = f"library/{path}"  # Docker Hub's official images
        remote = remote_name(upstream, path)
        return ImageRef(raw, ProxyName(upstream, remote, f"{prefix}/{upstream}/{path}"), reference)
    except RegistryError as exc:
        raise ImageRefError(f"{raw}: {exc.message}") from None


def read_image_list(lines: Iterable[str]) -> list[str]:
    """Images from a file: one per line; blank lines and `#` comments are ignored."""
    out = []
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if text:
            out.append(text)
    return out


# ---- results and progress -----------------------------------------------------------------


@dataclass
class ImageResult:
    image: str  # as given
    repository: str  # the name to pull through the proxy: `p/<upstream>/<name>`
    upstream: str
    reference: str  # tag or digest
    ok: bool = False
    error: str | None = None
    digest: str | None = None
    media_type: str | None = None
    #: HIT (fresh in the cache), REVALIDATED, MISS or STALE (upstream down, cached copy kept)
    cache_status: str | None = None
    platforms: list[str] = field(default_factory=list)
    manifests: int = 0
    blobs: int = 0
    blobs_cached: int = 0
    blobs_fetched: int = 0
    bytes_fetched: int = 0
    seconds: float = 0.0


class Observer:
    """Progress callbacks (all on the event loop); the default does nothing."""

    def blob_started(self, key: str, image: str, digest: str, size: int | None) -> None:
        pass

    def blob_advanced(self, key: str, done: int) -> None:
        pass

    def blob_finished(self, key: str, ok: bool) -> None:
        pass

    def image_finished(self, result: ImageResult) -> None:
        pass


@dataclass(frozen=True)
class Options:
    platforms: tuple[Platform, ...] = ()
    all_platforms: bool = False
    jobs: int = DEFAULT_JOBS


# ---- the work -----------------------------------------------------------------------------


class Prefetcher:
    """Fetches images through one `ProxyCache`; one semaphore bounds blob downloads."""

    def __init__(self, cache: ProxyCache, options: Options, observer: Observer) -> None:
        self.cache = cache
        self.options = options
        self.observer = observer
        self.platforms = options.platforms or (host_platform(),)
        self._downloads = asyncio.Semaphore(max(1, options.jobs))
        #: one download per digest, whichever image asked first
        self._blobs: dict[Digest, asyncio.Future[int]] = {}

    async def run(self, image: ImageRef) -> ImageResult:
        result = ImageResult(image.text, image.target.local, image.target.upstream, image.reference)
        started = time.monotonic()
        try:
            await self._image(image, result)
            result.ok = True
        except RegistryError as exc:
            result.error = exc.message
        except (FlightFailed, UpstreamError) as exc:
            result.error = str(exc)
        except OSError as exc:
            result.error = _os_error(exc)
        except ImageRefError as exc:
            result.error = str(exc)
        except Exception as exc:  # one image must not end the run, nor print a traceback
            result.error = f"unexpected error: {exc!r}"
        result.seconds = time.monotonic() - started
        self.observer.image_finished(result)
        return result

    async def _image(self, image: ImageRef, result: ImageResult) -> None:
        top = await self.cache.manifest(image.target, image.reference, accept=[])
        result.digest = str(top.stored.digest)
        result.media_type = top.stored.media_type
        result.cache_status = top.status
        manifests = await self._images_of(
            image, top.stored.digest, top.stored.data, top.stored.media_type, result
        )
        result.manifests = len({top.stored.digest} | {digest for digest, _ in manifests})
        wanted: dict[Digest, mf.Descriptor] = {}
        for _digest, parsed in manifests:
            for desc in parsed.blobs:
                wanted.setdefault(desc.digest, desc)
        result.blobs = len(wanted)
        outcomes = await asyncio.gather(
            *(self._blob(image, desc, result) for desc in wanted.values()),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _images_of(
        self,
        image: ImageRef,
        digest: Digest,
        data: bytes,
        media_type: str,
        result: ImageResult,
        depth: int = 0,
    ) -> list[tuple[Digest, mf.Manifest]]:
        """The image manifests to fetch: the manifest itself, or the chosen children."""
        parsed = mf.parse(data, media_type)
        if not parsed.is_index:
            return [(digest, parsed)]
        if self.options.all_platforms:
            chosen = list(parsed.children)
        else:
            chosen = [
                c for c in parsed.children if any(p.matches(c.platform) for p in self.platforms)
            ]
        if not chosen:
            have = ", ".join(sorted({platform_text(c.platform) for c in parsed.children}))
            wanted = ", ".join(str(p) for p in self.platforms)
            raise ImageRefError(f"no manifest for {wanted} in the index (it has: {have})")
        result.platforms = sorted({platform_text(c.platform) for c in chosen})
        found: list[tuple[Digest, mf.Manifest]] = []
        for child in chosen:
            got = await self.cache.manifest(image.target, str(child.digest), accept=[])
            if depth < 2:  # an index of indexes is legal, if rare; deeper is not followed
                found += await self._images_of(
                    image, child.digest, got.stored.data, got.stored.media_type, result, depth + 1
                )
        return found

    async def _blob(self, image: ImageRef, desc: mf.Descriptor, result: ImageResult) -> None:
        digest = desc.digest
        shared = self._blobs.get(digest)
        if shared is not None:
            await asyncio.shield(shared)  # another image of this run fetches it
            result.blobs_cached += 1
            return
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._blobs[digest] = future
        try:
            fetched = await self._download(image, desc)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: only this image reports it
            raise
        future.set_result(fetched)
        if fetched:
            result.blobs_fetched += 1
            result.bytes_fetched += fetched
        else:
            result.blobs_cached += 1

    async def _download(self, image: ImageRef, desc: mf.Descriptor) -> int:
        """Bytes fetched from upstream; 0 when the blob was already cached."""
        store = self.cache.store
        if await self.cache.offload.metadata(store.backend.local, store.has_blob, desc.digest):
            await self.cache.blob(image.target, desc.digest)  # records the pull (LRU clock)
            return 0
        async with self._downloads:
            cached = await self.cache.blob(image.target, desc.digest)
            flight = cached.flight
            if flight is None:
                return 0
            key = f"{image.text}|{desc.digest}"
            self.observer.blob_started(key, image.text, str(desc.digest), desc.size)
            waiter = asyncio.ensure_future(flight.wait_done())
            try:
                while not waiter.done():
                    await asyncio.wait({waiter}, timeout=PROGRESS_INTERVAL)
                    self.observer.blob_advanced(key, flight.written)
                waiter.result()
            except BaseException:
                waiter.cancel()
                self.observer.blob_finished(key, False)
                raise
            self.observer.blob_finished(key, True)
            return flight.written


def _os_error(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return f"{text}: {exc.filename}" if exc.filename else text


async def prefetch(
    config: Config,
    store: Store,
    images: Sequence[ImageRef],
    options: Options | None = None,
    observer: Observer | None = None,
) -> list[ImageResult]:
    """Fetch every image into `store` (the proxy cache); one result per image, in order."""
    options = options or Options()
    observer = observer or Observer()
    offload = Offload()
    session = ProxyCache.new_session()
    try:
        cache = ProxyCache(config, store, offload, session)
        prefetcher = Prefetcher(cache, options, observer)
        limit = asyncio.Semaphore(max(1, options.jobs))

        async def one(image: ImageRef) -> ImageResult:
            async with limit:
                return await prefetcher.run(image)

        try:
            results = await asyncio.gather(*(one(image) for image in images))
            # the bookkeeping tasks (pull records for LRU and `--proxy-max-age`) finish;
            # `close()` would cancel them
            await cache.drain()
        finally:
            await cache.close()
    finally:
        await session.close()
        offload.close()
    return list(results)
