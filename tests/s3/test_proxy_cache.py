"""The pull-through cache with `proxy_storage` on S3, against the fault-injecting `fake`.

Single-flight, hits served from S3, tag TTL with HEAD revalidation, stale-if-error and
the LRU byte budget behave as on disk; what the cache holds is objects in the bucket,
nothing on local disk but spool files while a fetch runs.

S3 times have whole seconds: tests that depend on an order of times space their events
by more than a second.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from regproxy.server import app as server_app
from tests.support.digests import sha256
from tests.support.fake_upstream import FakeUpstream
from tests.support.inprocess import start_client
from tests.support.oci import make_image, push_image
from tests.support.proxy import Proxy, assert_proxied, wait_until
from tests.support.s3store import blob_key, bucket_keys, s3_config
from tests.support.seaweed import SeaweedS3

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024


class S3Proxy(Proxy):
    """A `Proxy` whose cache is the `proxy` prefix of a bucket."""

    engine: SeaweedS3
    bucket: str

    def cached_blobs(self) -> dict[str, int]:
        client = self.engine.client()
        found: dict[str, int] = {}
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix="proxy/blobs/"
        )
        for page in pages:
            for item in page.get("Contents", []):
                algorithm, _, hex_ = item["Key"].split("/", 2)[2].partition("/")
                found[f"{algorithm}:{hex_.rpartition('/')[2]}"] = int(item["Size"])
        return found

    def is_cached(self, digest: str) -> bool:
        return digest in self.cached_blobs()


@pytest.fixture
async def make_s3_proxy(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path, fake: FakeUpstream
) -> AsyncIterator[Any]:
    started = []

    async def factory(tag_ttl: str = "2s", **top: Any) -> S3Proxy:
        upstreams = {"fake": {"url": fake.url, "tag_ttl": tag_ttl}}
        folder = tmp_path / f"proxy{len(started)}"
        config = s3_config(seaweed, s3_bucket, folder, proxy={"upstreams": upstreams}, **top)
        client = await start_client(config)
        started.append(client)
        proxy = S3Proxy(client, config)
        proxy.engine, proxy.bucket = seaweed, s3_bucket
        return proxy

    try:
        yield factory
    finally:
        for client in started:
            await client.close()


def _nothing_on_disk(proxy: S3Proxy) -> None:
    """The cache is in the bucket: no store folder, no spool file left."""
    base = Path(proxy.config.temporary_registry_storage).parent
    assert not any((base / "proxy").rglob("*")), list((base / "proxy").rglob("*"))
    spool = Path(proxy.config.temporary_registry_storage) / "spool"
    assert not [p for p in spool.rglob("*") if p.is_file()]


async def test_single_flight_and_hits_from_s3(fake: FakeUpstream, make_s3_proxy: Any) -> None:
    proxy: S3Proxy = await make_s3_proxy()
    data = os.urandom(4 * MiB + 5)
    digest = fake.add_blob("team/app", data)
    fake.faults.delay = 0.2  # all eight requests arrive before the first byte
    pulls = await asyncio.gather(*(proxy.blob("team/app", digest) for _ in range(8)))
    for pulled in pulls:
        assert_proxied(pulled)
        assert pulled.body == data
        assert pulled.headers["Docker-Content-Digest"] == digest
    assert fake.count("GET", "blob") == 1
    assert fake.bytes_sent("blob") == len(data)
    assert "MISS" in {p.cache_status for p in pulls}
    await wait_until(lambda: proxy.is_cached(digest), what="the blob to be in the bucket")
    assert proxy.cached_blobs()[digest] == len(data)

    fake.faults.delay = 0
    warm = await asyncio.gather(*(proxy.blob("team/app", digest) for _ in range(4)))
    for pulled in warm:
        assert pulled.cache_status == "HIT"
        assert pulled.body == data
    ranged = await proxy.blob("team/app", digest, {"Range": f"bytes={MiB - 1}-{MiB}"})
    assert ranged.status == 206 and ranged.body == data[MiB - 1 : MiB + 1]
    head = await proxy.head(proxy.path("team/app", "blobs", digest))
    assert head.status == 200 and head.headers["Content-Length"] == str(len(data))
    assert fake.count("GET", "blob") == 1, "a cached blob was fetched again"
    _nothing_on_disk(proxy)


async def test_a_whole_image_is_cached_and_served_from_s3(
    fake: FakeUpstream, make_s3_proxy: Any
) -> None:
    image = fake.add_image("lib/tool", "v1", layer_sizes=(300_000, 70_000, 10))
    proxy: S3Proxy = await make_s3_proxy(tag_ttl="1h")
    for _ in range(2):
        pulled = await proxy.manifest("lib/tool", "v1")
        assert_proxied(pulled)
        assert pulled.body == image.manifest
        by_digest = await proxy.manifest("lib/tool", image.digest)
        assert by_digest.body == image.manifest
        pulled_blobs = await asyncio.gather(
            *(proxy.blob("lib/tool", sha256(blob)) for blob in image.blobs)
        )
        assert [p.body for p in pulled_blobs] == image.blobs
    assert fake.count("GET", "manifest") == 1
    assert fake.count("GET", "blob") == len(image.blobs)
    keys = bucket_keys(proxy.engine, proxy.bucket)
    for blob in (image.manifest, *image.blobs):
        assert blob_key("proxy", sha256(blob)) in keys
    # the only registry object a serving replica writes is how to reach it (replicas/<id>)
    written = [k for k in keys if k.startswith("registry/")]
    assert not [k for k in written if not k.startswith("registry/replicas/")], (
        "the cache wrote to the registry"
    )
    _nothing_on_disk(proxy)

    # a second server on the same bucket serves it without asking the upstream
    other: S3Proxy = await make_s3_proxy(tag_ttl="1h")
    fake.reset_counts()
    pulled = await other.manifest("lib/tool", "v1")
    assert pulled.cache_status == "HIT" and pulled.body == image.manifest
    for blob in image.blobs:
        got = await other.blob("lib/tool", sha256(blob))
        assert got.cache_status == "HIT" and got.body == blob
    assert fake.requests == []


def manifest_requests(fake: FakeUpstream) -> list[tuple[str, str]]:
    return [(r.method, r.reference or "") for r in fake.requests if r.kind == "manifest"]


async def test_tag_ttl_revalidation_with_head(fake: FakeUpstream, make_s3_proxy: Any) -> None:
    ttl = 2.0
    proxy: S3Proxy = await make_s3_proxy(tag_ttl="2s")
    image = fake.add_image("a", "v1")
    first = await proxy.manifest("a", "v1")
    assert first.cache_status == "MISS"
    fake.reset_counts()
    for _ in range(3):
        pulled = await proxy.manifest("a", "v1")
        assert pulled.cache_status == "HIT" and pulled.body == image.manifest
    assert fake.requests == []

    await asyncio.sleep(ttl + 0.3)
    pulled = await proxy.manifest("a", "v1")
    assert pulled.cache_status == "REVALIDATED"
    assert pulled.body == image.manifest
    assert manifest_requests(fake) == [("HEAD", "v1")]
    again = await proxy.manifest("a", "v1")
    assert again.cache_status == "HIT", "the revalidation did not restart the tag's clock"
    assert manifest_requests(fake) == [("HEAD", "v1")]

    # the tag moves upstream: seen after the TTL, with a HEAD and one GET
    new = fake.add_image("a", None)
    fake.set_tag("a", "v1", new.digest)
    fake.reset_counts()
    still = await proxy.manifest("a", "v1")
    assert still.cache_status == "HIT" and still.body == image.manifest
    await asyncio.sleep(ttl + 0.3)
    moved = await proxy.manifest("a", "v1")
    assert moved.cache_status == "REVALIDATED"
    assert moved.body == new.manifest
    assert manifest_requests(fake) == [("HEAD", "v1"), ("GET", "v1")]

    # eight concurrent pulls of a stale tag: one HEAD
    await asyncio.sleep(ttl + 0.3)
    fake.reset_counts()
    fake.faults.delay = 0.2
    pulls = await asyncio.gather(*(proxy.manifest("a", "v1") for _ in range(8)))
    assert {p.body for p in pulls} == {new.manifest}
    assert manifest_requests(fake) == [("HEAD", "v1")]


async def test_stale_if_error(fake: FakeUpstream, make_s3_proxy: Any) -> None:
    proxy: S3Proxy = await make_s3_proxy(tag_ttl="1s")
    image = fake.add_image("a", "v1")
    assert (await proxy.manifest("a", "v1")).cache_status == "MISS"
    for blob in image.blobs:
        assert (await proxy.blob("a", sha256(blob))).body == blob
    await asyncio.sleep(1.3)

    fake.fail(503)
    pulled = await proxy.manifest("a", "v1")
    assert pulled.status == 200
    assert pulled.cache_status == "STALE"
    assert pulled.body == image.manifest
    fake.clear_faults()

    await fake.stop()  # the upstream is gone altogether
    try:
        await asyncio.sleep(1.3)
        pulled = await proxy.manifest("a", "v1")
        assert pulled.cache_status == "STALE" and pulled.body == image.manifest
        for blob in image.blobs:
            got = await proxy.blob("a", sha256(blob))
            assert got.cache_status == "HIT" and got.body == blob
        tags = await proxy.get("/v2/p/fake/a/tags/list")
        assert tags.status == 200 and tags.cache_status == "STALE"
        assert tags.json()["tags"] == ["v1"]
        # nothing cached: the upstream's failure is the answer
        missing = await proxy.manifest("a", "v2")
        assert missing.status == 503, (missing.status, missing.body)
    finally:
        await fake.start()
    pulled = await proxy.manifest("a", "v1")
    assert pulled.cache_status == "REVALIDATED"


@pytest.mark.slow
async def test_lru_eviction_from_s3(
    fake: FakeUpstream, make_s3_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_app, "EVICTION_INTERVAL", 0.2)
    blob_size = 100 * 1024
    budget = 250 * 1024
    proxy: S3Proxy = await make_s3_proxy(proxy_max_size=budget)
    pushed = make_image(layer_sizes=(400 * 1024,))  # alone bigger than the budget
    await push_image(proxy.client, "local/app", pushed, "v1")
    registry_before = {
        k: v
        for k, v in _objects(proxy).items()
        if k.startswith("registry/") and "/lock.d/" not in k
    }

    blobs = {f"r{i}": os.urandom(blob_size) for i in range(1, 5)}
    digests = {repo: fake.add_blob(repo, data) for repo, data in blobs.items()}
    order: list[str] = []

    async def pull(repo: str) -> None:
        pulled = await proxy.blob(repo, digests[repo])
        assert_proxied(pulled)
        assert pulled.body == blobs[repo]
        if repo in order:
            order.remove(repo)
        order.append(repo)
        await asyncio.sleep(1.1)  # S3 times have whole seconds: distinct access times

    for repo in ("r1", "r2", "r3"):
        await pull(repo)
    await pull("r1")  # r1 is now more recent than r2 and r3
    await pull("r4")
    assert order == ["r2", "r3", "r1", "r4"]

    def within_budget() -> bool:
        return sum(proxy.cached_blobs().values()) <= budget

    await wait_until(within_budget, timeout=20, interval=0.2, what="eviction under the budget")
    cached = proxy.cached_blobs()
    kept = [repo for repo in order if digests[repo] in cached]
    assert kept == ["r1", "r4"], f"not LRU: kept {kept} of {order}"
    registry_after = {
        k: v
        for k, v in _objects(proxy).items()
        if k.startswith("registry/") and "/lock.d/" not in k
    }
    assert registry_after == registry_before, "eviction touched the registry store"
    local = await proxy.get("/v2/local/app/blobs/" + sha256(pushed.layers[0]))
    assert local.status == 200 and local.body == pushed.layers[0]

    # an evicted blob is simply fetched again
    again = await proxy.blob("r2", digests["r2"])
    assert again.cache_status == "MISS"
    assert again.body == blobs["r2"]
    assert fake.count("GET", "blob", name="r2") == 2


def _objects(proxy: S3Proxy) -> dict[str, tuple[int, str]]:
    """Key → (size, ETag) of every object in the bucket."""
    client = proxy.engine.client()
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=proxy.bucket):
        for item in page.get("Contents", []):
            found[item["Key"]] = (int(item["Size"]), item["ETag"])
    return found
