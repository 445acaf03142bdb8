"""A private registry behind a private CA, and one that demands a client certificate.

The upstream is `TlsFakeUpstream` (tests/support/tls_upstream.py): the fault-injecting
fake over TLS with a certificate from a test CA; its blob redirects go to a second host
name (`localhost`) on the same CA. Verification is never off for an https:// URL: without
`ca_file` the pull is refused with the error an unreachable upstream gets, and the
reason (OpenSSL's, with the host) is in the error, the log and /readyz.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from regproxy.errors import ConfigError
from tests.support.certs import TestCA
from tests.support.digests import sha256
from tests.support.inprocess import make_config
from tests.support.proxy import Proxy, ProxyFactory, assert_proxied, assert_upstream_error
from tests.support.tls_upstream import TlsFakeUpstream, running

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def mtls_fake(ca: TestCA, tmp_path: Path) -> AsyncIterator[TlsFakeUpstream]:
    upstream = TlsFakeUpstream(ca, tmp_path / "mtls", require_client_certificate=True)
    async for started in running(upstream):
        yield started


async def _proxy(make_proxy: ProxyFactory, upstream: TlsFakeUpstream, **keys: Any) -> Proxy:
    return await make_proxy(upstreams={"private": {"url": upstream.url, "tag_ttl": 0, **keys}})


async def _pull(proxy: Proxy, fake: TlsFakeUpstream, repo: str) -> None:
    """Pull an image the fake holds: manifest and every blob, redirected to the CDN."""
    image = fake.add_image(repo, "v1")
    fake.redirect_blobs = "cdn"
    fake.auth = "bearer"
    manifest = await proxy.manifest(repo, "v1")
    assert_proxied(manifest)
    assert manifest.body == image.manifest
    for blob in image.blobs:
        got = await proxy.blob(repo, sha256(blob))
        assert_proxied(got)
        assert got.body == blob
    assert fake.count(kind="cdn") == len(image.blobs)  # the CDN host answered them


async def test_a_private_ca_is_trusted_with_ca_file(
    tls_fake: TlsFakeUpstream, ca: TestCA, make_proxy: ProxyFactory
) -> None:
    proxy = await _proxy(make_proxy, tls_fake, ca_file=str(ca.ca_file))
    await _pull(proxy, tls_fake, "team/app")
    ready = await proxy.client.get("/readyz")
    upstream = (await ready.json())["upstreams"]["private"]
    assert upstream["reachable"] is True, upstream


async def test_without_ca_file_the_upstream_is_refused_and_the_reason_named(
    tls_fake: TlsFakeUpstream, make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="regproxy.upstream")
    tls_fake.add_image("team/app", "v1")
    proxy = await _proxy(make_proxy, tls_fake)
    pulled = await proxy.manifest("team/app", "v1")
    assert_upstream_error(pulled, 503, "UNAVAILABLE")
    message = pulled.json()["errors"][0]["message"]
    host = f"127.0.0.1:{tls_fake.port}"
    assert "certificate verify failed" in message and host in message, message
    assert tls_fake.count(kind="manifest") == 0  # no request got past the handshake
    # the log names the upstream and the problem, once however many pulls fail
    assert (await proxy.manifest("team/app", "v1")).status == 503
    assert (await proxy.manifest("team/other", "v2")).status == 503
    warnings = [r.getMessage() for r in caplog.records if r.name == "regproxy.upstream"]
    assert len(warnings) == 1, warnings
    assert "upstream private" in warnings[0] and "certificate verify failed" in warnings[0]
    # /readyz: the upstream's state says why
    ready = await proxy.client.get("/readyz")
    state = (await ready.json())["upstreams"]["private"]
    assert state["reachable"] is False and "certificate verify failed" in state["error"], state


async def test_mutual_tls_works_with_the_client_certificate(
    mtls_fake: TlsFakeUpstream, ca: TestCA, tmp_path: Path, make_proxy: ProxyFactory
) -> None:
    client = ca.issue_client(tmp_path / "client")
    proxy = await _proxy(
        make_proxy,
        mtls_fake,
        ca_file=str(ca.ca_file),
        tls_client_certificate=str(client.certificate),
        tls_client_key=str(client.key),
    )
    await _pull(proxy, mtls_fake, "team/app")


async def test_mutual_tls_without_the_client_certificate_fails_cleanly(
    mtls_fake: TlsFakeUpstream, ca: TestCA, make_proxy: ProxyFactory
) -> None:
    mtls_fake.add_image("team/app", "v1")
    proxy = await _proxy(make_proxy, mtls_fake, ca_file=str(ca.ca_file))
    pulled = await proxy.manifest("team/app", "v1")
    assert_upstream_error(pulled, 503, "UNAVAILABLE")
    message = pulled.json()["errors"][0]["message"]
    assert "client certificate" in message and "tls_client_certificate" in message, message
    assert mtls_fake.count(kind="manifest") == 0
    ready = await proxy.client.get("/readyz")
    state = (await ready.json())["upstreams"]["private"]
    assert state["reachable"] is False and "client certificate" in state["error"], state


async def test_plain_http_upstreams_stay_allowed(make_proxy: ProxyFactory, fake: Any) -> None:
    image = fake.add_image("team/app", "v1")
    proxy = await make_proxy()
    assert fake.url.startswith("http://")
    pulled = await proxy.manifest("team/app", "v1")
    assert_proxied(pulled)
    assert pulled.body == image.manifest


@pytest.mark.parametrize(
    ("keys", "error"),
    [
        ({"ca_file": "missing.pem"}, "proxy.upstreams.private.ca_file: cannot load"),
        ({"ca_file": "not-pem.txt"}, "proxy.upstreams.private.ca_file: cannot load"),
        ({"tls_client_certificate": "c.pem"}, "tls_client_certificate and tls_client_key"),
        ({"proxy": "socks5://127.0.0.1:1080"}, "proxy.upstreams.private.proxy: expected http://"),
        ({"proxy": "http://u:secret@host:3128/path"}, "u:***@host"),
    ],
)
async def test_bad_tls_and_proxy_settings_stop_the_start_with_the_key(
    tmp_path: Path, keys: dict[str, str], error: str
) -> None:
    (tmp_path / "not-pem.txt").write_text("not a certificate\n")
    upstream = {"url": "https://registry.invalid", **keys}
    with pytest.raises(ConfigError, match=error.replace("*", r"\*")) as caught:
        config = make_config(tmp_path, proxy={"upstreams": {"private": upstream}})
        from regproxy.proxy.upstream import Upstream

        Upstream("private", config.proxy.upstreams["private"], None)  # type: ignore[arg-type]
    assert "secret" not in str(caught.value)
