"""Manifest caching: tag TTL, HEAD revalidation, by-digest hits, stale-if-error."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.digests import sha256
from tests.support.fake_upstream import FakeImage, FakeUpstream
from tests.support.proxy import (
    CACHE_STATUSES,
    Proxy,
    ProxyFactory,
    assert_proxied,
    assert_upstream_error,
    wait_until,
)

pytestmark = pytest.mark.timeout(30)

TTL = 1.0
PAST_TTL = TTL + 0.3


@pytest.fixture
async def short(make_proxy: ProxyFactory) -> Proxy:
    """A proxy whose tags go stale after one second."""
    return await make_proxy(upstream={"tag_ttl": "1s"})


def manifest_requests(fake: FakeUpstream) -> list[tuple[str, str]]:
    return [(r.method, r.reference or "") for r in fake.requests if r.kind == "manifest"]


async def pull_all(proxy: Proxy, image: FakeImage, tag: str) -> None:
    pulled = await proxy.manifest(image.repo, tag)
    assert_proxied(pulled)
    assert pulled.body == image.manifest
    for blob in image.blobs:
        got = await proxy.blob(image.repo, sha256(blob))
        assert_proxied(got)
        assert got.body == blob


async def test_fresh_tag_makes_no_upstream_requests(fake: FakeUpstream, short: Proxy) -> None:
    image = fake.add_image("a", "v1")
    first = await short.manifest("a", "v1")
    assert first.cache_status == "MISS"
    fake.reset_counts()
    for _ in range(5):
        pulled = await short.manifest("a", "v1")
        assert pulled.cache_status == "HIT"
        assert pulled.body == image.manifest
    head = await short.head(short.path("a", "manifests", "v1"))
    assert head.status == 200
    assert fake.requests == []


async def test_stale_tag_is_revalidated_with_one_head(fake: FakeUpstream, short: Proxy) -> None:
    image = fake.add_image("a", "v1")
    assert_proxied(await short.manifest("a", "v1"))
    await asyncio.sleep(PAST_TTL)
    fake.reset_counts()
    pulled = await short.manifest("a", "v1")
    assert pulled.cache_status == "REVALIDATED"
    assert pulled.body == image.manifest
    assert pulled.headers["Docker-Content-Digest"] == image.digest
    assert manifest_requests(fake) == [("HEAD", "v1")]
    again = await short.manifest("a", "v1")
    assert again.cache_status == "HIT"
    assert manifest_requests(fake) == [("HEAD", "v1")]


async def test_repointed_tag_is_visible_after_ttl_not_before(
    fake: FakeUpstream, short: Proxy
) -> None:
    old = fake.add_image("a", "v1")
    new = fake.add_image("a", None)
    first = await short.manifest("a", "v1")
    assert first.body == old.manifest
    started = time.monotonic()
    fake.set_tag("a", "v1", new.digest)
    fake.reset_counts()
    before = await short.manifest("a", "v1")
    assert time.monotonic() - started < TTL, "too slow to test the window"
    assert before.body == old.manifest
    assert before.cache_status == "HIT"
    assert fake.requests == []
    await asyncio.sleep(PAST_TTL)
    after = await short.manifest("a", "v1")
    assert after.body == new.manifest
    assert after.headers["Docker-Content-Digest"] == new.digest
    assert after.cache_status in ("MISS", "REVALIDATED")
    methods = [method for method, _ in manifest_requests(fake)]
    assert methods.count("HEAD") == 1
    assert methods.count("GET") == 1
    # the old revision stays addressable by digest, from the cache
    fake.reset_counts()
    by_digest = await short.manifest("a", old.digest)
    assert by_digest.body == old.manifest
    assert by_digest.cache_status == "HIT"
    assert fake.requests == []


async def test_by_digest_pulls_are_never_revalidated(fake: FakeUpstream, short: Proxy) -> None:
    image = fake.add_image("a", "v1")
    cold = await short.manifest("a", image.digest)
    assert cold.cache_status == "MISS"
    await pull_all(short, image, "v1")
    await asyncio.sleep(PAST_TTL)
    fake.reset_counts()
    for _ in range(3):
        pulled = await short.manifest("a", image.digest)
        assert pulled.cache_status == "HIT"
        assert pulled.body == image.manifest
        for blob in image.blobs:
            got = await short.blob("a", sha256(blob))
            assert got.cache_status == "HIT"
    assert fake.requests == []


async def test_concurrent_stale_requests_share_one_revalidation(
    fake: FakeUpstream, short: Proxy
) -> None:
    image = fake.add_image("a", "v1")
    assert_proxied(await short.manifest("a", "v1"))
    await asyncio.sleep(PAST_TTL)
    fake.reset_counts()
    fake.faults.delay = 0.3
    pulls = await asyncio.gather(*(short.manifest("a", "v1") for _ in range(8)))
    for pulled in pulls:
        assert pulled.body == image.manifest
        assert pulled.cache_status in ("REVALIDATED", "HIT"), pulled.cache_status
    assert manifest_requests(fake) == [("HEAD", "v1")]


async def test_concurrent_cold_tag_pulls_share_one_fetch(fake: FakeUpstream, short: Proxy) -> None:
    image = fake.add_image("a", "v1")
    fake.faults.delay = 0.3
    pulls = await asyncio.gather(*(short.manifest("a", "v1") for _ in range(8)))
    for pulled in pulls:
        assert_proxied(pulled)
        assert pulled.body == image.manifest
    methods = [method for method, _ in manifest_requests(fake)]
    assert methods.count("GET") == 1
    assert methods.count("HEAD") <= 1


async def test_upstream_down_serves_the_cache(fake: FakeUpstream, short: Proxy) -> None:
    image = fake.add_image("a", "v1", layer_sizes=(200_000, 3000))
    fake.add_image("a", "uncached", layer_sizes=(10,))
    await pull_all(short, image, "v1")
    await fake.stop()

    fresh = await short.manifest("a", "v1")
    assert fresh.cache_status == "HIT"
    await asyncio.sleep(PAST_TTL)
    stale = await short.manifest("a", "v1")
    assert stale.status == 200
    assert stale.cache_status == "STALE"
    assert stale.body == image.manifest
    assert stale.headers["Docker-Content-Digest"] == image.digest
    head = await short.head(short.path("a", "manifests", "v1"))
    assert head.status == 200
    assert head.cache_status == "STALE"
    by_digest = await short.manifest("a", image.digest)
    assert by_digest.cache_status == "HIT"
    for blob in image.blobs:
        got = await short.blob("a", sha256(blob))
        assert got.cache_status == "HIT"
        assert got.body == blob

    for path in (
        short.path("a", "manifests", "uncached"),
        short.path("a", "manifests", sha256(b"never seen")),
        short.path("a", "blobs", sha256(b"never seen")),
        short.path("elsewhere", "manifests", "latest"),
    ):
        started = time.monotonic()
        missing = await short.get(path)
        assert time.monotonic() - started < 10
        # nothing cached and nobody to ask: unavailable, not "unknown"
        assert_upstream_error(missing, 503, "UNAVAILABLE")

    await fake.start()

    async def revalidates() -> bool:
        pulled = await short.manifest("a", "v1")
        assert pulled.cache_status in CACHE_STATUSES
        return pulled.cache_status == "REVALIDATED"

    await wait_until(revalidates, timeout=10, interval=0.2, what="revalidation after restart")


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_stale_if_error_status(fake: FakeUpstream, short: Proxy, status: int) -> None:
    image = fake.add_image("a", "v1")
    assert_proxied(await short.manifest("a", "v1"))
    await asyncio.sleep(PAST_TTL)
    fake.fail(status)
    pulled = await short.manifest("a", "v1")
    assert pulled.status == 200
    assert pulled.cache_status == "STALE"
    assert pulled.body == image.manifest
    fake.clear_faults()

    async def revalidates() -> bool:
        return (await short.manifest("a", "v1")).cache_status == "REVALIDATED"

    await wait_until(revalidates, timeout=10, interval=0.2, what="revalidation after the fault")


async def test_tag_deleted_upstream_after_ttl(fake: FakeUpstream, short: Proxy) -> None:
    """An upstream 404 on revalidation is an answer, not an outage: the tag is gone."""
    fake.add_image("a", "v1")
    assert_proxied(await short.manifest("a", "v1"))
    fake.delete_tag("a", "v1")
    await asyncio.sleep(PAST_TTL)
    pulled = await short.manifest("a", "v1")
    assert pulled.status == 404
    assert pulled.oci_code() == "MANIFEST_UNKNOWN"
