"""Pull-through with `serve --workers 2`: concurrent cold pulls through both processes cost
the upstream one transfer, and a worker killed while it fetches costs its followers their
connection (never a clean-looking body), not the next pull."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.proxy import Pulled, fetch
from tests.workers.helpers import WorkersProcess, pinned, wait_until

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024


@pytest.fixture
async def server(tmp_path: Path, fake: FakeUpstream) -> AsyncIterator[WorkersProcess]:
    upstream = f'[proxy.upstreams.fake]\nurl = {json.dumps(fake.url)}\ntag_ttl = "1s"\n'
    srv = WorkersProcess(tmp_path / "srv", extra_config=upstream)
    await asyncio.to_thread(srv.start)
    try:
        yield srv
    finally:
        await asyncio.to_thread(srv.stop)


async def clients(server: WorkersProcess, per_worker: int) -> list[aiohttp.ClientSession]:
    """`per_worker` sessions pinned to each worker, alternating."""
    found = []
    for _ in range(per_worker):
        for number in (1, 2):
            found.append(await pinned(server.url, server.replica(number)))
    return found


async def test_eight_cold_pulls_through_two_processes_cost_one_transfer(
    fake: FakeUpstream, server: WorkersProcess
) -> None:
    data = os.urandom(16 * MiB + 1)
    digest = fake.add_blob("team/app", data)
    fake.faults.delay = 0.3  # the eight pulls all arrive before the first byte
    fake.faults.chunk_delay = 0.001
    sessions = await clients(server, 4)
    try:
        path = f"/v2/p/fake/team/app/blobs/{digest}"
        pulls: list[Pulled] = await asyncio.gather(
            *(fetch(s, "GET", path, timeout=60) for s in sessions)  # type: ignore[arg-type]
        )
    finally:
        for s in sessions:
            await s.close()
    for pulled in pulls:
        assert pulled.complete and pulled.status == 200, pulled.error
        assert pulled.body == data
    answered = {p.headers["X-Regproxy-Replica"] for p in pulls}
    assert answered == {server.replica(1), server.replica(2)}
    assert fake.count("GET", "blob") == 1
    assert fake.bytes_sent("blob") == len(data)  # 1.0× upstream


async def test_a_worker_killed_while_fetching_cuts_its_followers_cleanly(
    fake: FakeUpstream, server: WorkersProcess
) -> None:
    data = os.urandom(8 * MiB)
    digest = fake.add_blob("a", data)
    fake.faults.chunk_delay = 0.02  # 128 chunks: about 2.5 s upstream
    path = f"/v2/p/fake/a/blobs/{digest}"
    holder = await pinned(server.url, server.replica(1))
    follower = await pinned(server.url, server.replica(2))
    try:
        first = asyncio.ensure_future(fetch(holder, "GET", path, timeout=30))  # type: ignore[arg-type]
        await wait_until(lambda: fake.bytes_sent("blob") >= MiB, what="upstream progress")
        second = asyncio.ensure_future(fetch(follower, "GET", path, timeout=30))  # type: ignore[arg-type]
        await asyncio.sleep(0.3)  # worker 2 follows worker 1's spool by now
        server.kill_worker(1)
        cut = await second
        assert not (cut.complete and cut.status == 200), "a cut fetch looked complete"
        assert len(cut.body) < len(data)
        await first  # its worker is gone
    finally:
        await holder.close()
        await follower.close()
    fake.clear_faults()
    again = await pinned(server.url, server.replica(2))
    try:
        pulled = await fetch(again, "GET", path, timeout=30)  # type: ignore[arg-type]
    finally:
        await again.close()
    assert pulled.complete and pulled.status == 200 and pulled.body == data
    assert fake.count("GET", "blob") == 2


async def test_a_stale_tag_is_revalidated_once_by_two_processes(
    fake: FakeUpstream, server: WorkersProcess
) -> None:
    image = fake.add_image("team/app", "v1")
    path = "/v2/p/fake/team/app/manifests/v1"
    sessions = await clients(server, 2)
    try:
        first = await fetch(sessions[0], "GET", path)  # type: ignore[arg-type]
        assert first.status == 200
        await asyncio.sleep(1.1)  # tag_ttl = 1s
        fake.reset_counts()
        fake.faults.delay = 0.3
        answers = await asyncio.gather(
            *(fetch(s, "GET", path) for s in sessions)  # type: ignore[arg-type]
        )
    finally:
        for s in sessions:
            await s.close()
    assert all(a.status == 200 and a.body == image.manifest for a in answers)
    assert fake.count("HEAD", "manifest") == 1, fake.counts()
    assert fake.count("GET", "manifest") == 0
