"""Self-tests of the fault-injecting upstream: the proxy tests rely on every knob."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.support.digests import sha256
from tests.support.fake_upstream import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    FakeUpstream,
    basic_header,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


async def read_all(resp: aiohttp.ClientResponse) -> tuple[bytes, BaseException | None]:
    chunks = []
    try:
        async for chunk in resp.content.iter_chunked(65536):
            chunks.append(chunk)
    except (aiohttp.ClientError, ConnectionError) as exc:
        return b"".join(chunks), exc
    return b"".join(chunks), None


async def test_manifest_and_blob(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    image = fake.add_image("team/app", "v1")
    async with session.get(f"{fake.url}/v2/team/app/manifests/v1") as resp:
        assert resp.status == 200
        assert await resp.read() == image.manifest
        assert resp.headers["Docker-Content-Digest"] == image.digest
        assert resp.headers["Content-Type"] == OCI_MANIFEST
        assert resp.headers["Content-Length"] == str(len(image.manifest))
    async with session.head(f"{fake.url}/v2/team/app/manifests/{image.digest}") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(image.manifest))
    layer = image.layers[0]
    async with session.get(f"{fake.url}/v2/team/app/blobs/{sha256(layer)}") as resp:
        assert await resp.read() == layer
    async with session.get(
        f"{fake.url}/v2/team/app/blobs/{sha256(layer)}", headers={"Range": "bytes=10-19"}
    ) as resp:
        assert resp.status == 206
        assert await resp.read() == layer[10:20]
    assert fake.count("GET", "manifest") == 1
    assert fake.count("HEAD", "manifest") == 1
    assert fake.count("GET", "blob") == 2
    assert fake.bytes_sent("blob") == len(layer) + 10


async def test_accept_and_not_found(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.add_image("a", "v1")
    url = f"{fake.url}/v2/a/manifests/v1"
    async with session.get(url, headers={"Accept": DOCKER_MANIFEST}) as resp:
        assert resp.status == 404
    async with session.get(url, headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}) as resp:
        assert resp.status == 200
    async with session.get(f"{fake.url}/v2/a/manifests/nope") as resp:
        assert resp.status == 404
        assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    async with session.get(f"{fake.url}/v2/a/blobs/{sha256(b'x')}") as resp:
        assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    for path in ("manifests/nope", f"blobs/{sha256(b'x')}"):
        async with session.head(f"{fake.url}/v2/a/{path}") as resp:
            assert resp.status == 404
            assert int(resp.headers["Content-Length"]) > 0
            assert await resp.read() == b""
    fake.fail(503, count=1)
    async with session.head(url) as resp:
        assert resp.status == 503
    async with session.get(f"{fake.url}/v2/a/tags/list") as resp:
        assert (await resp.json())["tags"] == ["v1"]


async def test_referrers(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    image = fake.add_image("a", "v1")
    ref = fake.add_referrer("a", image, "application/vnd.example.sig")
    async with session.get(f"{fake.url}/v2/a/referrers/{image.digest}") as resp:
        doc = await resp.json(content_type=None)
    assert [m["digest"] for m in doc["manifests"]] == [ref]


@pytest.mark.parametrize("knob", ["truncate_after", "reset_after"])
async def test_broken_bodies(fake: FakeUpstream, session: aiohttp.ClientSession, knob: str) -> None:
    data = bytes(range(256)) * 1024
    digest = fake.add_blob("a", data)
    setattr(fake.faults, knob, 100_000)
    async with session.get(f"{fake.url}/v2/a/blobs/{digest}") as resp:
        assert resp.status == 200
        body, error = await read_all(resp)
    assert error is not None
    assert len(body) <= 100_000
    assert fake.bytes_sent("blob") == 100_000


async def test_wrong_bytes(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    data = b"hello world" * 100
    digest = fake.add_blob("a", data)
    fake.faults.wrong_bytes = True
    async with session.get(f"{fake.url}/v2/a/blobs/{digest}") as resp:
        body = await resp.read()
    assert len(body) == len(data)
    assert sha256(body) != digest
    assert resp.headers["Docker-Content-Digest"] == digest


async def test_statuses_and_delay(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    digest = fake.add_blob("a", b"x")
    url = f"{fake.url}/v2/a/blobs/{digest}"
    fake.fail(503, count=2)
    statuses = []
    for _ in range(3):
        async with session.get(url) as resp:
            statuses.append(resp.status)
    assert statuses == [503, 503, 200]
    fake.fail(429)
    for _ in range(2):
        async with session.get(url) as resp:
            assert resp.status == 429
    fake.clear_faults()
    fake.faults.delay = 0.3
    start = time.monotonic()
    async with session.get(url) as resp:
        assert resp.status == 200
    assert time.monotonic() - start >= 0.3


async def test_bearer_flow(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.add_image("team/app", "v1")
    fake.auth = "bearer"
    fake.credentials = ("user", "pw")
    fake.token_ttl = 0.5
    url = f"{fake.url}/v2/team/app/manifests/v1"
    async with session.get(url) as resp:
        assert resp.status == 401
        challenge = resp.headers["WWW-Authenticate"]
    assert challenge == (
        f'Bearer realm="{fake.url}/token",service="fake",scope="repository:team/app:pull"'
    )
    token_url = f"{fake.url}/token?service=fake&scope=repository:team/app:pull"
    async with session.get(token_url) as resp:
        assert resp.status == 401
    async with session.get(token_url, headers={"Authorization": basic_header("user", "pw")}) as r:
        token = (await r.json())["token"]
    auth = {"Authorization": f"Bearer {token}"}
    async with session.get(url, headers=auth) as resp:
        assert resp.status == 200
    async with session.get(f"{fake.url}/v2/other/manifests/v1", headers=auth) as resp:
        assert resp.status == 401  # wrong scope
    await asyncio.sleep(0.6)
    async with session.get(url, headers=auth) as resp:
        assert resp.status == 401  # expired
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert len(fake.token_requests) == 2


async def test_basic_auth(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    fake.add_image("a", "v1")
    fake.auth = "basic"
    fake.credentials = ("u", "p")
    url = f"{fake.url}/v2/a/manifests/v1"
    async with session.get(url) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Basic ")
    async with session.get(url, headers={"Authorization": basic_header("u", "p")}) as resp:
        assert resp.status == 200


async def test_redirect_to_cdn(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    data = b"layer" * 1000
    digest = fake.add_blob("a", data)
    fake.redirect_blobs = "cdn"
    url = f"{fake.url}/v2/a/blobs/{digest}"
    async with session.get(url, allow_redirects=False) as resp:
        assert resp.status == 307
        assert resp.headers["Location"].startswith(f"{fake.cdn_url}/cdn/{digest}?")
    async with session.get(url, headers={"Authorization": "Bearer secret"}) as resp:
        assert await resp.read() == data
    (cdn,) = fake.matching("GET", "cdn")
    assert cdn.listener == "cdn"
    assert cdn.authorization is None  # aiohttp drops it across origins
    assert fake.bytes_sent("cdn") == len(data)


async def test_stop_and_start_same_port(fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    url = f"{fake.url}/v2/"
    async with session.get(url) as resp:
        assert resp.status == 200
    port = fake.port
    await fake.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.get(url) as resp:
            pass
    await fake.start()
    assert fake.port == port
    async with session.get(url) as resp:
        assert json.loads(await resp.read()) == {}
