"""Blob misses: one upstream fetch per digest, streamed to every requester."""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.proxy import Proxy, assert_proxied, wait_until

pytestmark = pytest.mark.timeout(30)

MiB = 1024 * 1024


async def test_concurrent_cold_pulls_share_one_upstream_get(
    fake: FakeUpstream, proxy: Proxy
) -> None:
    data = os.urandom(4 * MiB)
    digest = fake.add_blob("team/app", data)
    fake.faults.delay = 0.2  # all eight requests arrive before the first byte
    pulls = await asyncio.gather(*(proxy.blob("team/app", digest) for _ in range(8)))
    for pulled in pulls:
        assert_proxied(pulled)
        assert pulled.body == data
        assert pulled.headers["Docker-Content-Digest"] == digest
    assert fake.count("GET", "blob") == 1
    assert fake.bytes_sent("blob") == len(data)
    statuses = sorted(p.cache_status or "" for p in pulls)
    assert "MISS" in statuses, statuses
    await wait_until(lambda: proxy.is_cached(digest), what="the blob to be committed")
    warm = await proxy.blob("team/app", digest)
    assert warm.cache_status == "HIT"
    assert warm.body == data
    assert fake.count("GET", "blob") == 1


async def test_late_joiners_stream_from_the_spool(fake: FakeUpstream, proxy: Proxy) -> None:
    data = os.urandom(2 * MiB)
    digest = fake.add_blob("a", data)
    fake.faults.chunk_delay = 0.02  # 32 chunks of 64 KiB: about 0.7 s upstream
    first = asyncio.create_task(proxy.blob("a", digest))
    await wait_until(lambda: fake.bytes_sent("blob") >= 512 * 1024, what="upstream progress")
    assert fake.bytes_sent("blob") < len(data), "the upstream finished before the joiners came"
    others = await asyncio.gather(*(proxy.blob("a", digest) for _ in range(7)))
    for pulled in [await first, *others]:
        assert_proxied(pulled)
        assert pulled.body == data
    assert fake.count("GET", "blob") == 1
    assert fake.bytes_sent("blob") == len(data)


async def test_first_pull_streams_before_the_upstream_finishes(
    fake: FakeUpstream, proxy: Proxy
) -> None:
    """The first client gets bytes while the upstream is still sending (not store-then-serve)."""
    data = os.urandom(4 * MiB)
    digest = fake.add_blob("a", data)
    fake.faults.chunk_delay = 0.02  # 64 chunks of 64 KiB: about 1.3 s upstream
    async with proxy.client.get(proxy.path("a", "blobs", digest)) as resp:
        assert resp.status == 200
        assert resp.headers.get("Content-Length") == str(len(data))
        head = await asyncio.wait_for(resp.content.readexactly(64 * 1024), 5)
        assert fake.bytes_sent("blob") < len(data), "the proxy waited for the whole blob"
        rest = await asyncio.wait_for(resp.content.read(), 10)
    assert head + rest == data


async def test_a_client_that_disconnects_does_not_stop_the_fetch(
    fake: FakeUpstream, proxy: Proxy
) -> None:
    data = os.urandom(2 * MiB)
    digest = fake.add_blob("a", data)
    fake.faults.chunk_delay = 0.02
    resp = await proxy.client.get(proxy.path("a", "blobs", digest))
    assert resp.status == 200
    await asyncio.wait_for(resp.content.readexactly(64 * 1024), 5)
    resp.close()  # the only requester goes away mid-flight
    await wait_until(lambda: proxy.is_cached(digest), what="the blob to be committed")
    assert fake.bytes_sent("blob") == len(data)
    warm = await proxy.blob("a", digest)
    assert warm.cache_status == "HIT"
    assert warm.body == data
    assert fake.count("GET", "blob") == 1


@pytest.mark.parametrize(("start", "end"), [(100, 199), (MiB - 10, MiB + 9), (2 * MiB - 5, None)])
async def test_range_request_during_a_miss(
    fake: FakeUpstream, proxy: Proxy, start: int, end: int | None
) -> None:
    data = os.urandom(2 * MiB)
    digest = fake.add_blob("a", data)
    fake.faults.chunk_delay = 0.01
    spec = f"bytes={start}-{'' if end is None else end}"
    pulled = await proxy.blob("a", digest, {"Range": spec})
    assert_proxied(pulled)
    if pulled.status == 206:
        assert pulled.body == data[start : None if end is None else end + 1]
        last = len(data) - 1 if end is None else end
        assert pulled.headers["Content-Range"] == f"bytes {start}-{last}/{len(data)}"
    else:  # ignoring Range is legal HTTP, as long as the body is right
        assert pulled.body == data
    await wait_until(lambda: proxy.is_cached(digest), what="the blob to be committed")
    assert fake.count("GET", "blob") == 1
