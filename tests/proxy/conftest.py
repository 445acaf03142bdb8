"""Fixtures for the proxy tests: regproxy in front of the fault-injecting `fake` upstream.

`make_proxy(...)` starts an in-process regproxy (a real server on 127.0.0.1:0)
whose only upstream, `fake`, is the `fake` fixture of `tests/conftest.py`; keyword
arguments adjust the upstream table, the `[proxy]` table and top-level keys.
`tls_fake` is the same fake over TLS (certificate from `ca`); `tls_reads` records what
the TLS pump (`sockbody._TlsReader`) read.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from regproxy import sockbody
from tests.support.certs import TestCA
from tests.support.fake_upstream import FakeUpstream
from tests.support.inprocess import make_config, start_client
from tests.support.proxy import Proxy, ProxyFactory
from tests.support.tls_upstream import TlsFakeUpstream, running


@pytest.fixture
async def make_proxy(tmp_path: Path, fake: FakeUpstream) -> AsyncIterator[ProxyFactory]:
    """Start regproxy instances proxying `fake`; all are closed at teardown.

    `upstream` adds keys to `[proxy.upstreams.fake]` (defaults: the fake's URL,
    `tag_ttl = "2s"`); `upstreams` replaces the whole upstream table; `proxy`
    adds keys to `[proxy]`; other keywords are top-level keys.
    """
    started: list[TestClient] = []
    numbers = itertools.count(1)

    async def factory(
        *,
        upstream: dict[str, Any] | None = None,
        upstreams: dict[str, dict[str, Any]] | None = None,
        proxy: dict[str, Any] | None = None,
        **top: Any,
    ) -> Proxy:
        base = tmp_path / f"regproxy{next(numbers)}"
        base.mkdir()
        table = upstreams or {"fake": {"url": fake.url, "tag_ttl": "2s", **(upstream or {})}}
        config = make_config(base, proxy={"upstreams": table, **(proxy or {})}, **top)
        client = await start_client(config)
        started.append(client)
        return Proxy(client, config, upstream_name=next(iter(table)), extra=top)

    try:
        yield factory
    finally:
        for client in started:
            await client.close()


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> Proxy:
    """regproxy proxying the fake as `p/fake/…` with `tag_ttl = 2s`."""
    return await make_proxy()


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    """A throw-away CA for TLS upstreams."""
    return TestCA(tmp_path / "ca")


@pytest.fixture
async def tls_fake(ca: TestCA, tmp_path: Path) -> AsyncIterator[TlsFakeUpstream]:
    """The fault-injecting fake over TLS, its certificate from `ca`."""
    async for upstream in running(TlsFakeUpstream(ca, tmp_path / "tls")):
        yield upstream


@pytest.fixture
def tls_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The sizes of the buffers the TLS pump filled (empty: no body went that way)."""
    filled: list[int] = []
    original = sockbody._TlsReader.fill_from

    def spy(self: Any, fd: int, view: memoryview, pace: Any, stop: Any) -> int:
        count = original(self, fd, view, pace, stop)
        filled.append(count)
        return count

    monkeypatch.setattr(sockbody._TlsReader, "fill_from", spy)
    yield filled
