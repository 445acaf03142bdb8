"""`kill -9` of one replica in the middle of a push (issue 14).

Three replicas behind HAProxy, three pushers each sending images with a 24 MiB layer in
4 MiB PATCHes through the balancer. Once a replica holds an upload session with several
MiB in it, that replica gets SIGKILL. HAProxy takes it out of the rotation; a push that
failed starts again from scratch, as a client would, and completes on the survivors.
Every image acknowledged (201 to its manifest PUT), before or after the kill, must then
pull back byte-identical, and `regproxy verify` must find the store sound.

test_kill_docker.py is the same with docker as the client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.cli.helpers import arun_cli
from tests.replicas.pushing import (
    Ledger,
    PushFailed,
    Trace,
    assert_pullable,
    busiest_upload,
    new_image,
    push_image,
)
from tests.support.replicas import Cluster, S3Store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MiB = 1024 * 1024
LAYER = 24 * MiB
CHUNK = 4 * MiB
PUSHERS = 3
#: a push that fails is started again this often before the test gives up
ATTEMPTS = 4


async def pusher(
    url: str, number: int, ledger: Ledger, killed: asyncio.Event, stop: asyncio.Event
) -> None:
    """Push images until `stop`, each retried from scratch until acknowledged; after the
    kill, at least one more must be acknowledged."""
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=1)  # one keep-alive connection, balanced per request
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as http:
        i = 0
        after_kill = 0
        while not stop.is_set() or (killed.is_set() and after_kill == 0):
            i += 1
            name, tag = f"kill/p{number}", f"t{i}"
            image = new_image(LAYER, 2000)
            for attempt in range(1, ATTEMPTS + 1):
                trace = Trace()
                try:
                    await push_image(http, name, tag, image, CHUNK, trace)
                except PushFailed as exc:
                    ledger.failures.append(f"{name}:{tag} attempt {attempt}: {exc} {trace.steps}")
                    if attempt == ATTEMPTS:
                        raise AssertionError(f"{name}:{tag} never went through") from exc
                    await asyncio.sleep(0.5)
                    continue
                ledger.acked.append((name, tag, image))
                if killed.is_set():
                    after_kill += 1
                break


@pytest.fixture
def cluster3(fresh_store: str | S3Store, tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path / "cluster", count=3, store=fresh_store) as running:
        yield running


async def test_kill_9_mid_push_loses_nothing_acknowledged(cluster3: Cluster) -> None:
    cluster = cluster3
    ledger = Ledger()
    killed, stop = asyncio.Event(), asyncio.Event()
    tasks = [
        asyncio.create_task(pusher(cluster.url, n, ledger, killed, stop)) for n in range(PUSHERS)
    ]
    victim = None
    try:
        deadline = time.monotonic() + 60
        while victim is None:
            for task in tasks:
                if task.done():
                    task.result()
            found = busiest_upload(cluster.replicas)
            if found is not None and found[1] >= 2 * CHUNK and ledger.acked:
                victim = found[0]
            elif time.monotonic() > deadline:
                raise AssertionError("no upload ever grew past 8 MiB with an image acknowledged")
            else:
                await asyncio.sleep(0.02)
        acked_before = len(ledger.acked)
        await asyncio.to_thread(cluster.kill, victim.replica_name)
        killed.set()
        await asyncio.sleep(1.0)
        stop.set()
        async with asyncio.timeout(120):
            await asyncio.gather(*tasks)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    assert acked_before >= 1
    assert ledger.failures, "the kill interrupted no push: it did not happen mid-push"
    survivors = [r for r in cluster.replicas if r is not victim]
    async with aiohttp.ClientSession(cluster.url) as http:
        for name, tag, image in ledger.acked:
            await assert_pullable(http, name, tag, image)
    for replica in survivors:
        async with aiohttp.ClientSession(replica.url) as http:
            for name, tag, image in ledger.acked:
                async with http.get(f"/v2/{name}/manifests/{tag}") as resp:
                    assert resp.status == 200 and await resp.read() == image.manifest
    ran = await arun_cli("verify", "-c", survivors[0].config_path, "--json")
    assert ran.code == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    print(  # shown with -s: what the run did
        f"killed {victim.replica_name}; {len(ledger.acked)} images acknowledged "
        f"({acked_before} before the kill), {len(ledger.failures)} failed attempts:\n"
        + "\n".join(ledger.failures)
    )
