"""Upstream authentication (Bearer token flow, Basic) and blob redirects to a CDN."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from tests.support.digests import sha256
from tests.support.fake_upstream import FakeUpstream, basic_header
from tests.support.proxy import Proxy, ProxyFactory, assert_proxied, assert_upstream_error

pytestmark = pytest.mark.timeout(30)


async def pull_image(
    proxy: Proxy, repo: str, tag: str, manifest: bytes, blobs: list[bytes]
) -> None:
    pulled = await proxy.manifest(repo, tag)
    assert_proxied(pulled)
    assert pulled.body == manifest
    for blob in blobs:
        got = await proxy.blob(repo, sha256(blob))
        assert_proxied(got)
        assert got.body == blob


async def test_anonymous_token_flow_and_token_cache(fake: FakeUpstream, proxy: Proxy) -> None:
    first = fake.add_image("team/app", "v1")
    second = fake.add_image("team/app", "v2")
    other = fake.add_image("team/other", "v1")
    fake.auth = "bearer"
    await pull_image(proxy, "team/app", "v1", first.manifest, first.blobs)
    await pull_image(proxy, "team/app", "v2", second.manifest, second.blobs)
    tokens = fake.token_requests
    assert len(tokens) == 1, [t.query for t in tokens]
    query = parse_qs(tokens[0].query)
    assert query["service"] == ["fake"]
    assert "repository:team/app:pull" in " ".join(query["scope"])
    assert tokens[0].authorization is None  # anonymous
    served = [r for r in fake.matching(status=200) if r.kind != "token"]
    assert served
    assert all((r.authorization or "").startswith("Bearer ") for r in served)
    await pull_image(proxy, "team/other", "v1", other.manifest, other.blobs)
    assert len(fake.token_requests) == 2  # one per scope


async def test_expired_token_is_renewed(fake: FakeUpstream, proxy: Proxy) -> None:
    image = fake.add_image("a", "v1")
    fake.auth = "bearer"
    fake.token_ttl = 1
    pulled = await proxy.manifest("a", "v1")
    assert_proxied(pulled)
    await asyncio.sleep(1.2)
    blob = await proxy.blob("a", sha256(image.layers[0]))
    assert_proxied(blob)
    assert blob.body == image.layers[0]
    assert len(fake.token_requests) == 2


@pytest.mark.parametrize("source", ["password", "password_env", "password_file"])
async def test_configured_credentials_go_to_the_token_endpoint(
    fake: FakeUpstream,
    make_proxy: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    source: str,
) -> None:
    image = fake.add_image("private/app", "v1")
    fake.auth = "bearer"
    fake.credentials = ("alice", "s3cret")
    settings: dict[str, str] = {"username": "alice"}
    if source == "password":
        settings["password"] = "s3cret"
    elif source == "password_env":
        monkeypatch.setenv("FAKE_UPSTREAM_PASSWORD", "s3cret")
        settings["password_env"] = "FAKE_UPSTREAM_PASSWORD"
    else:
        secret = tmp_path / "password.txt"
        secret.write_text("s3cret\n")
        settings["password_file"] = str(secret)
    proxy = await make_proxy(upstream=settings)
    await pull_image(proxy, "private/app", "v1", image.manifest, image.blobs)
    tokens = fake.token_requests
    assert len(tokens) == 1
    assert tokens[0].authorization == basic_header("alice", "s3cret")
    registry = [r for r in fake.requests if r.kind != "token"]
    assert not any((r.authorization or "").startswith("Basic ") for r in registry)


async def test_wrong_credentials_fail_cleanly(fake: FakeUpstream, make_proxy: ProxyFactory) -> None:
    image = fake.add_image("private/app", "v1")
    fake.auth = "bearer"
    fake.credentials = ("alice", "s3cret")
    proxy = await make_proxy(upstream={"username": "alice", "password": "wrong"})
    pulled = await proxy.manifest("private/app", "v1")
    assert_upstream_error(pulled, 403, "DENIED")
    blob = await proxy.blob("private/app", sha256(image.layers[0]))
    assert_upstream_error(blob, 403, "DENIED")
    assert not proxy.is_cached(image.digest)


async def test_basic_auth_upstream(fake: FakeUpstream, make_proxy: ProxyFactory) -> None:
    image = fake.add_image("a", "v1")
    fake.auth = "basic"
    fake.credentials = ("bob", "pw")
    proxy = await make_proxy(upstream={"username": "bob", "password": "pw"})
    await pull_image(proxy, "a", "v1", image.manifest, image.blobs)
    assert fake.token_requests == []
    served = [r for r in fake.matching(status=200) if r.kind != "token"]
    assert served
    assert all(r.authorization == basic_header("bob", "pw") for r in served)


@pytest.fixture(params=["127.0.0.1", "127.0.0.2"], ids=["other-port", "other-address"])
async def cdn_fake(request: pytest.FixtureRequest) -> AsyncIterator[FakeUpstream]:
    """A fake whose CDN listens on another port, or another loopback address too."""
    upstream = FakeUpstream(cdn_host=request.param)
    try:
        await upstream.start()
    except OSError:
        pytest.skip(f"cannot listen on {request.param}")
    try:
        yield upstream
    finally:
        await upstream.close()


async def test_redirect_to_another_host_drops_authorization(
    cdn_fake: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    fake = cdn_fake
    data = os.urandom(300_000)
    digest = fake.add_blob("team/app", data)
    fake.auth = "bearer"
    fake.redirect_blobs = "cdn"
    proxy = await make_proxy(upstreams={"fake": {"url": fake.url, "tag_ttl": "2s"}})
    pulled = await proxy.blob("team/app", digest)
    assert_proxied(pulled)
    assert pulled.body == data
    (redirected,) = fake.matching("GET", "blob", status=307)
    assert (redirected.authorization or "").startswith("Bearer ")
    (cdn,) = fake.matching("GET", "cdn")
    assert cdn.listener == "cdn"
    assert cdn.authorization is None, "the registry token was sent to the CDN"
    assert fake.bytes_sent("cdn") == len(data)
    warm = await proxy.blob("team/app", digest)
    assert warm.cache_status == "HIT"
    assert fake.count("GET", "cdn") == 1


async def test_redirect_on_the_same_host(fake: FakeUpstream, proxy: Proxy) -> None:
    data = os.urandom(100_000)
    digest = fake.add_blob("a", data)
    fake.redirect_blobs = "same-host"
    pulled = await proxy.blob("a", digest)
    assert_proxied(pulled)
    assert pulled.body == data
    assert fake.count("GET", "cdn") == 1


async def test_redirect_urls_are_not_reused(fake: FakeUpstream, proxy: Proxy) -> None:
    """After a CDN body breaks, the next fetch asks the registry again for a fresh URL."""
    data = os.urandom(300_000)
    digest = fake.add_blob("a", data)
    fake.redirect_blobs = "cdn"
    fake.faults.truncate_after = 100_000
    first = await proxy.blob("a", digest)
    if first.status == 200 and first.complete:
        # the proxy resumed the download with Range requests: fine, if the bytes are right
        assert first.body == data
        return
    fake.clear_faults()
    pulled = await proxy.blob("a", digest)
    assert_proxied(pulled)
    assert pulled.body == data
    assert len(fake.matching("GET", "blob", status=307)) >= 2
