"""Large blob bodies from a TLS upstream, read and decrypted by a pump thread
(`sockbody._TlsReader`, on a connection lent by `asyncio_tls.take`) into the spool that
every reader follows.

The upstream is `TlsFakeUpstream` (the fault-injecting fake over TLS with a test CA).
Every case checks the bytes the client got against what the upstream holds.
"""

from __future__ import annotations

import asyncio
import os

import pytest

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


async def test_a_large_blob_is_decrypted_by_the_pump(
    tls_fake: TlsFakeUpstream, proxy: Proxy, tls_reads: list[int]
) -> None:
    data = os.urandom(5 * 1024 * 1024 + 777)
    digest = tls_fake.add_blob("a", data)
    pulled = await proxy.blob("a", digest)
    assert_proxied(pulled)
    assert pulled.body == data
    assert pulled.headers["X-Cache-Status"] == "MISS"
    # the pump read (nearly) all of it: aiohttp had at most a little buffered first
    assert sum(tls_reads) > len(data) - 1024 * 1024, (sum(tls_reads), len(data))
    await wait_until(lambda: proxy.is_cached(digest), what="the blob to be committed")
    again = await proxy.blob("a", digest)
    assert again.body == data and again.headers["X-Cache-Status"] == "HIT"
    assert tls_fake.count("GET", "blob") == 1


async def test_concurrent_and_late_readers_get_every_byte(
    tls_fake: TlsFakeUpstream, proxy: Proxy, tls_reads: list[int]
) -> None:
    """Readers that came at once and one that joins halfway all follow the spool the
    pump fills; one upstream fetch for all of them."""
    data = os.urandom(8 * 1024 * 1024)
    digest = tls_fake.add_blob("a", data)
    set_faults(tls_fake, {"delay": 0.1, "chunk_delay": 0.002})
    first = [asyncio.ensure_future(proxy.blob("a", digest)) for _ in range(3)]
    await wait_until(
        lambda: tls_fake.bytes_sent("blob") > 4 * 1024 * 1024, what="the fetch to be halfway"
    )
    late = await proxy.blob("a", digest)
    for pulled in [*await asyncio.gather(*first), late]:
        assert_proxied(pulled)
        assert pulled.body == data
    assert tls_fake.count("GET", "blob") == 1
    assert sum(tls_reads) > len(data) - 1024 * 1024


@pytest.mark.parametrize("fault", sorted(BODY_FAULTS))
async def test_a_broken_tls_body_is_never_a_complete_one(
    tls_fake: TlsFakeUpstream, proxy: Proxy, fault: str, tls_reads: list[int]
) -> None:
    """Cut short (the upstream closes with close_notify), reset, or the wrong bytes: the
    clients' connections are cut before the last byte, nothing is cached, and the next
    pull after the fault is cleared gets the blob."""
    data = os.urandom(SIZE)
    digest = tls_fake.add_blob("a", data)
    set_faults(tls_fake, {**BODY_FAULTS[fault], "delay": 0.1, "chunk_delay": 0.002})
    pulls = await asyncio.gather(*(proxy.blob("a", digest) for _ in range(2)))
    for pulled in pulls:
        assert_cut_short(pulled, faulty_body(fault, data))
    assert tls_reads, "the body did not go through the TLS pump"
    await assert_recovers(tls_fake, proxy, digest, data)  # type: ignore[arg-type]
