"""Driving an in-process regproxy that proxies the fault-injecting `FakeUpstream`.

`fetch` reads a whole answer with a timeout and records a broken body instead of raising,
so a test about upstream faults never hangs; `Proxy` wraps one running proxy with the
paths and cache checks the proxy tests use.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict, CIMultiDictProxy

from regproxy.config import Config

CACHE_STATUS = "X-Cache-Status"
CACHE_STATUSES = frozenset({"HIT", "MISS", "REVALIDATED", "STALE"})
#: upper bound for one request through the proxy in these tests (seconds)
REQUEST_TIMEOUT = 15.0


@dataclass
class Pulled:
    """A response read to the end (or to the point where it broke)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    error: BaseException | None = None

    @property
    def cache_status(self) -> str | None:
        return self.headers.get(CACHE_STATUS)

    @property
    def complete(self) -> bool:
        return self.error is None

    def json(self) -> Any:
        return json.loads(self.body)

    def oci_code(self) -> str | None:
        """The first OCI error code of the body, None when it is not an OCI error."""
        try:
            return self.json()["errors"][0]["code"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None


async def fetch(
    client: TestClient,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    timeout: float = REQUEST_TIMEOUT,
) -> Pulled:
    """Send one request and read the whole body; a broken body is recorded, not raised."""

    async def run() -> Pulled:
        async with client.request(method, path, headers=headers) as resp:
            chunks: list[bytes] = []
            try:
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    chunks.append(chunk)
            except (aiohttp.ClientError, ConnectionError) as exc:
                return Pulled(resp.status, resp.headers, b"".join(chunks), exc)
            return Pulled(resp.status, resp.headers, b"".join(chunks))

    try:
        return await asyncio.wait_for(run(), timeout)
    except (aiohttp.ClientError, ConnectionError) as exc:
        # the connection broke before a status line arrived
        return Pulled(0, CIMultiDictProxy(CIMultiDict()), b"", exc)


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """Poll `predicate` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def blob_file(root: Path, digest: str) -> Path:
    """Where a store rooted at `root` keeps a blob (see `regproxy.storage.layout`)."""
    algorithm, _, hexpart = digest.partition(":")
    return root / "blobs" / algorithm / hexpart[:2] / hexpart


def stored_blobs(root: Path) -> dict[str, int]:
    """Digest → size of every blob file under a store root."""
    found: dict[str, int] = {}
    base = root / "blobs"
    if not base.is_dir():
        return found
    for path in base.glob("*/*/*"):
        if path.is_file() and not path.name.startswith("."):
            found[f"{path.parent.parent.name}:{path.name}"] = path.stat().st_size
    return found


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Relative path → (size, mtime_ns) of every file under `root`."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


@dataclass
class Proxy:
    """A running regproxy and its configuration."""

    client: TestClient
    config: Config
    upstream_name: str = "fake"
    prefix: str = "p"
    extra: dict[str, Any] = field(default_factory=dict)

    def path(self, repo: str, kind: str, ref: str, upstream: str | None = None) -> str:
        """`/v2/p/<upstream>/<repo>/<kind>/<ref>`."""
        return f"/v2/{self.prefix}/{upstream or self.upstream_name}/{repo}/{kind}/{ref}"

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Pulled:
        return await fetch(self.client, "GET", path, headers)

    async def head(self, path: str, headers: dict[str, str] | None = None) -> Pulled:
        return await fetch(self.client, "HEAD", path, headers)

    async def manifest(self, repo: str, ref: str, accept: str | None = None) -> Pulled:
        headers = {"Accept": accept} if accept else {"Accept": ALL_MANIFEST_TYPES}
        return await self.get(self.path(repo, "manifests", ref), headers)

    async def blob(self, repo: str, digest: str, headers: dict[str, str] | None = None) -> Pulled:
        return await self.get(self.path(repo, "blobs", digest), headers)

    def cached_blobs(self) -> dict[str, int]:
        return stored_blobs(self.config.proxy_storage)

    def is_cached(self, digest: str) -> bool:
        return blob_file(self.config.proxy_storage, digest).is_file()


ALL_MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


class ProxyFactory(Protocol):
    def __call__(
        self,
        *,
        upstream: dict[str, Any] | None = None,
        upstreams: dict[str, dict[str, Any]] | None = None,
        proxy: dict[str, Any] | None = None,
        **top: Any,
    ) -> Awaitable[Proxy]: ...


def assert_proxied(pulled: Pulled) -> None:
    """A successful proxied answer carries a valid cache status."""
    assert pulled.status in (200, 206), (pulled.status, pulled.body[:300])
    assert pulled.cache_status in CACHE_STATUSES, dict(pulled.headers)


def assert_cut_short(pulled: Pulled, sent: bytes) -> None:
    """An upstream body that went wrong after the proxy had answered 200 reaches the
    client as a broken connection, never as a complete body: the proxy holds back the
    last byte until the digest is verified. `sent` is what the upstream sent."""
    assert pulled.status == 200, (pulled.status, pulled.body[:300])
    assert not pulled.complete, (
        f"a complete-looking body ({len(pulled.body)} of {len(sent)} bytes) "
        "although the upstream's body was faulty"
    )
    assert len(pulled.body) < len(sent)
    assert pulled.body == sent[: len(pulled.body)], "the proxy changed the bytes it relayed"


def assert_upstream_error(pulled: Pulled, status: int, code: str) -> None:
    """The proxy answered `status` with the OCI error `code` (and a complete body)."""
    assert pulled.status == status, (pulled.status, pulled.body[:300])
    assert pulled.complete, pulled.error
    assert pulled.oci_code() == code, pulled.body[:300]
