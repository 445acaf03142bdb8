"""The pull-through cache across workers: one upstream transfer per blob however the pulls
are spread, followers streaming the fetching worker's spool with the same guarantees, and
one revalidation of a stale tag for all workers.

Two apps built as workers 1 and 2 of one `serve` share the temp folder and the stores in
this process; `fake` is the fault-injecting upstream.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from tests.support.fake_upstream import FakeUpstream
from tests.support.inprocess import make_config
from tests.support.proxy import Pulled, fetch
from tests.workers.helpers import start_workers, wait_until

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024


@pytest.fixture
async def workers(tmp_path: Path, fake: FakeUpstream) -> AsyncIterator[list[TestClient]]:
    upstreams = {"fake": {"url": fake.url, "tag_ttl": "1s"}}
    config = make_config(tmp_path, proxy={"upstreams": upstreams})
    clients = await start_workers(config, 2)
    try:
        yield clients
    finally:
        for client in clients:
            await client.close()


def blob_path(repo: str, digest: str) -> str:
    return f"/v2/p/fake/{repo}/blobs/{digest}"


async def pull_everywhere(workers: list[TestClient], path: str, count: int = 8) -> list[Pulled]:
    """`count` concurrent GETs, alternating between the workers."""
    return await asyncio.gather(
        *(fetch(workers[i % len(workers)], "GET", path) for i in range(count))
    )


async def test_eight_cold_pulls_through_two_workers_cost_one_transfer(
    fake: FakeUpstream, workers: list[TestClient], tmp_path: Path
) -> None:
    data = os.urandom(8 * MiB + 123)
    digest = fake.add_blob("team/app", data)
    fake.faults.delay = 0.2  # every pull arrives before the first byte
    fake.faults.chunk_delay = 0.002  # …and the transfer takes a while: followers stream
    pulls = await pull_everywhere(workers, blob_path("team/app", digest))
    for pulled in pulls:
        assert pulled.complete and pulled.status == 200, pulled.error
        assert pulled.body == data
        assert pulled.headers["Docker-Content-Digest"] == digest
        assert pulled.cache_status == "MISS"  # streamed while fetched, on both workers
    assert fake.count("GET", "blob") == 1
    assert fake.bytes_sent("blob") == len(data)  # 1.0× the blob upstream
    spool = tmp_path / "storage/_tmp/spool"
    await wait_until(lambda: not list(spool.iterdir()), what="claims and spools to be gone")
    for client in workers:  # warm on both
        warm = await fetch(client, "GET", blob_path("team/app", digest))
        assert warm.cache_status == "HIT" and warm.body == data
    assert fake.count("GET", "blob") == 1


async def test_a_pull_joining_late_on_the_other_worker_streams_the_spool(
    fake: FakeUpstream, workers: list[TestClient]
) -> None:
    one, two = workers
    data = os.urandom(4 * MiB)
    digest = fake.add_blob("a", data)
    fake.faults.chunk_delay = 0.01  # 64 chunks of 64 KiB: about 0.7 s upstream
    first = asyncio.ensure_future(fetch(one, "GET", blob_path("a", digest)))
    await wait_until(lambda: fake.bytes_sent("blob") >= MiB, what="upstream progress")
    assert fake.bytes_sent("blob") < len(data), "the upstream finished before the joiner came"
    late = await fetch(two, "GET", blob_path("a", digest))
    assert late.cache_status == "MISS"  # it followed the fetch, not the finished blob
    for pulled in (await first, late):
        assert pulled.complete and pulled.body == data
    assert fake.count("GET", "blob") == 1
    assert fake.bytes_sent("blob") == len(data)


async def test_a_failed_fetch_cuts_the_followers_too(
    fake: FakeUpstream, workers: list[TestClient]
) -> None:
    """A digest mismatch found at the end: no client of either worker gets a clean-looking
    body, and nothing is cached."""
    data = os.urandom(2 * MiB)
    digest = fake.add_blob("a", data)
    fake.faults.delay = 0.2
    fake.faults.wrong_bytes = True
    pulls = await pull_everywhere(workers, blob_path("a", digest), 4)
    for pulled in pulls:
        clean = pulled.complete and pulled.status == 200
        assert not clean or pulled.body == data, "a wrong body was delivered as complete"
        assert not (pulled.complete and pulled.status == 200)
    fake.clear_faults()
    again = await pull_everywhere(workers, blob_path("a", digest), 2)
    assert [p.body == data for p in again] == [True, True]


async def test_a_holder_that_fails_before_streaming_hands_over(
    fake: FakeUpstream, workers: list[TestClient]
) -> None:
    """The upstream refuses the first blob GET: the worker that fetched answers the error,
    the other fetches by itself rather than waiting for nothing."""
    data = os.urandom(MiB)
    digest = fake.add_blob("a", data)
    fake.fail(503, count=1, kinds=["blob"], methods=["GET"])
    fake.faults.delay = 0.2
    pulls = await pull_everywhere(workers, blob_path("a", digest), 2)
    assert sorted(p.status for p in pulls) == [200, 503]
    assert [p.body for p in pulls if p.status == 200] == [data]
    assert fake.count("GET", "blob") == 2
    final = await fetch(workers[0], "GET", blob_path("a", digest))
    assert final.status == 200 and final.body == data


async def test_a_stale_tag_is_revalidated_once_for_all_workers(
    fake: FakeUpstream, workers: list[TestClient]
) -> None:
    image = fake.add_image("team/app", "v1")
    path = "/v2/p/fake/team/app/manifests/v1"
    first = await fetch(workers[0], "GET", path)
    assert first.status == 200 and first.cache_status == "MISS"
    for client in workers:  # fresh: no upstream request
        assert (await fetch(client, "GET", path)).cache_status == "HIT"
    await asyncio.sleep(1.1)  # tag_ttl = 1s
    fake.reset_counts()
    fake.faults.delay = 0.2  # the revalidation takes a while: everyone arrives meanwhile
    answers = await pull_everywhere(workers, path, 8)
    assert all(a.status == 200 and a.body == image.manifest for a in answers)
    assert fake.count("HEAD", "manifest") == 1, fake.counts()
    assert fake.count("GET", "manifest") == 0
    assert sorted({a.cache_status or "" for a in answers}) <= ["HIT", "REVALIDATED"]
