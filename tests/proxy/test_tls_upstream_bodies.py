"""Large blob bodies from a TLS upstream: read and decrypted by a pump thread
(`sockbody._TlsReader`, on a connection lent by `asyncio_tls.take`), written to the
spool (past the page cache from `DIRECT_FROM` on), and sent to readers at the head from
the flight's window in memory.

The upstream is `TlsFakeUpstream` (the fault-injecting fake over TLS with a test CA).
Every case checks the bytes the client got against what the upstream holds, and that
the window's memory is given back.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest

from regproxy.proxy import cache as cache_mod
from regproxy.proxy import flights
from regproxy.server import proxied as proxied_mod
from regproxy.storage.fs import DirectWriter
from tests.proxy.test_faults import BODY_FAULTS, SIZE, assert_recovers, faulty_body, set_faults
from tests.support.certs import TestCA
from tests.support.proxy import Proxy, ProxyFactory, assert_cut_short, assert_proxied, wait_until
from tests.support.tls_upstream import TlsFakeUpstream

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, tls_fake: TlsFakeUpstream, ca: TestCA) -> Proxy:
    """regproxy with the TLS fake as its one upstream, `p/fake/…`."""
    upstream = {"url": tls_fake.url, "ca_file": str(ca.ca_file), "tag_ttl": 0}
    return await make_proxy(upstreams={"fake": upstream})


@pytest.fixture
def window_sends(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Bytes readers were handed from flights' windows (memory), one entry per take."""
    taken: list[int] = []
    original = flights.BlobFlight._from_window

    def spy(self: flights.BlobFlight, pos: int, limit: int) -> list[memoryview]:
        views = original(self, pos, limit)
        if views:
            taken.append(sum(len(view) for view in views))
        return views

    monkeypatch.setattr(flights.BlobFlight, "_from_window", spy)
    yield taken


async def assert_window_given_back() -> None:
    """Every flight's window memory returns to the budget once its readers are done."""
    await wait_until(lambda: flights.windows.used == 0, what="the windows' memory back")


async def test_a_large_blob_is_decrypted_by_the_pump_and_sent_from_memory(
    tls_fake: TlsFakeUpstream,
    proxy: Proxy,
    tls_reads: list[int],
    window_sends: list[int],
) -> None:
    data = os.urandom(5 * 1024 * 1024 + 777)
    digest = tls_fake.add_blob("a", data)
    pulled = await proxy.blob("a", digest)
    assert_proxied(pulled)
    assert pulled.body == data
    assert pulled.headers["X-Cache-Status"] == "MISS"
    # the pump read (nearly) all of it: aiohttp had at most a little buffered first
    assert sum(tls_reads) > len(data) - 1024 * 1024, (sum(tls_reads), len(data))
    assert sum(window_sends) > 0, "no reader was sent bytes from the window"
    await wait_until(lambda: proxy.is_cached(digest), what="the blob to be committed")
    again = await proxy.blob("a", digest)
    assert again.body == data and again.headers["X-Cache-Status"] == "HIT"
    assert tls_fake.count("GET", "blob") == 1
    await assert_window_given_back()


async def test_spool_bytes_past_direct_from_go_past_the_page_cache(
    tls_fake: TlsFakeUpstream, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `DIRECT_FROM` at 0 every whole block goes by `O_DIRECT` (tmp_path's
    filesystem takes it here); the blob is exact and commits as usual."""
    monkeypatch.setattr(cache_mod, "DIRECT_FROM", 0)
    direct: list[int] = []
    original = DirectWriter.write

    def spy(self: DirectWriter, data: memoryview) -> int:
        went_direct = self._direct >= 0 and self.offset >= self.direct_from
        result = original(self, data)
        if went_direct and self._direct >= 0:
            direct.append(len(data))
        return result

    monkeypatch.setattr(DirectWriter, "write", spy)
    data = os.urandom(4 * 1024 * 1024)
    digest = tls_fake.add_blob("a", data)
    pulled = await proxy.blob("a", digest)
    assert pulled.body == data
    assert sum(direct) >= 2 * 1024 * 1024, direct
    await wait_until(lambda: proxy.is_cached(digest), what="the blob to be committed")
    stored = proxy.config.proxy_storage / "blobs" / "sha256" / digest[7:9] / digest[7:]
    assert stored.read_bytes() == data
    await assert_window_given_back()


async def test_concurrent_and_late_readers_get_every_byte(
    tls_fake: TlsFakeUpstream,
    proxy: Proxy,
    monkeypatch: pytest.MonkeyPatch,
    window_sends: list[int],
) -> None:
    """Readers at the head take the window; one that joins after the window moved on
    reads the spool from the start (written by `O_DIRECT` here: `DIRECT_FROM` at 0). One
    upstream fetch for all of them."""
    monkeypatch.setattr(flights, "WINDOW", 2 * 1024 * 1024)
    monkeypatch.setattr(cache_mod, "DIRECT_FROM", 0)
    spans: list[tuple[int, int]] = []
    original = proxied_mod.send_span

    async def spy(request: Any, response: Any, handle: Any, digest: Any, *span: Any) -> None:
        spans.append((span[0], span[1]))
        await original(request, response, handle, digest, *span)

    monkeypatch.setattr(proxied_mod, "send_span", spy)
    data = os.urandom(8 * 1024 * 1024)
    digest = tls_fake.add_blob("a", data)
    set_faults(tls_fake, {"delay": 0.1, "chunk_delay": 0.002})
    first = [asyncio.ensure_future(proxy.blob("a", digest)) for _ in range(3)]
    await wait_until(
        lambda: tls_fake.bytes_sent("blob") > 5 * 1024 * 1024, what="the window to move on"
    )
    # the first readers took from the spool at most what aiohttp had read before the pump
    head = max((end for start, end in spans if start == 0), default=0)
    assert head < 1024 * 1024, spans
    late = await proxy.blob("a", digest)
    for pulled in [*await asyncio.gather(*first), late]:
        assert_proxied(pulled)
        assert pulled.body == data
    assert sum(window_sends) >= 3 * 4 * 1024 * 1024, "the first readers were not sent memory"
    # the late reader read the spool from 0 to where the window was by then
    assert any(start == 0 and end > 2 * 1024 * 1024 for start, end in spans), spans
    assert tls_fake.count("GET", "blob") == 1
    await assert_window_given_back()


@pytest.mark.parametrize("fault", sorted(BODY_FAULTS))
async def test_a_broken_tls_body_is_never_a_complete_one(
    tls_fake: TlsFakeUpstream, proxy: Proxy, fault: str, tls_reads: list[int]
) -> None:
    """Cut short (the upstream closes with close_notify), reset, or the wrong bytes: the
    client's connection is cut before the last byte, nothing is cached, and the next pull
    after the fault is cleared gets the blob."""
    data = os.urandom(SIZE)
    digest = tls_fake.add_blob("a", data)
    set_faults(tls_fake, {**BODY_FAULTS[fault], "delay": 0.1, "chunk_delay": 0.002})
    pulls = await asyncio.gather(*(proxy.blob("a", digest) for _ in range(2)))
    for pulled in pulls:
        assert_cut_short(pulled, faulty_body(fault, data))
    assert tls_reads, "the body did not go through the TLS pump"
    await assert_recovers(tls_fake, proxy, digest, data)  # type: ignore[arg-type]
    await assert_window_given_back()


async def test_a_tiny_window_budget_changes_nothing_but_memory(
    tls_fake: TlsFakeUpstream, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the budget, bytes reach readers through the spool only: still exact."""
    budget = flights.WindowBudget(1024 * 1024)
    monkeypatch.setattr(flights, "windows", budget)
    blobs = {
        tls_fake.add_blob("a", data): data for data in (os.urandom(3 << 20), os.urandom(2 << 20))
    }
    pulls = await asyncio.gather(*(proxy.blob("a", digest) for digest in blobs))
    for pulled, data in zip(pulls, blobs.values(), strict=True):
        assert pulled.body == data
    await wait_until(lambda: budget.used == 0, what="the budget given back")
