"""Benchmark: the web page's overview on a big store (issue 15 asks for < 300 ms).

    python -m tests.benchmarks.ui                 # 1,000 repositories x 10 tags, 21 runs
    python -m tests.benchmarks.ui --repos 200 --tags 5 --runs 5

Builds the store straight in its on-disk layout (`storage/layout.py`: blobs, tag files,
revision and layer links; no fsync, so 10,000 tags take seconds), starts regproxy in this
process on 127.0.0.1 (no auth, then `[auth]` with an anonymous viewer, whose every row
passes `Policy.allows`), waits for the background inventory scan, and times `GET /`
end to end through a real client: the median and the slowest of `--runs`. The scan's own
time is reported too; it runs on the storage pool, never in a view.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from regproxy import manifest as mf
from regproxy.digest import Digest
from regproxy.storage.layout import Layout
from regproxy.ui.snapshot import SNAPSHOTS
from tests.support.auth import auth_config
from tests.support.digests import sha256
from tests.support.inprocess import make_config, start_client

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def build_store(root: Path, repos: int, tags: int) -> int:
    """`repos` repositories of `tags` tags, each tag its own image (a config of its own,
    three layers shared by the whole store). Returns the number of tags written."""
    layout = Layout(root)
    layers = [os.urandom(2048 + i) for i in range(3)]
    layer_descs = [
        {"mediaType": OCI_LAYER, "digest": sha256(layer), "size": len(layer)} for layer in layers
    ]
    for layer in layers:
        _write(layout.blob(Digest.parse(sha256(layer))), layer)
    written = 0
    for r in range(repos):
        name = f"team{r % 50}/app-{r:04d}"
        for t in range(tags):
            config = json.dumps(
                {"architecture": "amd64", "os": "linux", "config": {}, "n": f"{r}-{t}"}
            ).encode()
            config_digest = Digest.parse(sha256(config))
            _write(layout.blob(config_digest), config)
            manifest = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": mf.OCI_MANIFEST,
                    "config": {
                        "mediaType": OCI_CONFIG,
                        "digest": str(config_digest),
                        "size": len(config),
                    },
                    "layers": layer_descs,
                }
            ).encode()
            digest = Digest.parse(sha256(manifest))
            _write(layout.blob(digest), manifest)
            _write(layout.revision(name, digest), mf.OCI_MANIFEST.encode())
            _write(layout.tag(name, f"v{t}"), str(digest).encode())
            _write(layout.layer(name, config_digest), b"")
            written += 1
        for desc in layer_descs:
            _write(layout.layer(name, Digest.parse(desc["digest"])), b"")
    return written


async def measure(base: Path, runs: int, **extra: Any) -> dict[str, float]:
    config = make_config(base, ui={"refresh_interval": "1h"}, **extra)
    client = await start_client(config)
    try:
        app = client.app
        assert app is not None
        started = time.perf_counter()
        while app[SNAPSHOTS].current is None:  # the first view starts the scan and waits
            resp = await client.get("/")
            await resp.read()
            await asyncio.sleep(0.05)
        scan = app[SNAPSHOTS].current
        assert scan is not None
        waited = time.perf_counter() - started
        times, size = [], 0
        for _ in range(runs):
            t0 = time.perf_counter()
            resp = await client.get("/")
            body = await resp.read()
            times.append(time.perf_counter() - t0)
            assert resp.status == 200, body[:500]
            size = len(body)
        return {
            "scan_seconds": scan.seconds,
            "first_view_seconds": waited,
            "median_ms": statistics.median(times) * 1000,
            "slowest_ms": max(times) * 1000,
            "html_bytes": size,
            "rows": len(scan.rows),
            "tags": scan.tag_count,
        }
    finally:
        await client.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repos", type=int, default=1000)
    parser.add_argument("--tags", type=int, default=10)
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rp-ui-bench-") as tmp:
        base = Path(tmp)
        started = time.perf_counter()
        written = build_store(base / "storage" / "registry", args.repos, args.tags)
        print(f"store: {args.repos} repositories, {written} tags, built in "
              f"{time.perf_counter() - started:.1f} s")  # fmt: skip
        rules = [{"repository": "*", "pull": ["anonymous"], "push": [], "delete": []}]
        for label, extra in (
            ("no auth", {}),
            ("auth, anonymous viewer", {"auth": auth_config(base, rules=rules)}),
        ):
            result = await measure(base, args.runs, **extra)
            print(
                f"GET / ({label}): median {result['median_ms']:.0f} ms, slowest "
                f"{result['slowest_ms']:.0f} ms over {args.runs} runs; "
                f"{result['rows']} rows, {result['tags']} tags, "
                f"{result['html_bytes'] / 1024:.0f} KiB of HTML; "
                f"background scan {result['scan_seconds']:.1f} s"
            )


if __name__ == "__main__":
    asyncio.run(main())
