"""Authorisation and routing decide from one parsed target (issue 11, items 1 and 4).

An empty or repeated `ns` query parameter once made the auth layer apply the proxy
rule (`auth.proxy_pull`) while routing served the local repository: with
`proxy_pull = ["anonymous"]` anybody read every pushed image. And pulls that
`proxy.mirror_upstream` routes to the upstream were authorised by the local rules,
not by `proxy_pull`. The matrix: `ns` shapes × read routes × GET/HEAD × auth modes,
asked by callers that may pull through the cache but not the local repository.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.support.auth import Caller, RegistryFactory, auth_config, push_image_as
from tests.support.digests import sha256
from tests.support.inprocess import make_config, start_client
from tests.support.oci import Image, make_image

#: every way to say `ns` that is not one clean upstream name
NS_SHAPES = ("ns=", "ns", "ns=&ns=up", "ns=up&ns=", "ns=&ns=", "ns=up&ns=up", "n%73=")
MODES = ("token", "basic")
#: alice/app: only alice (and admins) may pull it; bob and anonymous may pull the cache
SECRET = "alice/app"


def read_paths(image: Image) -> list[tuple[str, str]]:
    """(method, path) of every read route of the secret repository."""
    config_digest, layer_digest = sha256(image.config), sha256(image.layers[-1])
    paths = [
        f"/v2/{SECRET}/manifests/v1",
        f"/v2/{SECRET}/manifests/{image.digest}",
        f"/v2/{SECRET}/blobs/{config_digest}",
        f"/v2/{SECRET}/blobs/{layer_digest}",
        f"/v2/{SECRET}/tags/list",
        f"/v2/{SECRET}/referrers/{image.digest}",
    ]
    return [(method, path) for path in paths for method in ("GET", "HEAD")]


def leaked(image: Image, status: int, body: bytes) -> bool:
    """A 2xx answer, or a body carrying the secret image's bytes."""
    if 200 <= status < 300:
        return True
    return any(blob in body for blob in (image.manifest, *image.blobs) if len(blob) > 16)


@pytest.mark.parametrize("mode", MODES)
async def test_ns_shapes_never_bypass_pull_rules(
    registry_factory: RegistryFactory, mode: str
) -> None:
    registry = await registry_factory(mode, auth={"proxy_pull": ["anonymous"]})
    secret = registry.images[SECRET]
    leaks = []
    for party in (None, "bob"):
        who = Caller(party)
        for method, path in read_paths(secret):
            for shape in NS_SHAPES:
                result = await who.request(registry.client, mode, method, f"{path}?{shape}")
                if leaked(secret, result.status, result.body):
                    leaks.append((who.label, method, f"{path}?{shape}", result.status))
    assert leaks == []


@pytest.mark.parametrize("mode", MODES)
async def test_ns_shapes_route_as_authorised(registry_factory: RegistryFactory, mode: str) -> None:
    """The owner gets exactly what routing means: an empty `ns` is no `ns` (the local
    repository), a repeated one is refused, a configured one is the upstream."""
    registry = await registry_factory(mode, auth={"proxy_pull": ["anonymous"]})
    alice = Caller("alice")
    path = f"/v2/{SECRET}/tags/list"
    for shape in ("ns=", "ns"):
        result = await alice.request(registry.client, mode, "GET", f"{path}?{shape}")
        assert result.status == 200, (shape, result.status, result.body)
        assert result.json()["name"] == SECRET
    for shape in ("ns=&ns=up", "ns=up&ns=", "ns=up&ns=up"):
        result = await alice.request(registry.client, mode, "GET", f"{path}?{shape}")
        assert (result.status, result.codes()) == (400, ["NAME_INVALID"]), shape
    # a clean `ns=up`: the upstream's alice/app, which it does not have
    result = await alice.request(registry.client, mode, "GET", f"{path}?ns=up")
    assert (result.status, result.codes()) == (404, ["NAME_UNKNOWN"])


async def test_ns_shapes_without_auth(tmp_path: Path, upstream: tuple[TestClient, Image]) -> None:
    """No auth: the same routing, every shape answered, never a 5xx."""
    up_client, _ = upstream
    proxy = {"upstreams": {"up": {"url": f"http://127.0.0.1:{up_client.port}"}}}
    client = await start_client(make_config(tmp_path / "open", proxy=proxy))
    try:
        image = make_image((300, 400))
        await push_image_as(client, "team/app", image, ("v1",), None)
        for shape in ("ns=", "ns"):
            async with client.get(f"/v2/team/app/manifests/v1?{shape}") as resp:
                assert resp.status == 200
                assert await resp.read() == image.manifest
        async with client.get("/v2/team/app/manifests/v1?ns=&ns=up") as resp:
            assert resp.status == 400
    finally:
        await client.close()


@pytest.fixture
async def mirror_registry(
    tmp_path: Path, upstream: tuple[TestClient, Image]
) -> AsyncIterator[dict[str, Any]]:
    """A registry whose local rules let anybody pull `lib/*`, mirroring `up`, with the
    cache open to alice only."""
    up_client, up_image = upstream
    rules = [{"repository": "lib/*", "pull": ["anonymous"], "push": ["alice"]}]
    started = []
    registries = {}
    for mode in MODES:
        base = tmp_path / mode
        base.mkdir()
        auth = auth_config(base, mode, rules=rules, proxy_pull=["alice"])
        proxy = {
            "upstreams": {"up": {"url": f"http://127.0.0.1:{up_client.port}"}},
            "mirror_upstream": "up",
        }
        client = await start_client(make_config(base, auth=auth, proxy=proxy))
        started.append(client)
        registries[mode] = client
    try:
        yield {"clients": registries, "image": up_image}
    finally:
        for client in started:
            await client.close()


@pytest.mark.parametrize("mode", MODES)
async def test_mirror_pulls_follow_proxy_pull(mirror_registry: dict[str, Any], mode: str) -> None:
    client = mirror_registry["clients"][mode]
    image: Image = mirror_registry["image"]
    path = "/v2/lib/app/manifests/v1"  # not pushed here: the mirror routes it upstream
    for who in (Caller(None), Caller("bob")):
        result = await who.request(client, mode, "GET", path)
        assert result.status in (401, 403), (who.label, result.status)
        assert image.manifest not in result.body
        blob = await who.request(client, mode, "GET", f"/v2/lib/app/blobs/{sha256(image.config)}")
        assert blob.status in (401, 403), (who.label, blob.status)
    result = await Caller("alice").request(client, mode, "GET", path)
    assert result.status == 200
    assert result.body == image.manifest
