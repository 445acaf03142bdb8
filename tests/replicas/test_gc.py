"""gc while replicas serve (issue 14): `regproxy gc --grace 0` loops against the shared
store, with replica r1's configuration (its temporary folder), while three pushers send
images through HAProxy to all replicas, chunk by chunk.

gc runs as separate processes, so only the store's lock protocol (flock on a folder, the
lease objects on S3) keeps sweeps and commits apart, now with commits coming from three
processes that share nothing else. Pushers mix new images, re-pushes of layers that
exist (the commit only touches them) and orphan blobs that gc sweeps. Afterwards every
acknowledged image must pull back byte-identical and `regproxy verify` must find nothing
wrong. With `--grace 0` a manifest may be refused when gc swept blobs pushed a while
before it; one refused right after its blobs arrived means gc swept what it must not.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.cli.helpers import arun_cli
from tests.replicas.pushing import (
    Ledger,
    PushedImage,
    PushFailed,
    Trace,
    assert_pullable,
    new_image,
    push_blob_chunked,
    put_manifest,
)
from tests.support.oci import OCI_LAYER, descriptor
from tests.support.replicas import Cluster, S3Store
from tests.support.soak import soak

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

DURATION = float(os.environ.get("REPLICAS_GC_SECONDS", "6"))
#: gc runs and acknowledged manifests the soak waits for after DURATION (a loaded
#: machine does less), up to LONGEST
GC_RUNS = 2
ACKED = 20
LONGEST = 30.0
PUSHERS = 3
#: seconds: gc keeps what was pushed or touched within 1 s of its start; a refusal this
#: soon after the blobs were pushed means gc swept something it must not
RACE_WINDOW = 0.8


@dataclass
class GcLedger(Ledger):
    refused: int = 0
    #: refusals of a manifest whose blobs were pushed moments before: the race gc must not have
    races: list[float] = field(default_factory=list)
    layers: list[bytes] = field(default_factory=list)  # pushed, referenced by an image
    orphans: list[bytes] = field(default_factory=list)  # pushed, never referenced (yet)
    gc_runs: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def cluster3(fresh_store: str | S3Store, tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path / "cluster", count=3, store=fresh_store) as running:
        yield running


async def _push(
    http: aiohttp.ClientSession, name: str, tag: str, image: PushedImage, ledger: GcLedger
) -> None:
    since = time.monotonic()
    trace = Trace()
    for blob in image.blobs:
        await push_blob_chunked(http, name, blob, max(1, len(blob) // 2 + 1), trace)
    status = await put_manifest(http, name, tag, image, trace)
    if status == 201:
        ledger.acked.append((name, tag, image))
        ledger.layers.extend(image.blobs[1:])
        return
    assert status == 400, (status, trace.steps)
    ledger.refused += 1
    elapsed = time.monotonic() - since
    if elapsed < RACE_WINDOW:
        ledger.races.append(elapsed)


async def pusher(url: str, number: int, ledger: GcLedger, stop: asyncio.Event) -> None:
    rnd = random.Random(number)
    connector = aiohttp.TCPConnector(limit=1)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as http:
        i = 0
        while not stop.is_set():
            i += 1
            name, tag = f"gc/p{number}/r{i % 3}", f"t{i}"
            kind = rnd.random()
            try:
                if kind < 0.2:
                    orphan = os.urandom(rnd.choice((200, 5000)))
                    await push_blob_chunked(http, name, orphan, 4096)  # nobody needs it
                    ledger.orphans.append(orphan)
                elif kind < 0.4 and ledger.orphans:
                    # re-push a blob gc may be sweeping right now, and use it
                    image = new_image(300)
                    image = _with_layers(image, [rnd.choice(ledger.orphans)])
                    await _push(http, name, tag, image, ledger)
                elif kind < 0.6 and ledger.layers:
                    # re-push layers that exist (the commit touches them), maybe elsewhere
                    reused = rnd.sample(ledger.layers, min(2, len(ledger.layers)))
                    image = _with_layers(new_image(300), reused)
                    await _push(http, name, tag, image, ledger)
                else:
                    size = rnd.choice((100, 2000, 64_000, 300_000))
                    await _push(http, name, tag, new_image(size), ledger)
            except PushFailed as exc:
                raise AssertionError(f"{name}:{tag}: {exc}") from exc


def _with_layers(image: PushedImage, extra: list[bytes]) -> PushedImage:
    """`image` with `extra` layers added to its own (a new manifest)."""
    doc = json.loads(image.manifest)
    doc["layers"] += [descriptor(OCI_LAYER, layer) for layer in extra]
    return PushedImage(json.dumps(doc).encode(), [*image.blobs, *extra])


async def collector(config: Path, ledger: GcLedger, stop: asyncio.Event) -> None:
    while not stop.is_set():
        ran = await arun_cli("gc", "-c", config, "--json", "--grace", "0")
        assert ran.code == 0, ran.stderr
        ledger.gc_runs.append(ran.json())


async def test_gc_loop_while_replicas_serve_loses_nothing(cluster3: Cluster) -> None:
    cluster = cluster3
    config = cluster.replicas[0].config_path
    ledger = GcLedger()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(pusher(cluster.url, n, ledger, stop)) for n in range(PUSHERS)]
    tasks.append(asyncio.create_task(collector(config, ledger, stop)))
    await soak(tasks, stop, ledger, DURATION, GC_RUNS, ACKED, LONGEST)
    ran = await arun_cli("gc", "-c", config, "--json", "--grace", "0")
    assert ran.code == 0, ran.stderr

    swept = sum(s["blobs_removed"] for run in ledger.gc_runs for s in run["stores"])
    assert len(ledger.gc_runs) >= GC_RUNS, "gc did not run often enough to prove anything"
    assert swept > 0, f"gc never swept anything while the pushes ran: {ledger.gc_runs}"
    assert len(ledger.acked) > ACKED, len(ledger.acked)
    assert not ledger.races, f"manifests refused {ledger.races} s after their blobs were pushed"
    async with aiohttp.ClientSession(cluster.url) as http:
        for name, tag, image in ledger.acked:
            await assert_pullable(http, name, tag, image)
    ran = await arun_cli("verify", "-c", config, "--json")
    assert ran.code == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    print(  # shown with -s: what the run did
        f"{len(ledger.acked)} manifests acknowledged, {ledger.refused} refused, "
        f"{len(ledger.gc_runs)} gc runs swept {swept} blobs"
    )
