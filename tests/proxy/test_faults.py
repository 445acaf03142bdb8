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
    assert_cut_short,
    assert_proxied,
    assert_upstream_error,
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
#: what regproxy answers for an upstream error status: (status, OCI error code)
STATUS_MAPPING = {
    429: (429, "TOOMANYREQUESTS"),
    500: (503, "UNAVAILABLE"),
    503: (503, "UNAVAILABLE"),
}


def set_faults(fake: FakeUpstream, knobs: dict[str, object]) -> None:
    for knob, value in knobs.items():
        setattr(fake.faults, knob, value)


def faulty_body(fault: str, data: bytes) -> bytes:
    """What the fake upstream sends of `data` under `fault` (see `BODY_FAULTS`)."""
    if fault == "wrong-digest":
        return bytes([data[0] ^ 0xFF]) + data[1:]
    return data[:CUT]


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
    assert_cut_short(pulled, faulty_body(fault, data))
    assert fake.count("GET", "blob") == 1
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
        assert_cut_short(pulled, faulty_body(fault, data))
    assert fake.count("GET", "blob") == 1, "the four readers share one upstream fetch"
    await assert_recovers(fake, proxy, digest, data)


async def test_wrong_manifest_bytes_by_digest(fake: FakeUpstream, proxy: Proxy) -> None:
    image = fake.add_image("a", "v1")
    fake.faults.wrong_bytes = True
    fake.faults.body_kinds = frozenset({"manifest"})
    pulled = await proxy.manifest("a", image.digest)
    # a manifest is checked before a byte is sent: an error answer, like an upstream 5xx
    assert_upstream_error(pulled, 503, "UNAVAILABLE")
    assert not proxy.is_cached(image.digest)
    fake.clear_faults()
    pulled = await proxy.manifest("a", image.digest)
    assert_proxied(pulled)
    assert pulled.body == image.manifest


@pytest.mark.parametrize("status", sorted(STATUS_MAPPING))
async def test_error_status_until_cleared(fake: FakeUpstream, proxy: Proxy, status: int) -> None:
    """An upstream 429 stays 429 (the client should back off); any upstream 5xx is 503."""
    image = fake.add_image("a", "v1", layer_sizes=(SIZE,))
    layer = image.layers[0]
    fake.fail(status)
    manifest = await proxy.manifest("a", "v1")
    assert_upstream_error(manifest, *STATUS_MAPPING[status])
    blob = await proxy.blob("a", sha256(layer))
    assert_upstream_error(blob, *STATUS_MAPPING[status])
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
    """A single transient error is not retried inside the proxy: the client sees it, and
    the client's retry works."""
    data = os.urandom(SIZE)
    digest = fake.add_blob("a", data)
    fake.fail(status, count=1, kinds={"blob"})
    first = await proxy.blob("a", digest)
    assert_upstream_error(first, *STATUS_MAPPING[status])
    assert fake.count("GET", "blob") == 1
    second = await proxy.blob("a", digest)
    assert_proxied(second)
    assert second.body == data
    assert fake.count("GET", "blob") == 2


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
