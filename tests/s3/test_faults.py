"""Both stores on an object store that fails: stopped, answering 500/503, slow or hung.

The module runs its own SeaweedFS (stopped and started again by one test) behind a
fault-injecting relay on 127.0.0.1 (`tests/support/faultrelay.py`), and regproxy in this
process as `serve` runs it, its S3 endpoint the relay. What must hold while the store is
down: every request gets a registry answer in bounded time (503 UNAVAILABLE in the OCI
JSON envelope, or a connection cut for a blob body already under way), never a 200 with
wrong or short bytes; one log line per failed request, no traceback; /readyz says not
ready, and ready again after. And once it is back, nothing acknowledged is lost: images
pushed before, and every push answered 201, pull back byte for byte.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from regproxy.config import S3Location
from regproxy.server import health
from regproxy.storage import s3 as s3_backend
from regproxy.storage import s3client
from tests.support.digests import sha256
from tests.support.fake_upstream import FakeUpstream
from tests.support.faultrelay import FaultRelay
from tests.support.images import make_image as make_client_image
from tests.support.images import read_oci_layout, write_oci_layout
from tests.support.oci import Image, make_image, push_image, put_manifest
from tests.support.proxy import fetch, wait_until
from tests.support.s3store import blob_key, bucket_keys, s3_config
from tests.support.seaweed import SeaweedS3
from tests.support.served import ServedRegistry, serve_registry, start_session
from tests.support.skopeo import Skopeo

#: a request to a registry whose store is down must be answered within this (seconds)
ANSWER_WITHIN = 10.0
REPO = "team/app"
FAULTS = {
    "reset": {"mode": "reset"},
    "500": {"mode": "error", "status": 500},
    "503": {"mode": "error", "status": 503},
}

Start = Callable[..., Awaitable[ServedRegistry]]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """This module's own SeaweedFS: one test stops it, which the session's must never be."""
    instance = SeaweedS3(tmp_path_factory.mktemp("seaweed-faults"))
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def relay(engine: SeaweedS3) -> Iterator[FaultRelay]:
    with FaultRelay(engine.ports["s3.port"]) as instance:
        yield instance


@pytest.fixture(autouse=True)
def store_back_up(engine: SeaweedS3, relay: FaultRelay) -> Iterator[None]:
    """Every test ends with the engine running and the relay passing everything."""
    yield
    if engine.process is None or not engine.process.running:
        engine.start()
    relay.target = engine.ports["s3.port"]
    relay.heal()


@pytest.fixture
async def start(engine: SeaweedS3, relay: FaultRelay, tmp_path: Path) -> AsyncIterator[Start]:
    """Start regproxy (both stores in a fresh bucket, reached through the relay)."""
    served: list[ServedRegistry] = []

    async def run(**extra: Any) -> ServedRegistry:
        bucket = await create_bucket(engine)
        config = s3_config(engine, bucket, tmp_path, s3={"endpoint": relay.url}, **extra)
        registry = await serve_registry(config)
        served.append(registry)
        return registry

    try:
        yield run
    finally:
        relay.heal()
        for registry in served:
            await registry.close()


async def create_bucket(engine: SeaweedS3, timeout: float = 20.0) -> str:
    """A fresh bucket; SeaweedFS answers InternalError to CreateBucket for a moment after
    a restart (seen once, right after the engine test; writes to existing buckets work)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.to_thread(engine.create_bucket)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def inject(relay: FaultRelay, fault: str) -> None:
    relay.set(**FAULTS[fault])


async def answer(
    http: aiohttp.ClientSession, method: str, path: str, data: bytes | None = None, **kw: Any
) -> tuple[int, dict[str, Any] | None, float]:
    """(status, JSON body or None, seconds taken) of one request, bounded in time."""
    began = time.monotonic()
    async with asyncio.timeout(ANSWER_WITHIN):
        async with http.request(method, path, data=data, **kw) as resp:
            body = await resp.read()
    taken = time.monotonic() - began
    parsed = None
    if body and resp.headers.get("Content-Type", "").startswith("application/json"):
        parsed = await resp.json()
    return resp.status, parsed, taken


def assert_unavailable(status: int, body: dict[str, Any] | None, method: str, what: str) -> None:
    """503 with the OCI error UNAVAILABLE naming the object store (no body for HEAD)."""
    assert status == 503, f"{what}: {status} {body}"
    if method == "HEAD":
        return
    assert body is not None, what
    (error,) = body["errors"]
    assert error["code"] == "UNAVAILABLE", body
    assert "object store" in error["message"], body


async def readiness(http: aiohttp.ClientSession) -> tuple[int, dict[str, Any]]:
    async with asyncio.timeout(ANSWER_WITHIN):
        async with http.get("/readyz") as resp:
            return resp.status, await resp.json()


async def wait_ready(http: aiohttp.ClientSession, timeout: float = 30.0) -> None:
    async def ready() -> bool:
        return (await readiness(http))[0] == 200

    await wait_until(ready, timeout=timeout, interval=0.2, what="/readyz 200")


async def assert_pulls_back(http: aiohttp.ClientSession, image: Image, tag: str) -> None:
    """The image under `tag` (manifest and every blob) is served byte for byte."""
    async with http.get(f"/v2/{REPO}/manifests/{tag}") as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.read() == image.manifest
    for blob in image.blobs:
        await assert_blob(http, blob)


async def assert_blob(http: aiohttp.ClientSession, blob: bytes) -> None:
    async with http.get(f"/v2/{REPO}/blobs/{sha256(blob)}") as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.read() == blob


async def upload_in_progress(http: aiohttp.ClientSession, data: bytes) -> str:
    """An upload session holding all of `data` (on local disk), not yet committed; the
    URL of its final PUT."""
    location = await start_session(http, REPO)
    headers = {"Content-Range": f"0-{len(data) - 1}"}
    async with http.patch(location, data=data, headers=headers) as resp:
        assert resp.status == 202, await resp.text()
        return f"{resp.headers['Location']}?digest={sha256(data)}"


def traceback_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info or r.exc_text]


# ---- the store down or erroring -----------------------------------------------------------


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_failing_store_answers_503_and_loses_nothing_acknowledged(
    start: Start, relay: FaultRelay, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    registry = await start()
    http = registry.http
    before = make_image((200_000, 3000))
    await push_image(http, REPO, before, "v1")
    pending = os.urandom(300_000)
    commit = await upload_in_progress(http, pending)
    other = os.urandom(5000)
    blob = f"/v2/{REPO}/blobs/{sha256(before.layers[0])}"
    manifest_headers = {"Content-Type": before.media_type}
    requests: list[tuple[str, str, bytes | None, dict[str, str]]] = [
        ("GET", f"/v2/{REPO}/manifests/v1", None, {}),
        ("HEAD", f"/v2/{REPO}/manifests/v1", None, {}),
        ("GET", blob, None, {}),
        ("HEAD", blob, None, {}),
        ("GET", f"/v2/{REPO}/tags/list", None, {}),
        ("GET", "/v2/_catalog", None, {}),
        ("PUT", commit, None, {}),  # the upload in progress, committed to the store
        ("POST", f"/v2/{REPO}/blobs/uploads/?digest={sha256(other)}", other, {}),
        ("PUT", f"/v2/{REPO}/manifests/v2", before.manifest, manifest_headers),
    ]

    inject(relay, fault)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        for method, path, data, headers in requests:
            status, body, taken = await answer(http, method, path, data, headers=headers)
            assert_unavailable(status, body, method, f"{method} {path}")
            assert taken < ANSWER_WITHIN
        status, ready = await readiness(http)
        async with http.get("/healthz") as resp:
            assert resp.status == 200  # the process itself is fine
    assert status == 503, ready
    assert ready["status"] == "not ready"
    assert not ready["storage"]["registry"]["ok"] and not ready["storage"]["proxy"]["ok"]
    assert "object store" in ready["storage"]["registry"]["error"]
    assert ready["storage"]["temporary"]["ok"]
    # one line per failed request, and no traceback anywhere
    assert traceback_records(caplog) == []
    for method, path, _, _ in requests:
        lines = [
            r
            for r in caplog.records
            if r.getMessage().startswith(f"object store error on {method} {path.split('?')[0]}:")
        ]
        assert len(lines) == 1, [r.getMessage() for r in caplog.records]

    relay.heal()
    await wait_ready(http)
    await assert_pulls_back(http, before, "v1")
    # the upload survived the outage: its PUT, tried again, commits it
    status, body, _ = await answer(http, "PUT", commit)
    assert status == 201, body
    await assert_blob(http, pending)
    async with await put_manifest(http, REPO, "v2", before.manifest, before.media_type) as resp:
        assert resp.status == 201, await resp.text()
    await assert_pulls_back(http, before, "v2")


@pytest.mark.parametrize("size", ["single PUT", "multipart"])
async def test_store_dies_while_a_blob_is_uploaded_to_it(
    start: Start,
    engine: SeaweedS3,
    relay: FaultRelay,
    monkeypatch: pytest.MonkeyPatch,
    size: str,
) -> None:
    """The connection carrying a blob to S3 breaks part-way and the store stays down: the
    PUT is a 503, no partial object is ever visible, and the PUT tried again later
    commits the upload in full."""
    if size == "multipart":
        monkeypatch.setattr(s3_backend, "SINGLE_PUT_MAX", 1024 * 1024)
        monkeypatch.setattr(s3_backend, "PART_SIZE", 5 * 1024 * 1024)
        data = os.urandom(11 * 1024 * 1024)  # three parts, sent at once
    else:
        data = os.urandom(3 * 1024 * 1024)
    registry = await start()
    http = registry.http
    commit = await upload_in_progress(http, data)

    relay.set("pass", cut_after=1024 * 1024)
    status, body, _ = await answer(http, "PUT", commit)
    assert_unavailable(status, body, "PUT", f"{size} cut part-way")
    bucket = S3Location.parse(str(registry.config.registry_storage)).bucket
    assert blob_key("registry", sha256(data)) not in bucket_keys(engine, bucket, "registry/")

    relay.heal()
    status, body, _ = await answer(http, "PUT", commit)
    assert status == 201, body
    await assert_blob(http, data)


# ---- slow and hung ----------------------------------------------------------------------


async def test_slow_store_is_slow_but_right(start: Start, relay: FaultRelay) -> None:
    registry = await start()
    http = registry.http
    image = make_image((2 * 1024 * 1024, 4000))
    relay.set("pass", delay=0.01)  # every piece (up to 256 KiB), either way
    await push_image(http, REPO, image, "v1")
    await assert_pulls_back(http, image, "v1")
    assert (await readiness(http))[0] == 200


async def test_hung_store_fails_in_bounded_time(
    start: Start, relay: FaultRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint that takes requests and never answers: requests fail once the S3
    client's read timeout (1 s here) has run out on each try, /readyz answers within its
    own bound with one probe per store in flight, and all is well after."""
    monkeypatch.setattr(s3client, "READ_TIMEOUT", 1.0)
    monkeypatch.setattr(health, "OBJECT_STORE_TIMEOUT", 1.0)
    registry = await start()
    http = registry.http
    image = make_image((100_000, 2000))
    await push_image(http, REPO, image, "v1")

    relay.set("stall")
    status, body, _ = await answer(http, "GET", f"/v2/{REPO}/manifests/v1")
    assert_unavailable(status, body, "GET", "manifest from a hung store")
    probes = []
    for _ in range(3):
        began = time.monotonic()
        status, ready = await readiness(http)
        assert time.monotonic() - began < 3.0
        assert status == 503, ready
        assert "did not answer within 1 s" in ready["storage"]["registry"]["error"], ready
        probes.append(dict(registry.app[health.STORE_PROBES]))
    assert probes[0] == probes[1] == probes[2], "a new probe was started while one hung"

    relay.heal()
    relay.cut()  # the hung connections end (the S3 client would drop them by itself)
    await wait_ready(http)
    await assert_pulls_back(http, image, "v1")


@pytest.mark.parametrize("fault", ["reset", "stall"])
async def test_blob_relay_broken_midway_is_cut_never_completed(
    start: Start,
    relay: FaultRelay,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    """The store fails while a blob streams from it to a client: the 200 and part of the
    body are out, so the client's connection is cut; the bytes it got are the blob's, and
    it never gets a complete-looking body (nor an error answer inside the body)."""
    monkeypatch.setattr(s3client, "READ_TIMEOUT", 1.0)
    registry = await start()
    http = registry.http
    image = make_image((4 * 1024 * 1024,))
    layer = image.layers[0]
    await push_image(http, REPO, image, "v1")

    relay.set("pass", delay=0.1)
    got = b""
    caplog.clear()
    with pytest.raises(aiohttp.ClientPayloadError):
        async with asyncio.timeout(ANSWER_WITHIN):
            async with http.get(f"/v2/{REPO}/blobs/{sha256(layer)}") as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_any():
                    if not got:
                        relay.set(fault)
                    got += chunk
    assert 0 < len(got) < len(layer)
    assert got == layer[: len(got)], "the client got bytes that are not the blob's"
    assert traceback_records(caplog) == []
    cut = [r for r in caplog.records if "connection cut" in r.getMessage()]
    assert len(cut) == 1, [r.getMessage() for r in caplog.records]

    relay.heal()
    relay.cut()
    await assert_blob(http, layer)


# ---- the pull-through cache on a failing store --------------------------------------------


async def test_cache_store_failing_during_a_fetch(
    start: Start, relay: FaultRelay, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The cache's store fails while a blob is fetched into it: the reader's connection is
    cut (never a hang waiting for a commit that cannot come, never a complete body), the
    next reader gets 503 UNAVAILABLE, and after the outage the blob is fetched and cached."""
    registry = await start(proxy={"upstreams": {"fake": {"url": fake.url}}})
    http = registry.http
    image = fake.add_image("lib/app", "v1", layer_sizes=(1024 * 1024,))
    layer = image.layers[0]
    path = f"/v2/p/fake/lib/app/blobs/{sha256(layer)}"
    pulled = await fetch(http, "GET", "/v2/p/fake/lib/app/manifests/v1")
    assert pulled.status == 200

    fake.faults.chunk_delay = 0.05  # 64 KiB pieces: the fetch takes ~0.8 s
    reading = asyncio.ensure_future(fetch(http, "GET", path, timeout=ANSWER_WITHIN))
    await asyncio.sleep(0.3)
    relay.set("error", status=503)
    first = await reading
    assert first.status == 200 and not first.complete, (first.status, first.error)
    assert first.body == layer[: len(first.body)]
    second = await fetch(http, "GET", path, timeout=ANSWER_WITHIN)
    assert second.status == 503 and second.oci_code() == "UNAVAILABLE", second.body[:300]
    assert traceback_records(caplog) == []
    failed = [r for r in caplog.records if "fetch of" in r.getMessage()]
    assert len(failed) == 1, [r.getMessage() for r in caplog.records]

    relay.heal()
    fake.faults.chunk_delay = 0.0
    again = await fetch(http, "GET", path, timeout=ANSWER_WITHIN)
    assert (again.status, again.complete, again.body == layer) == (200, True, True)
    cached = await fetch(http, "GET", path, timeout=ANSWER_WITHIN)
    assert (cached.cache_status, cached.body == layer) == ("HIT", True)


# ---- a real client ----------------------------------------------------------------------


async def test_skopeo_push_while_the_store_is_down(
    start: Start, relay: FaultRelay, tmp_path: Path
) -> None:
    """skopeo fails with the registry's 503 (not a hang, not a success), and the same
    push succeeds once the store is back; the image then pulls back digest for digest."""
    skopeo = Skopeo(tmp_path / "skopeo")
    registry = await start()
    image = make_client_image("s3-faults-skopeo", (64 * 1024, 700 * 1024))
    layout = write_oci_layout(tmp_path / "image", image, "v1")
    ref = f"docker://127.0.0.1:{registry.port}/{REPO}:v1"

    relay.set("reset")
    began = time.monotonic()
    failed = await asyncio.to_thread(
        skopeo, "copy", "--dest-tls-verify=false", f"oci:{layout}:v1", ref, check=False
    )
    assert failed.returncode != 0
    assert time.monotonic() - began < 60
    # its first requests are HEADs of the blobs: a status without a body to quote
    assert "503 (Service Unavailable)" in failed.stderr, failed.stderr

    relay.heal()
    await wait_ready(registry.http)
    await asyncio.to_thread(skopeo.copy, f"oci:{layout}:v1", ref, "--preserve-digests")
    out = tmp_path / "out"
    await asyncio.to_thread(skopeo.copy, ref, f"oci:{out}:v1", "--preserve-digests")
    assert read_oci_layout(out, "v1")["digest"] == image.manifest_digest


# ---- the engine itself stopped (last: the engine takes a moment to settle after) --------


async def test_engine_stopped_mid_upload_then_started_again(
    start: Start, engine: SeaweedS3, relay: FaultRelay
) -> None:
    """The SeaweedFS process itself stops between an upload's PATCH and its PUT, and
    comes back (on other ports, with its data): the upload completes, nothing is lost."""
    registry = await start()
    http = registry.http
    before = make_image((150_000, 2000))
    await push_image(http, REPO, before, "v1")
    layer = os.urandom(2_000_000)
    commit = await upload_in_progress(http, layer)

    await asyncio.to_thread(engine.stop)
    status, body, _ = await answer(http, "PUT", commit)
    assert_unavailable(status, body, "PUT", "commit while the engine is stopped")
    status, body, _ = await answer(http, "GET", f"/v2/{REPO}/manifests/v1")
    assert_unavailable(status, body, "GET", "manifest while the engine is stopped")
    assert (await readiness(http))[0] == 503

    await asyncio.to_thread(engine.start)
    relay.target = engine.ports["s3.port"]
    await wait_ready(http)
    status, body, _ = await answer(http, "PUT", commit)
    assert status == 201, body
    await assert_pulls_back(http, before, "v1")
    await assert_blob(http, layer)
