"""gc while serving: pushes against a live server while `regproxy gc --grace 0` runs in a loop.

The server runs in this process; every gc is a separate `python -m regproxy gc`
process, so the only thing keeping them apart is the store's lock protocol.
Pushers mix new images, re-pushes of existing layers (the commit then only
touches the blob), layers re-used from orphans gc may be sweeping at that very
moment, cross-repository re-pushes, and multi-arch indexes whose children arrive
untagged before the index (while some gc runs use `--delete-untagged`).

Afterwards every acknowledged manifest must be pullable with all its blobs, and
`regproxy verify` must find nothing wrong.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field

import pytest
from aiohttp.test_utils import TestClient

from regproxy import manifest as mf
from tests.cli.conftest import Registry
from tests.cli.helpers import arun_cli
from tests.storage.helpers import assert_pullable
from tests.support.oci import (
    OCI_CONFIG,
    OCI_LAYER,
    Image,
    descriptor,
    make_index,
    push_blob,
    put_manifest,
    sha256,
)
from tests.support.soak import soak

pytestmark = pytest.mark.slow  # a soak of DURATION seconds: out of the inner loop

DURATION = float(os.environ.get("GC_STRESS_SECONDS", "6"))  # longer soak runs: set it
#: what the soak waits for after DURATION (a loaded machine does less), up to LONGEST
GC_RUNS = 3
ACKED = 100
LONGEST = 30.0
PUSHERS = 4
#: seconds: gc keeps what was pushed or touched within CLOCK_SLACK (1 s) of its start; a
#: refusal that soon after the blobs were pushed means gc swept something it must not
RACE_WINDOW = 0.8


@dataclass
class Ledger:
    acked: list[tuple[str, Image]] = field(default_factory=list)
    untagged: int = 0  # pushed by digest alone: `--delete-untagged` may drop them
    refused: int = 0
    #: refusals of a manifest whose blobs were pushed moments before: the race gc must not have
    races: list[float] = field(default_factory=list)
    layers: list[bytes] = field(default_factory=list)  # pushed, referenced by an image
    orphans: list[bytes] = field(default_factory=list)  # pushed, never referenced (yet)
    gc_runs: list[dict] = field(default_factory=list)


def _image(layers: list[bytes]) -> Image:
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": os.urandom(8).hex()})
    config_bytes = config.encode()
    doc = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config_bytes),
        "layers": [descriptor(OCI_LAYER, layer) for layer in layers],
    }
    data = json.dumps(doc).encode()
    return Image(data, sha256(data), config_bytes, layers)


async def _put(
    client: TestClient, name: str, ref: str, image: Image, ledger: Ledger, since: float
) -> bool:
    """PUT a manifest whose blobs were pushed from `since` on; record the outcome."""
    resp = await put_manifest(client, name, ref, image.manifest, image.media_type)
    body = await resp.text()
    if resp.status == 201:
        if ":" in ref:
            ledger.untagged += 1
        else:
            ledger.acked.append((name, image))
        return True
    # with --grace 0 a blob pushed long enough ago may legitimately be swept before its
    # manifest arrives; one pushed (or re-pushed) a moment ago must not be
    assert resp.status == 400 and "MANIFEST_BLOB_UNKNOWN" in body, (resp.status, body)
    ledger.refused += 1
    elapsed = time.monotonic() - since
    if elapsed < RACE_WINDOW:
        ledger.races.append(elapsed)
    return False


async def _push_image(
    client: TestClient, name: str, ref: str | None, layers: list[bytes], ledger: Ledger
) -> Image | None:
    """Blobs, then the manifest under `ref` (None: by digest, untagged)."""
    image = _image(layers)
    ref = ref or image.digest
    since = time.monotonic()
    for blob in image.blobs:
        await push_blob(client, name, blob)
    if not await _put(client, name, ref, image, ledger, since):
        return None
    if ":" not in ref:
        ledger.layers.extend(layers)
    return image


async def _pusher(client: TestClient, worker: int, ledger: Ledger, stop: asyncio.Event) -> None:
    rnd = random.Random(worker)
    i = 0
    while not stop.is_set():
        i += 1
        name = f"stress/w{worker}/r{i % 3}"
        tag = f"t{i}"
        kind = rnd.random()
        if kind < 0.2:
            orphan = os.urandom(rnd.choice((200, 5000)))
            await push_blob(client, name, orphan)  # an interrupted push: nobody needs it
            ledger.orphans.append(orphan)
        elif kind < 0.4 and ledger.orphans:
            # re-push a blob gc may be sweeping right now, and use it
            await _push_image(client, name, tag, [rnd.choice(ledger.orphans)], ledger)
        elif kind < 0.6 and ledger.layers:
            # re-push layers that exist (the commit touches them), maybe in another repo
            reused = rnd.sample(ledger.layers, min(2, len(ledger.layers)))
            await _push_image(client, name, tag, [*reused, os.urandom(300)], ledger)
        elif kind < 0.7:
            # a multi-arch push: children by digest (untagged until the index arrives)
            since = time.monotonic()
            children = [
                await _push_image(client, name, None, [os.urandom(400)], ledger) for _ in range(2)
            ]
            if all(children):
                data, digest = make_index([c for c in children if c])
                index = Image(data, digest, b"", [], mf.OCI_INDEX)
                index.blobs = []
                if await _put(client, name, tag, index, ledger, since):
                    ledger.acked += [(name, c) for c in children if c]
        elif kind < 0.75:
            await _push_image(client, name, None, [os.urandom(300)], ledger)  # untagged
        else:
            await _push_image(
                client, name, tag, [os.urandom(rnd.choice((100, 2000, 64_000)))], ledger
            )
        await asyncio.sleep(0)


async def _collector(registry: Registry, ledger: Ledger, stop: asyncio.Event) -> None:
    run = 0
    while not stop.is_set():
        run += 1
        args = ["gc", "-c", registry.path, "--json", "--grace", "0"]
        if run % 2 == 0:
            args.append("--delete-untagged")
        ran = await arun_cli(*args)
        assert ran.code == 0, ran.stderr
        ledger.gc_runs.append(ran.json())


async def test_gc_while_serving(registry: Registry) -> None:
    client = registry.client
    ledger = Ledger()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_pusher(client, w, ledger, stop)) for w in range(PUSHERS)]
    tasks.append(asyncio.create_task(_collector(registry, ledger, stop)))
    await soak(tasks, stop, ledger, DURATION, GC_RUNS, ACKED, LONGEST)
    # one last sweep with nothing running, then everything acknowledged must be whole
    ran = await arun_cli("gc", "-c", registry.path, "--json", "--grace", "0")
    assert ran.code == 0, ran.stderr

    swept = sum(s["blobs_removed"] for run in ledger.gc_runs for s in run["stores"])
    assert len(ledger.gc_runs) >= GC_RUNS, "gc did not run often enough to prove anything"
    assert swept > 0, "gc never swept anything while the pushes ran"
    assert len(ledger.acked) > ACKED, len(ledger.acked)
    # a refusal is legal with --grace 0, but only for blobs pushed a while before
    assert not ledger.races, f"manifests refused {ledger.races} s after their blobs were pushed"
    for name, image in ledger.acked:
        await assert_pullable(client, name, image)
    ran = await arun_cli("verify", "-c", registry.path, "--json")
    assert ran.code == 0, json.dumps(ran.json()["problems"][:5], indent=1)
    print(  # shown with -s: what the run did
        f"{len(ledger.acked)} manifests acknowledged (+{ledger.untagged} untagged), "
        f"{ledger.refused} refused, "
        f"{len(ledger.gc_runs)} gc runs swept {swept} blobs"
    )
