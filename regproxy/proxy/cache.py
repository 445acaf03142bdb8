"""Pull-through policy: tag TTL with HEAD revalidation, stale-if-error, blob fetch-through.

Cached content lives in `proxy_storage` under `<upstream>/<remote name>`, written
with the same atomic, digest-checked store code as pushed images.

Several workers (`shared`): a blob miss is claimed per digest (`flights.Claim`); the
worker holding the claim fetches as a single process would, the others stream its spool
file as it grows (their readers get the same guarantees: the last byte only after the
commit, the connection cut if the fetch fails), so concurrent cold pulls through any
workers cost the upstream one transfer. A stale tag is revalidated by one worker at a
time; the others wait for it and read the tag it refreshed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from regproxy import manifest as mf
from regproxy.config import Config
from regproxy.digest import Digest, of_bytes
from regproxy.errors import (
    BlobUnknown,
    Denied,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    StorageUnavailable,
    TooManyRequests,
    UpstreamUnavailable,
    object_store_error,
)
from regproxy.proxy.flights import BlobFlight, Claim, FlightFailed, SingleFlight
from regproxy.proxy.upstream import Upstream, UpstreamError, client_timeout
from regproxy.reference import ProxyName, upstream_storage_key
from regproxy.sockbody import BodyTimeout, BodyTruncated, TakenBody
from regproxy.storage.aio import Offload
from regproxy.storage.intake import take_in, take_in_direct
from regproxy.storage.replicas import CLAIM_RENEW, Replica, Replicas
from regproxy.storage.store import Store, StoredManifest

log = logging.getLogger("regproxy.proxy")

HIT, MISS, REVALIDATED, STALE = "HIT", "MISS", "REVALIDATED", "STALE"
#: the response header that tells clients (and logs) how the cache answered
CACHE_STATUS = "X-Cache-Status"
_LINK_RE = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')
#: A blob body read past aiohttp fails when the upstream sends nothing for this long.
READ_TIMEOUT = client_timeout().sock_read or 60.0
#: several workers: how often a follower looks at the claim holder's progress (seconds)
FOLLOW_POLL = 0.01
#: …and how long it waits for a holder that shows no progress before fetching by itself
CLAIM_WAIT = 300.0
#: committed digests remembered (`ProxyCache._committed`), and for how many seconds at least
COMMITTED_REMEMBERED = 4096
COMMITTED_FOR = 60.0


class _HolderGone(Exception):
    """The worker holding a claim failed or died before its spool could be followed."""


@dataclass
class ProxyStats:
    """Counters per upstream, read by metrics and tests."""

    hits: dict[str, int] = field(default_factory=dict)
    misses: dict[str, int] = field(default_factory=dict)
    revalidations: dict[str, int] = field(default_factory=dict)
    stale: dict[str, int] = field(default_factory=dict)
    coalesced: dict[str, int] = field(default_factory=dict)
    upstream_bytes: dict[str, int] = field(default_factory=dict)
    #: manifest and blob bytes answered from the cache (hits; not what a fetch streamed)
    served_bytes: dict[str, int] = field(default_factory=dict)

    def count(self, counter: dict[str, int], upstream: str, n: int = 1) -> None:
        counter[upstream] = counter.get(upstream, 0) + n

    def status(self, upstream: str, status: str) -> None:
        target = {
            HIT: self.hits,
            MISS: self.misses,
            REVALIDATED: self.revalidations,
            STALE: self.stale,
        }[status]
        self.count(target, upstream)


@dataclass(frozen=True, slots=True)
class CachedManifest:
    stored: StoredManifest
    status: str


@dataclass(frozen=True, slots=True)
class CachedBlob:
    """Either a committed file (`flight` is None) or a fetch in progress to read from."""

    digest: Digest
    flight: BlobFlight | None
    status: str
    #: another replica is fetching it: relay the request there (`server.forward`)
    elsewhere: Replica | None = None


def cache_name(target: ProxyName) -> str:
    """The repository name inside `proxy_storage`: `<upstream>/<remote name>`."""
    return f"{upstream_storage_key(target.upstream)}/{target.remote}"


def accepts(accept: list[str], media_type: str) -> bool:
    """Whether a client's Accept list admits `media_type` (no list means anything)."""
    if not accept:
        return True
    for item in accept:
        value = item.split(";", 1)[0].strip().lower()
        if value in ("*/*", "application/*", media_type):
            return True
    return False


def _error_for(exc: UpstreamError, not_found: type[RegistryError], what: str) -> RegistryError:
    """Map an upstream failure (with nothing cached to fall back on) to our error."""
    if exc.not_found:
        return not_found(f"{what} not found upstream")
    if exc.denied:
        return Denied(f"upstream refused access to {what}: {exc}")
    if exc.status == 429:
        return TooManyRequests(f"upstream rate limit reached for {what}")
    return UpstreamUnavailable(f"upstream unavailable for {what}: {exc}")


async def _read_manifest_body(resp: aiohttp.ClientResponse) -> bytes:
    """The whole manifest body, however it arrives in pieces, capped at the manifest size.

    One `read(n)` returns what has arrived so far, not `n` bytes: a large index would be
    cut short. A body shorter than its Content-Length is never taken for a manifest, even
    when no `Docker-Content-Digest` comes to prove it wrong.
    """
    expected = resp.content_length
    if expected is not None and expected > mf.MAX_MANIFEST_SIZE:
        raise UpstreamError(f"upstream manifest of {expected} bytes is too large")
    parts: list[bytes] = []
    total = 0
    while True:
        piece = await resp.content.read(mf.MAX_MANIFEST_SIZE + 1 - total)
        if not piece:
            break
        parts.append(piece)
        total += len(piece)
        if total > mf.MAX_MANIFEST_SIZE:
            raise UpstreamError("upstream manifest is too large")
    if expected is not None and total != expected:
        raise UpstreamError(f"upstream manifest body has {total} of {expected} bytes")
    return b"".join(parts)


class ProxyCache:
    """The pull-through cache of every configured upstream."""

    def __init__(
        self,
        config: Config,
        store: Store,
        offload: Offload,
        session: aiohttp.ClientSession,
        shared: bool = False,
        replicas: Replicas | None = None,
    ) -> None:
        self.config = config
        #: other processes (workers) share the temp folder and the store: claim fetches
        self.shared = shared
        self._claiming = SingleFlight()
        #: other hosts serve the same store: a fetch is claimed in the store too
        self.replicas = replicas
        self.store = store
        self.offload = offload
        self.spool_dir = Path(config.temporary_registry_storage) / "spool"
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.upstreams = {
            name: Upstream(name, upstream, session)
            for name, upstream in config.proxy.upstreams.items()
        }
        self.stats = ProxyStats()
        self._manifest_flights = SingleFlight()
        self._blob_flights: dict[Digest, BlobFlight] = {}
        #: digests this process committed lately, noted before their flight goes: a
        #: request that found neither the blob (checked just before the commit) nor the
        #: flight (gone just after) looks at the store again instead of fetching twice
        self._committed: dict[Digest, float] = {}
        self._tasks: set[asyncio.Task] = set()
        #: set after each blob committed to the cache: the evictor checks the byte budget
        self.grew = asyncio.Event()

    @staticmethod
    def new_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            timeout=client_timeout(),
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=300),
        )

    def upstream(self, target: ProxyName) -> Upstream:
        try:
            return self.upstreams[target.upstream]
        except KeyError:
            raise NameUnknown(f"upstream {target.upstream!r} is not configured") from None

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        """Forget a finished task; its failure (a pull record the object store refused) is
        one log line, not asyncio's "exception was never retrieved" traceback."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.warning("background cache work failed: %s", " ".join(str(exc).split())[:300])

    async def drain(self) -> None:
        """Wait for background work (fetches, pull records) to finish, for offline users."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for flight in list(self._blob_flights.values()):
            flight.fail(FlightFailed("server shutting down"))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- manifests ---------------------------------------------------------------------

    async def _local(self, name: str, reference: str) -> StoredManifest | None:
        try:
            # small and cached: inline on disk
            return await self.offload.metadata(
                self.store.backend.local, self.store.get_manifest, name, reference
            )
        except (ManifestUnknown, NameUnknown):
            return None

    async def manifest(
        self, target: ProxyName, reference: str, accept: list[str]
    ) -> CachedManifest:
        """The manifest `reference` of `target`, from the cache or the upstream."""
        name = cache_name(target)
        self.upstream(target)
        if ":" in reference:
            result = await self._manifest_by_digest(target, name, Digest.parse(reference))
        else:
            result = await self._manifest_by_tag(target, name, reference)
            if not accepts(accept, result.stored.media_type):
                # the client cannot read what the tag points at: ask upstream in its terms
                result = await self._manifest_for_accept(target, name, reference, accept)
        self.stats.status(target.upstream, result.status)
        self._background(self.offload.run(self.store.mark_pulled, name))
        return result

    async def _manifest_by_digest(
        self, target: ProxyName, name: str, digest: Digest
    ) -> CachedManifest:
        local = await self._local(name, str(digest))
        if local is not None:
            return CachedManifest(local, HIT)
        key = ("digest", name, digest)
        if self._manifest_flights.joined(key):
            self.stats.count(self.stats.coalesced, target.upstream)
        try:
            stored = await self._manifest_flights.run(
                key, lambda: self._fetch_manifest(target, name, str(digest), None)
            )
        except UpstreamError as exc:
            raise _error_for(exc, ManifestUnknown, f"manifest {target.remote}@{digest}") from None
        return CachedManifest(stored, MISS)

    async def _manifest_by_tag(self, target: ProxyName, name: str, tag: str) -> CachedManifest:
        ttl = self.config.proxy.upstreams[target.upstream].tag_ttl
        age = await self.offload.metadata(self.store.backend.local, self.store.tag_age, name, tag)
        local = await self._local(name, tag) if age is not None else None
        if local is not None and age is not None and age < ttl:
            return CachedManifest(local, HIT)
        key = ("tag", name, tag)
        if self._manifest_flights.joined(key):
            self.stats.count(self.stats.coalesced, target.upstream)
        return await self._manifest_flights.run(
            key, lambda: self._revalidate_once(target, name, tag, local)
        )

    async def _revalidate_once(
        self, target: ProxyName, name: str, tag: str, local: StoredManifest | None
    ) -> CachedManifest:
        """`_revalidate`, by one worker at a time: the others wait for it, then read the tag
        it refreshed (and revalidate themselves only if it could not)."""
        if not self.shared:
            return await self._revalidate(target, name, tag, local)
        key = of_bytes(f"{name}:{tag}".encode()).hex
        claim = await self.offload.run(Claim.take, self.spool_dir / f"tag-{key}.claim")
        try:
            if not claim.holder:
                give_up = asyncio.get_running_loop().time() + CLAIM_WAIT
                while asyncio.get_running_loop().time() < give_up:
                    if not await self.offload.run(claim.holder_alive):
                        break
                    await asyncio.sleep(FOLLOW_POLL)
            # refreshed by another worker since this one found it stale?
            ttl = self.config.proxy.upstreams[target.upstream].tag_ttl
            age = await self.offload.metadata(
                self.store.backend.local, self.store.tag_age, name, tag
            )
            if age is not None and age < ttl:
                fresh = await self._local(name, tag)
                if fresh is not None:
                    return CachedManifest(fresh, HIT)
            if not claim.holder:
                local = await self._local(name, tag) if age is not None else None
            return await self._revalidate(target, name, tag, local)
        finally:
            claim.release()

    async def _revalidate(
        self, target: ProxyName, name: str, tag: str, local: StoredManifest | None
    ) -> CachedManifest:
        """One shared check of a stale tag: HEAD upstream, GET only when the digest moved."""
        upstream = self.upstream(target)
        try:
            if local is not None:
                resp = await upstream.manifest(target.remote, tag, method="HEAD")
                resp.release()
                if resp.status == 200:
                    remote_digest = resp.headers.get("Docker-Content-Digest")
                    if remote_digest == str(local.digest):
                        await self.offload.run(self.store.touch_tag, name, tag)
                        return CachedManifest(local, REVALIDATED)
                elif resp.status == 404:
                    await self.offload.run(self._forget_tag, name, tag)
                    raise UpstreamError("tag not found upstream", 404)
                elif resp.status != 405:
                    raise UpstreamError(f"HEAD answered {resp.status}", resp.status)
            stored = await self._fetch_manifest(target, name, tag, tag)
            return CachedManifest(stored, MISS if local is None else REVALIDATED)
        except UpstreamError as exc:
            if local is not None and not exc.not_found:
                log.warning("serving stale %s/%s:%s: %s", target.upstream, target.remote, tag, exc)
                return CachedManifest(local, STALE)
            raise _error_for(exc, ManifestUnknown, f"manifest {target.remote}:{tag}") from None

    def _forget_tag(self, name: str, tag: str) -> None:
        with contextlib.suppress(ManifestUnknown):
            self.store.delete_tag(name, tag)

    async def _manifest_for_accept(
        self, target: ProxyName, name: str, tag: str, accept: list[str]
    ) -> CachedManifest:
        key = ("accept", name, tag, tuple(accept))
        try:
            stored = await self._manifest_flights.run(
                key, lambda: self._fetch_manifest(target, name, tag, None, ", ".join(accept))
            )
        except UpstreamError as exc:
            raise _error_for(exc, ManifestUnknown, f"manifest {target.remote}:{tag}") from None
        return CachedManifest(stored, MISS)

    async def _fetch_manifest(
        self,
        target: ProxyName,
        name: str,
        reference: str,
        tag: str | None,
        accept: str = mf.ACCEPT_ALL,
    ) -> StoredManifest:
        """GET a manifest upstream, verify its digest, store it (and the tag)."""
        upstream = self.upstream(target)
        try:
            resp = await upstream.manifest(target.remote, reference, accept=accept)
            try:
                if resp.status != 200:
                    raise UpstreamError(f"GET manifest answered {resp.status}", resp.status)
                data = await _read_manifest_body(resp)
                content_type = resp.headers.get("Content-Type")
                header_digest = resp.headers.get("Docker-Content-Digest")
            finally:
                resp.release()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"reading manifest failed: {exc!r}") from None
        self.stats.count(self.stats.upstream_bytes, target.upstream, len(data))
        algorithm = reference.partition(":")[0] if ":" in reference else "sha256"
        small = len(data) <= mf.INLINE_LIMIT
        digest = (
            of_bytes(data, algorithm)
            if small
            else await self.offload.run(of_bytes, data, algorithm)
        )
        if ":" in reference and str(digest) != reference:
            raise UpstreamError(f"upstream manifest does not match {reference}")
        if (
            header_digest
            and header_digest.startswith(f"{algorithm}:")
            and header_digest != str(digest)
        ):
            raise UpstreamError("upstream manifest does not match its Docker-Content-Digest")
        try:
            parsed = (
                mf.parse(data, content_type)
                if small
                else await self.offload.run(mf.parse, data, content_type)
            )
        except ManifestInvalid as exc:
            raise UpstreamError(f"upstream sent an invalid manifest: {exc.message}") from None
        await self.offload.run(
            self.store.put_manifest, name, data, parsed, digest, tag, check_references=False
        )
        return StoredManifest(digest, parsed.media_type, data)

    # ---- blobs -------------------------------------------------------------------------

    async def blob(self, target: ProxyName, digest: Digest, may_relay: bool = True) -> CachedBlob:
        """A cached blob, or the flight that is fetching it (started if need be), or
        (`may_relay`) the replica that fetches it."""
        self.upstream(target)
        name = cache_name(target)
        if await self.offload.metadata(self.store.backend.local, self.store.has_blob, digest):
            self._background(self.offload.run(self.store.record_pull, name, digest))
            self.stats.status(target.upstream, HIT)
            return CachedBlob(digest, None, HIT)
        flight = self._blob_flights.get(digest)
        if flight is None and self.replicas is not None:
            holder = await self._replica_claim(digest, self.replicas)
            if holder is not None and may_relay:
                self.stats.count(self.stats.coalesced, target.upstream)
                self.stats.status(target.upstream, MISS)
                return CachedBlob(digest, None, MISS, elsewhere=holder)
            if holder is None and await self.offload.run(self.store.has_blob, digest):
                # the claim was free because a fetch (here or on another replica) just
                # committed the blob and let go of it: never fetch it a second time
                self._background(self.offload.run(self.replicas.release_blob, digest))
                self.stats.count(self.stats.coalesced, target.upstream)
                self.stats.status(target.upstream, HIT)
                return CachedBlob(digest, None, HIT)
            flight = self._blob_flights.get(digest)  # one may have started meanwhile
        if flight is None and digest in self._committed:
            if await self.offload.run(self.store.has_blob, digest):
                self.stats.count(self.stats.coalesced, target.upstream)
                self.stats.status(target.upstream, HIT)
                return CachedBlob(digest, None, HIT)
            flight = self._blob_flights.get(digest)
        if flight is not None:
            self.stats.count(self.stats.coalesced, target.upstream)
        elif self.shared:
            joined = self._claiming.joined(digest)
            claimed = await self._claiming.run(
                digest, lambda: self._claim_flight(target, name, digest)
            )
            if claimed is None:  # another worker fetched it meanwhile: it is in the store
                self.stats.count(self.stats.coalesced, target.upstream)
                self.stats.status(target.upstream, HIT)
                return CachedBlob(digest, None, HIT)
            flight = claimed
            if joined or not flight.owns_spool:
                self.stats.count(self.stats.coalesced, target.upstream)
        else:
            flight = await self._start_flight(target, name, digest)
        self.stats.status(target.upstream, MISS)
        return CachedBlob(digest, flight, MISS)

    async def _claim_flight(
        self, target: ProxyName, name: str, digest: Digest
    ) -> BlobFlight | None:
        """Several workers: fetch the blob under a claim, or follow the worker that holds
        it; None when that worker committed it before it could be followed."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + CLAIM_WAIT
        while loop.time() < give_up:
            claim = await self.offload.run(Claim.take, self.spool_dir / f"{digest.hex}.claim")
            if claim.holder:
                local = self.store.backend.local
                if await self.offload.metadata(local, self.store.has_blob, digest):
                    claim.release()  # committed by the worker that held it until now
                    return None
                return await self._start_flight(target, name, digest, claim)
            try:
                return await self._follow(claim, digest, give_up)
            except _HolderGone:
                continue  # it failed or died: claim it again (and maybe fetch it here)
        log.warning("no progress on the fetch of %s by another worker: fetching it", digest)
        return await self._start_flight(target, name, digest)

    async def _follow(
        self, claim: Claim | None, digest: Digest, give_up: float
    ) -> BlobFlight | None:
        """A flight reading another worker's spool, once that worker streams into it."""
        assert claim is not None
        try:
            while asyncio.get_running_loop().time() < give_up:
                state = await self.offload.run(claim.read)
                if state.get("state") == Claim.COMMITTED:
                    return None
                if state.get("state") == Claim.FAILED:
                    raise _HolderGone
                spool_name = state.get("spool")
                if state.get("state") == Claim.STREAMING and isinstance(spool_name, str):
                    spool = self.spool_dir / os.path.basename(spool_name)
                    try:
                        fd = await self.offload.run(os.open, spool, os.O_RDONLY)
                    except FileNotFoundError:  # committed or failed just now: look again
                        continue
                    flight = BlobFlight(digest, spool, fd)
                    flight.owns_spool = False
                    total = state.get("total")
                    flight.start_streaming(total if isinstance(total, int) else None)
                    self._blob_flights[digest] = flight
                    self._background(self._mirror(flight, claim))
                    claim = None  # the mirror releases it
                    return flight
                if not await self.offload.run(claim.holder_alive):
                    raise _HolderGone
                await asyncio.sleep(FOLLOW_POLL)
            raise _HolderGone
        finally:
            if claim is not None:
                claim.release()

    async def _mirror(self, flight: BlobFlight, claim: Claim) -> None:
        """Keep a followed flight in step with the holder's spool and last word."""
        handle = flight.attach()  # the spool stays open while the mirror reads its size
        try:
            while True:
                state, size, alive = await self.offload.run(claim.poll, handle.fileno())
                done = state.get("state")
                if size > flight.written:
                    flight.advance(size - flight.written)
                if done == Claim.COMMITTED:
                    flight.commit()
                    return
                if done == Claim.FAILED:
                    status = state.get("status")
                    reason = str(state.get("reason") or "the fetching worker failed")
                    flight.fail(FlightFailed(reason, status if isinstance(status, int) else None))
                    return
                if not alive:
                    flight.fail(FlightFailed("the worker fetching the blob stopped"))
                    return
                await asyncio.sleep(FOLLOW_POLL)
        except asyncio.CancelledError:
            flight.fail(FlightFailed("fetch cancelled"))
            raise
        except OSError as exc:
            flight.fail(FlightFailed(f"following another worker's fetch failed: {exc!r}"))
        finally:
            flight.detach(handle)
            claim.release()
            if self._blob_flights.get(flight.digest) is flight:
                del self._blob_flights[flight.digest]

    async def _start_flight(
        self, target: ProxyName, name: str, digest: Digest, claim: Claim | None = None
    ) -> BlobFlight:
        spool = self.spool_dir / f"{digest.hex[:16]}-{uuid.uuid4().hex}"
        fd = await self.offload.run(os.open, spool, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        existing = self._blob_flights.get(digest)
        if existing is not None:  # another request started one while we created the file
            await self.offload.run(os.close, fd)
            await self.offload.run(os.unlink, spool)
            if claim is not None:
                claim.release()
            return existing
        flight = BlobFlight(digest, spool, fd)
        if claim is not None:
            flight.claim = claim
            claim.publish(Claim.CONNECTING, spool=spool.name)
        self._blob_flights[digest] = flight
        # owned by the app, not the request: a client that disconnects does not stop it
        self._background(self._fetch_blob(target, name, flight))
        if self.replicas is not None:
            self._background(self._hold_replica_claim(flight, self.replicas))
        return flight

    def _note_committed(self, digest: Digest) -> None:
        now = asyncio.get_running_loop().time()
        if len(self._committed) >= COMMITTED_REMEMBERED:
            for old in [d for d, at in self._committed.items() if at < now - COMMITTED_FOR]:
                del self._committed[old]
            if len(self._committed) >= COMMITTED_REMEMBERED:
                self._committed.clear()
        self._committed[digest] = now

    async def _replica_claim(self, digest: Digest, replicas: Replicas) -> Replica | None:
        """The other replica fetching `digest`, or None (this one claimed it). A store
        that fails the claim fails nothing else: the blob is fetched here."""
        try:
            return await self.offload.run(replicas.claim_blob, digest)
        except Exception as exc:  # a claim only saves upstream traffic
            log.warning("claiming the fetch of %s failed: %s", digest, exc)
            return None

    async def _hold_replica_claim(self, flight: BlobFlight, replicas: Replicas) -> None:
        """Keep this replica's claim on a fetch alive while it runs; drop it after."""
        try:
            while flight.state in (flight.CONNECTING, flight.STREAMING):
                with contextlib.suppress(asyncio.TimeoutError, FlightFailed):
                    await asyncio.wait_for(flight.wait_done(), CLAIM_RENEW)
                if flight.state in (flight.CONNECTING, flight.STREAMING):
                    await self.offload.run(replicas.renew_blob, flight.digest)
        finally:
            await asyncio.shield(self.offload.run(replicas.release_blob, flight.digest))

    async def _fetch_blob(self, target: ProxyName, name: str, flight: BlobFlight) -> None:
        upstream = self.upstream(target)
        digest = flight.digest
        try:
            resp = await upstream.blob(target.remote, str(digest))
            taken = None
            try:
                if resp.status != 200:
                    raise FlightFailed(f"upstream answered {resp.status}", resp.status)
                flight.start_streaming(resp.content_length)
                if flight.claim is not None:
                    claim = flight.claim
                    claim.publish(Claim.STREAMING, spool=flight.spool.name, total=flight.total)
                taken = upstream.take_body(resp)
                if taken is not None:
                    await self._spool_direct(taken, flight, target.upstream)
                else:
                    await self._spool(resp, flight, target.upstream)
            finally:
                if taken is not None and taken.remaining:
                    resp.close()  # the body was read past aiohttp: never back to the pool
                else:
                    resp.release()
            if flight.total is not None and flight.written != flight.total:
                raise FlightFailed(f"upstream sent {flight.written} of {flight.total} bytes")
            await self.offload.run(self.store.commit_blob, name, flight.spool, digest)
            self._note_committed(digest)
            if flight.claim is not None:
                flight.claim.publish(Claim.COMMITTED, size=flight.written)
            flight.commit()
            self.grew.set()
        except UpstreamError as exc:
            self._fail(flight, FlightFailed(str(exc), exc.status))
        except FlightFailed as exc:
            self._fail(flight, exc)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            stored = object_store_error(exc)
            reason = stored.message if stored else f"upstream transfer failed: {exc!r}"
            self._fail(flight, FlightFailed(reason, stored=stored is not None))
        except asyncio.CancelledError:
            self._fail(flight, FlightFailed("fetch cancelled"))
            raise
        except Exception as exc:
            # anything else (the cache's object store failing the commit among them) fails
            # the flight too: its readers wait for a commit that will never come otherwise
            stored = object_store_error(exc)
            reason = stored.message if stored else f"caching the blob failed: {exc!r}"
            self._fail(flight, FlightFailed(reason, stored=stored is not None))
        finally:
            if self._blob_flights.get(digest) is flight:
                del self._blob_flights[digest]
            if flight.claim is not None:
                if flight.state == flight.FAILED and flight.error is not None:
                    error = flight.error
                    flight.claim.publish(Claim.FAILED, reason=str(error), status=error.status)
                flight.claim.release()

    async def _spool(self, resp: aiohttp.ClientResponse, flight: BlobFlight, upstream: str) -> None:
        """Stream the body into the spool while hashing (`storage.intake`)."""
        hasher = flight.digest.hasher()
        sink = flight.sink(hasher, self._counter(upstream))
        received = 0

        def check(size: int) -> None:
            nonlocal received
            received += size
            if flight.total is not None and received > flight.total:
                raise FlightFailed("upstream sent more bytes than announced")

        await take_in(resp.content.iter_any(), sink, self.offload, check)
        if hasher.hexdigest() != flight.digest.hex:
            raise FlightFailed("upstream blob does not match its digest")

    async def _spool_direct(self, taken: TakenBody, flight: BlobFlight, upstream: str) -> None:
        """The body read from the socket by `sockbody.pump`: one thread reads (and
        decrypts, from a TLS upstream), one writes the spool, one hashes; readers are told
        of each block as it lands."""
        hasher = flight.digest.hasher()
        sink = flight.sink(hasher, self._counter(upstream))
        try:
            # cancelled: wait for the pump, never close the spool under a running write
            await take_in_direct(
                taken,
                sink,
                self.offload,
                timeout=READ_TIMEOUT,
                min_rate=0,
                position=flight.written,
                wait_when_cancelled=True,
            )
        except (BodyTimeout, BodyTruncated) as exc:
            raise FlightFailed(f"upstream transfer failed: {exc}") from None
        if hasher.hexdigest() != flight.digest.hex:
            raise FlightFailed("upstream blob does not match its digest")

    def _counter(self, upstream: str) -> Callable[[int], None]:
        """Counts bytes fetched from `upstream` as they land in a spool."""
        return functools.partial(self.stats.count, self.stats.upstream_bytes, upstream)

    def _fail(self, flight: BlobFlight, error: FlightFailed) -> None:
        log.warning("fetch of %s failed: %s", flight.digest, error)
        flight.fail(error)

    def flight_error(self, exc: FlightFailed, what: str) -> RegistryError:
        if exc.stored:
            return StorageUnavailable(f"{what}: {exc}")
        return _error_for(UpstreamError(str(exc), exc.status), BlobUnknown, what)

    async def blob_head(self, target: ProxyName, digest: Digest) -> int | None:
        """Size of an uncached blob from an upstream HEAD (nothing is fetched)."""
        upstream = self.upstream(target)
        try:
            resp = await upstream.request(
                "HEAD", f"/v2/{target.remote}/blobs/{digest}", upstream.scope(target.remote)
            )
            resp.release()
        except UpstreamError as exc:
            raise _error_for(exc, BlobUnknown, f"blob {digest}") from None
        if resp.status != 200:
            raise _error_for(UpstreamError("", resp.status), BlobUnknown, f"blob {digest}")
        return resp.content_length

    # ---- listings ----------------------------------------------------------------------

    async def tags(
        self, target: ProxyName, params: dict[str, str]
    ) -> tuple[list[str], str | None, str]:
        """One page of the upstream's tag list (`n`/`last` passed on), the query of its next
        page, and the cache status; the cached tags (STALE) when the upstream cannot answer."""
        upstream = self.upstream(target)
        try:
            body, headers = await upstream.get_json(
                f"/v2/{target.remote}/tags/list", target.remote, params or None
            )
        except UpstreamError as exc:
            if exc.not_found:
                raise NameUnknown(f"{target.remote} not found upstream") from None
            cached = await self.offload.run(self.store.tags, cache_name(target), True)
            if not cached:
                raise _error_for(exc, NameUnknown, target.remote) from None
            log.warning("serving stale tags of %s/%s: %s", target.upstream, target.remote, exc)
            self.stats.status(target.upstream, STALE)
            return cached, None, STALE
        tags = body.get("tags") if isinstance(body, dict) else None
        match = _LINK_RE.search(headers.get("Link", ""))
        next_query = urlsplit(match.group(1)).query if match else None
        self.stats.status(target.upstream, MISS)
        return [t for t in (tags or []) if isinstance(t, str)], next_query or None, MISS

    async def referrers(self, target: ProxyName, digest: Digest) -> tuple[list[dict], str]:
        """The upstream's referrers of `digest`, or the cached ones (STALE) on failure."""
        upstream = self.upstream(target)
        try:
            body, _ = await upstream.get_json(
                f"/v2/{target.remote}/referrers/{digest}", target.remote
            )
        except UpstreamError:
            found = await self.offload.run(self.store.referrers, cache_name(target), digest)
            return found, STALE
        manifests = body.get("manifests") if isinstance(body, dict) else None
        return [d for d in (manifests or []) if isinstance(d, dict)], MISS
