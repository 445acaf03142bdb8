"""Upstream faults: nothing wrong is committed, clients see errors, a retry succeeds."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from tests.support.digests import sha256
from tests.support.fake_upstream import FakeUpstream
from tests.support.proxy import (
    Proxy,
    assert_failed_cleanly,
    assert_proxied,
    wait_until,
)

pytestmark = pytest.mark.timeout(45)

#: big enough that clients already hold bytes when the fault strikes
SIZE = 3 * 1024 * 1024
CUT = 2 * 1024 * 1024 + 12345
BODY_FAULTS = {
    "truncated": {"truncate_after": CUT},
    "wrong-digest": {"wrong_bytes": True},
    "reset-mid-body": {"reset_after": CUT},
}


def set_faults(fake: FakeUpstream, knobs: dict[str, object]) -> None:
    for knob, value in knobs.items():
        setattr(fake.faults, knob, value)


async def assert_recovers(fake: FakeUpstream, proxy: Proxy, digest: str, data: bytes) -> None:
    """After the fault is cleared, the next pull gets the right bytes and commits them."""
    assert not proxy.is_cached(digest), "a faulty body was committed"
    fake.clear_faults()
    pulled = await proxy.blob("a", digest)
    assert_proxied(pulled)
    assert pulled.body == data
    assert pulled.headers["Docker-Content-Digest"] == digest
    await wait_until(lambda: proxy.is_cached(digest), what="the blob to be committed")


@pytest.mark.parametrize("fault", sorted(BODY_FAULTS))
async def test_broken_blob_body(fake: FakeUpstream, proxy: Proxy, fault: str) -> None:
    data = os.urandom(SIZE)
    digest = fake.add_blob("a", data)
    set_faults(fake, BODY_FAULTS[fault])
    pulled = await proxy.blob("a", digest)
    assert_failed_cleanly(pulled, data)
    assert fake.count("GET", "blob") >= 1
    await assert_recovers(fake, proxy, digest, data)


@pytest.mark.parametrize("fault", sorted(BODY_FAULTS))
async def test_broken_body_reaches_every_concurrent_reader_as_an_error(
    fake: FakeUpstream, proxy: Proxy, fault: str
) -> None:
    data = os.urandom(SIZE)
    digest = fake.add_blob("a", data)
    # a slow upstream, so readers already hold part of the body when the fault strikes
    set_faults(fake, {**BODY_FAULTS[fault], "delay": 0.2, "chunk_delay": 0.01})
    pulls = await asyncio.gather(*(proxy.blob("a", digest) for _ in range(4)))
    for pulled in pulls:
        assert_failed_cleanly(pulled, data)
    await assert_recovers(fake, proxy, digest, data)


async def test_wrong_manifest_bytes_by_digest(fake: FakeUpstream, proxy: Proxy) -> None:
    image = fake.add_image("a", "v1")
    fake.faults.wrong_bytes = True
    fake.faults.body_kinds = frozenset({"manifest"})
    pulled = await proxy.manifest("a", image.digest)
    assert_failed_cleanly(pulled, image.manifest)
    assert not proxy.is_cached(image.digest)
    fake.clear_faults()
    pulled = await proxy.manifest("a", image.digest)
    assert_proxied(pulled)
    assert pulled.body == image.manifest


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_error_status_until_cleared(fake: FakeUpstream, proxy: Proxy, status: int) -> None:
    image = fake.add_image("a", "v1", layer_sizes=(SIZE,))
    layer = image.layers[0]
    fake.fail(status)
    manifest = await proxy.manifest("a", "v1")
    assert manifest.status >= 500 or manifest.status == 429, manifest.status
    assert manifest.oci_code() not in (None, "UNKNOWN"), manifest.body[:200]
    blob = await proxy.blob("a", sha256(layer))
    assert blob.status >= 500 or blob.status == 429, blob.status
    assert blob.oci_code() not in (None, "UNKNOWN"), blob.body[:200]
    assert not proxy.is_cached(sha256(layer))
    assert not proxy.is_cached(image.digest)
    fake.clear_faults()
    manifest = await proxy.manifest("a", "v1")
    assert_proxied(manifest)
    assert manifest.body == image.manifest
    blob = await proxy.blob("a", sha256(layer))
    assert_proxied(blob)
    assert blob.body == layer


@pytest.mark.parametrize("status", [429, 503])
async def test_error_status_for_the_next_request_only(
    fake: FakeUpstream, proxy: Proxy, status: int
) -> None:
    """A single transient error: either retried inside the proxy, or the client's retry works."""
    data = os.urandom(SIZE)
    digest = fake.add_blob("a", data)
    fake.fail(status, count=1, kinds={"blob"})
    first = await proxy.blob("a", digest)
    if first.status == 200:
        assert first.body == data
    else:
        assert first.status >= 500 or first.status == 429
        second = await proxy.blob("a", digest)
        assert_proxied(second)
        assert second.body == data


async def test_slow_first_byte_succeeds(fake: FakeUpstream, proxy: Proxy) -> None:
    image = fake.add_image("a", "v1", layer_sizes=(SIZE,))
    fake.faults.delay = 1.0
    started = time.monotonic()
    manifest = await proxy.manifest("a", "v1")
    blob = await proxy.blob("a", sha256(image.layers[0]))
    assert time.monotonic() - started >= 1.0
    assert_proxied(manifest)
    assert manifest.body == image.manifest
    assert_proxied(blob)
    assert blob.body == image.layers[0]
