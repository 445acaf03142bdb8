"""Pull-through across replicas: concurrent cold pulls of one blob through two replicas
behind HAProxy cost the upstream one transfer (issue 14: ≤ 1.05× the blob's size).

The upstream is `FakeUpstream`, a real HTTP registry on loopback that counts every body
byte it sends; its first byte is held back 0.3 s so that all eight pulls are in flight
(four on each replica, by round-robin) before anything arrives. Each replica has its
own spool folder: only a claim in the shared store can keep the second one from
fetching the blob itself.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.proxy import Pulled, fetch
from tests.support.replicas import REPLICA_HEADER, Cluster, S3Store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MiB = 1024 * 1024
PULLS = 8


@pytest.fixture
def proxy_cluster(
    fake: FakeUpstream, fresh_store: str | S3Store, tmp_path: Path
) -> Iterator[Cluster]:
    """Two replicas caching `fake` (as `/v2/p/fake/…`), behind HAProxy. Started from
    this (the event loop's) thread: the fake upstream is idle meanwhile."""
    upstream = f'[proxy.upstreams.fake]\nurl = {json.dumps(fake.url)}\ntag_ttl = "1s"\n'
    with Cluster(tmp_path / "cluster", count=2, store=fresh_store, extra_config=upstream) as c:
        yield c


async def test_eight_cold_pulls_through_two_replicas_cost_one_transfer(
    fake: FakeUpstream, proxy_cluster: Cluster
) -> None:
    data = os.urandom(16 * MiB + 1)
    digest = fake.add_blob("team/app", data)
    fake.faults.delay = 0.3  # the eight pulls all arrive before the first byte
    fake.faults.chunk_delay = 0.001
    path = f"{proxy_cluster.url}/v2/p/fake/team/app/blobs/{digest}"
    # one connection per pull: HAProxy deals them out to r1, r2, r1, r2, …
    connector = aiohttp.TCPConnector(limit=PULLS, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        pulls: list[Pulled] = await asyncio.gather(
            *(fetch(session, "GET", path, timeout=60) for _ in range(PULLS))  # type: ignore[arg-type]
        )
    for pulled in pulls:
        assert pulled.complete and pulled.status == 200, (pulled.status, pulled.error)
        assert pulled.body == data
    answered = [p.headers[REPLICA_HEADER] for p in pulls]
    assert sorted(answered) == sorted(proxy_cluster.names * (PULLS // 2)), answered
    sent = fake.bytes_sent("blob")
    assert sent <= 1.05 * len(data), (
        f"the upstream sent {sent / len(data):.2f}x the blob in "
        f"{fake.count('GET', 'blob')} GETs for {PULLS} pulls through {answered}"
    )

    # and it is cached for both: a second round costs the upstream nothing
    fake.reset_counts()
    async with aiohttp.ClientSession() as session:
        for replica in proxy_cluster.replicas:
            url = f"{replica.url}/v2/p/fake/team/app/blobs/{digest}"
            again = await fetch(session, "GET", url, timeout=60)  # type: ignore[arg-type]
            assert again.status == 200 and again.body == data
    assert fake.count("GET", "blob") == 0
