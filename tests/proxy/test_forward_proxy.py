"""Upstreams reached only through a corporate forward proxy: Debian's tinyproxy on loopback.

The upstream is `TlsFakeUpstream` (TLS from a test CA, Bearer token flow, blob GETs
redirected to a CDN on the host name `localhost`). tinyproxy allows CONNECT only to the
registry's and the CDN's ports, and logs every request it reads: a CONNECT line per
tunnel proves the way a request took; stopping tinyproxy proves there is no other.
regproxy reads `https_proxy` / `HTTPS_PROXY` / `no_proxy` when it starts, so each test
sets them before it starts regproxy.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from regproxy.errors import ConfigError
from regproxy.proxy.upstream import ProxyRules
from regproxy.server.health import PROBES
from regproxy.server.keys import PROXY
from tests.support.certs import TestCA
from tests.support.digests import sha256
from tests.support.fake_upstream import FakeImage, FakeUpstream
from tests.support.proxy import Proxy, ProxyFactory, assert_proxied, assert_upstream_error
from tests.support.tinyproxy import Tinyproxy
from tests.support.tls_upstream import TlsFakeUpstream

pytestmark = pytest.mark.timeout(60)

PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start from an environment without proxy variables (a developer's may have some)."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "ca")


@pytest.fixture
async def upstream(ca: TestCA, tmp_path: Path) -> AsyncIterator[TlsFakeUpstream]:
    fake = TlsFakeUpstream(ca, tmp_path / "upstream")
    await fake.start()
    fake.auth = "bearer"  # the token realm is the registry's host: one more tunnel
    fake.redirect_blobs = "cdn"
    try:
        yield fake
    finally:
        await fake.close()


def _tinyproxy(tmp_path: Path, ports: list[int], **kwargs: Any) -> Iterator[Tinyproxy]:
    proxy = Tinyproxy(tmp_path / "tinyproxy", connect_ports=ports, **kwargs)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def tinyproxy(tmp_path: Path, upstream: TlsFakeUpstream) -> Iterator[Tinyproxy]:
    yield from _tinyproxy(tmp_path, [upstream.port, upstream.cdn_port])


async def _regproxy(make_proxy: ProxyFactory, fake: FakeUpstream, ca: TestCA, **keys: Any) -> Proxy:
    table = {"url": fake.url, "tag_ttl": 0, "ca_file": str(ca.ca_file), **keys}
    return await make_proxy(upstreams={"corp": table})


async def _pull(proxy: Proxy, fake: FakeUpstream, repo: str, tag: str = "v1") -> FakeImage:
    image = fake.add_image(repo, tag)
    manifest = await proxy.manifest(repo, tag)
    assert_proxied(manifest)
    assert manifest.body == image.manifest
    for blob in image.blobs:
        got = await proxy.blob(repo, sha256(blob))
        assert_proxied(got)
        assert got.body == blob
    return image


def _hosts(upstream: TlsFakeUpstream) -> tuple[str, str]:
    return f"127.0.0.1:{upstream.port}", f"localhost:{upstream.cdn_port}"


async def test_a_pull_reaches_the_upstream_only_through_the_proxy(
    upstream: TlsFakeUpstream,
    tinyproxy: Tinyproxy,
    ca: TestCA,
    make_proxy: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", tinyproxy.url)
    proxy = await _regproxy(make_proxy, upstream, ca)
    image = await _pull(proxy, upstream, "team/app")
    registry, cdn = _hosts(upstream)
    tunnels = tinyproxy.connects()
    # registry (manifest, token realm) and the redirected blob GETs, every one tunnelled
    assert registry in tunnels and cdn in tunnels, tunnels
    assert set(tunnels) == {registry, cdn}, tunnels
    assert upstream.count(kind="cdn") == len(image.blobs) and upstream.token_requests
    # /readyz's probe goes the same way
    ready = await proxy.client.get("/readyz")
    assert (await ready.json())["upstreams"]["corp"]["reachable"] is True
    probe = proxy.client.server.app[PROBES].task
    assert probe is not None
    await probe  # it runs in the background: done before the proxy goes away
    assert proxy.client.server.app[PROXY].upstreams["corp"].state.reachable is True
    # without the proxy there is no way to the upstream: no direct connection is tried
    tinyproxy.stop()
    before = len(upstream.requests)
    pulled = await proxy.manifest("team/other", "v1")
    assert_upstream_error(pulled, 503, "UNAVAILABLE")
    message = pulled.json()["errors"][0]["message"]
    assert f"cannot connect to proxy http://127.0.0.1:{tinyproxy.port}" in message, message
    assert len(upstream.requests) == before


async def test_a_large_blob_through_the_tunnel_is_decrypted_by_the_pump(
    upstream: TlsFakeUpstream,
    tinyproxy: Tinyproxy,
    ca: TestCA,
    make_proxy: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
    tls_reads: list[int],
) -> None:
    """A blob large enough for the pump, over TLS inside a CONNECT tunnel: the connection
    asyncio started TLS on is lent to the pump like any other, and the bytes are exact."""
    monkeypatch.setenv("HTTPS_PROXY", tinyproxy.url)
    proxy = await _regproxy(make_proxy, upstream, ca)
    data = os.urandom(3 * 1024 * 1024 + 5)
    digest = upstream.add_blob("team/big", data)
    pulled = await proxy.blob("team/big", digest)
    assert_proxied(pulled)
    assert pulled.body == data
    assert sum(tls_reads) > 2 * 1024 * 1024, tls_reads
    assert f"localhost:{upstream.cdn_port}" in tinyproxy.connects()


@pytest.mark.parametrize(
    ("no_proxy", "direct"),
    [
        ("localhost", {"cdn"}),  # the CDN directly, the registry through the proxy
        (".localhost", {"cdn"}),
        ("127.0.0.1", {"registry"}),
        ("127.0.0.0/8", {"registry"}),  # an address block (localhost is a name)
        ("127.0.0.1:{port}", {"registry"}),  # with the port
        ("127.0.0.1:1", set()),  # another port: still proxied
        ("example.com, LOCALHOST ,127.0.0.1", {"registry", "cdn"}),
        ("*", {"registry", "cdn"}),
    ],
)
async def test_no_proxy_sends_named_hosts_directly(
    upstream: TlsFakeUpstream,
    tinyproxy: Tinyproxy,
    ca: TestCA,
    make_proxy: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
    no_proxy: str,
    direct: set[str],
) -> None:
    monkeypatch.setenv("https_proxy", tinyproxy.url)  # lower case works too
    monkeypatch.setenv("NO_PROXY", no_proxy.format(port=upstream.port))
    proxy = await _regproxy(make_proxy, upstream, ca)
    await _pull(proxy, upstream, "team/app")
    registry, cdn = _hosts(upstream)
    tunnels = set(tinyproxy.connects())
    expected = {name for name, host in (("registry", registry), ("cdn", cdn)) if name not in direct}
    assert tunnels == {dict(registry=registry, cdn=cdn)[name] for name in expected}, tunnels


async def test_the_upstreams_own_proxy_overrides_the_environment(
    upstream: TlsFakeUpstream,
    tinyproxy: Tinyproxy,
    ca: TestCA,
    make_proxy: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "*")
    proxy = await _regproxy(make_proxy, upstream, ca, proxy=tinyproxy.url)
    await _pull(proxy, upstream, "team/app")
    assert set(tinyproxy.connects()) == set(_hosts(upstream))


async def test_proxy_credentials_are_sent_and_never_shown(
    upstream: TlsFakeUpstream,
    tmp_path: Path,
    ca: TestCA,
    make_proxy: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for tinyproxy in _tinyproxy(
        tmp_path, [upstream.port, upstream.cdn_port], credentials=("corp", "s3cret")
    ):
        monkeypatch.setenv("HTTPS_PROXY", tinyproxy.url)
        proxy = await _regproxy(make_proxy, upstream, ca)
        await _pull(proxy, upstream, "team/app")
        assert tinyproxy.connects()
        # a wrong password: refused by the proxy, said without the password
        monkeypatch.setenv("HTTPS_PROXY", tinyproxy.url.replace("s3cret", "wrong"))
        refused = await _regproxy(make_proxy, upstream, ca)
        pulled = await refused.manifest("team/app", "v2")
        assert_upstream_error(pulled, 503, "UNAVAILABLE")
        message = pulled.json()["errors"][0]["message"]
        # (tinyproxy answers 401 where RFC 9110 says 407)
        assert "answered 40" in message and "corp:***@" in message, message
        assert "wrong" not in message


async def test_a_plain_http_upstream_goes_through_http_proxy(
    fake: FakeUpstream, tmp_path: Path, make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    for tinyproxy in _tinyproxy(tmp_path, []):
        monkeypatch.setenv("HTTP_PROXY", tinyproxy.url)
        monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # not for http:// URLs
        image = fake.add_image("team/app", "v1")
        proxy = await make_proxy()
        pulled = await proxy.manifest("team/app", "v1")
        assert_proxied(pulled)
        assert pulled.body == image.manifest
        targets = [target for _, target in tinyproxy.requests()]
        assert f"{fake.url}/v2/team/app/manifests/v1" in targets, targets


def test_no_proxy_rules() -> None:
    rules = ProxyRules.from_environment(
        {
            "HTTPS_PROXY": "proxy.corp:3128",  # no scheme: http:// (as curl)
            "http_proxy": "http://plain.corp:8080",
            "NO_PROXY": " .Internal.Example,10.0.0.0/8, [::1]:5000,registry.local:443,",
        }
    )
    assert rules.https == "http://proxy.corp:3128"
    proxied = {
        "https://registry-1.docker.io/v2/": "http://proxy.corp:3128",
        "http://registry-1.docker.io/v2/": "http://plain.corp:8080",
        "https://notinternal.example/v2/": "http://proxy.corp:3128",
        "https://11.0.0.1/v2/": "http://proxy.corp:3128",
        "https://[::1]:5001/v2/": "http://proxy.corp:3128",
        "https://registry.local:5000/v2/": "http://proxy.corp:3128",
        "https://127.0.0.1/v2/": "http://proxy.corp:3128",  # loopback is not exempt
    }
    direct = [
        "https://internal.example/v2/",
        "https://a.b.INTERNAL.example./v2/",
        "https://10.1.2.3:5000/v2/",
        "https://[::1]:5000/v2/",
        "https://registry.local/v2/",
    ]
    for url, proxy in proxied.items():
        assert rules.proxy_for(url) == proxy, url
    for url in direct:
        assert rules.proxy_for(url) is None, url
    assert ProxyRules.from_environment({}).proxy_for("https://x/") is None
    # lower case first, as curl and Python read them
    both = {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:1"}
    assert ProxyRules.from_environment(both).https == "http://lower:1"
    with pytest.raises(ConfigError, match=r"HTTPS_PROXY: expected an http:// proxy.*\*\*\*@"):
        ProxyRules.from_environment({"HTTPS_PROXY": "socks5://u:pw@p:1080"})
