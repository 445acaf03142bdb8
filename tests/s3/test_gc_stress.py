"""gc while serving, with both stores on S3: pushes against a live server while
`regproxy gc --grace 0` runs in a loop (tests/cli/test_gc_stress.py on S3, shorter).

The server runs in this process; every gc is a separate `python -m regproxy gc`
process, two of them looping at once, so only the lease protocol of the store lock
(`s3.LeaseLock`) keeps sweeps and commits apart. Afterwards every acknowledged image
must pull back byte-identical, and `regproxy verify` must find nothing wrong.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from tests.cli.conftest import Registry
from tests.cli.helpers import arun_cli, load
from tests.cli.test_gc_stress import Ledger, _collector, _pusher
from tests.storage.helpers import assert_pullable
from tests.support.inprocess import start_client
from tests.support.s3store import bucket_keys, write_s3_config
from tests.support.seaweed import SeaweedS3
from tests.support.soak import soak

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

DURATION = float(os.environ.get("S3_GC_STRESS_SECONDS", "6"))  # longer soaks: set it
#: gc runs and acknowledged manifests the soak waits for after DURATION (a loaded
#: machine does less), up to LONGEST
GC_RUNS = 4
ACKED = 20
LONGEST = 60.0
PUSHERS = 3
#: gc processes looping at once: a run takes seconds on S3, and two contend for the lease
COLLECTORS = 2


async def test_gc_while_serving_on_s3(seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path) -> None:
    path = write_s3_config(seaweed, s3_bucket, tmp_path / "site")
    config = load(path)
    client = await start_client(config)
    registry = Registry(path, config, client)
    ledger = Ledger()
    stop = asyncio.Event()
    try:
        tasks = [asyncio.create_task(_pusher(client, w, ledger, stop)) for w in range(PUSHERS)]
        tasks += [
            asyncio.create_task(_collector(registry, ledger, stop)) for _ in range(COLLECTORS)
        ]
        await soak(tasks, stop, ledger, DURATION, GC_RUNS, ACKED, LONGEST)
        ran = await arun_cli("gc", "-c", path, "--json", "--grace", "0")
        assert ran.code == 0, ran.stderr

        swept = sum(s["blobs_removed"] for run in ledger.gc_runs for s in run["stores"])
        assert len(ledger.gc_runs) >= GC_RUNS, "gc did not run often enough to prove anything"
        assert swept > 0, "gc never swept anything while the pushes ran"
        assert len(ledger.acked) > ACKED, len(ledger.acked)
        assert not ledger.races, f"manifests refused {ledger.races} s after their blobs were pushed"
        for name, image in ledger.acked:
            await assert_pullable(client, name, image)
        ran = await arun_cli("verify", "-c", path, "--json")
        assert ran.code == 0, json.dumps(ran.json()["problems"][:5], indent=1)
        leftovers = [k for k in bucket_keys(seaweed, s3_bucket) if "/lock.d/" in k]
        assert not leftovers, f"lock objects left behind: {leftovers}"
        print(  # shown with -s: what the run did
            f"{len(ledger.acked)} manifests acknowledged (+{ledger.untagged} untagged), "
            f"{ledger.refused} refused, {len(ledger.gc_runs)} gc runs swept {swept} blobs"
        )
    finally:
        await client.close()
