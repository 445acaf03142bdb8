"""Pull-through basics: exact bytes and headers, routing, dialects, refusals, 404s."""

from __future__ import annotations

import pytest

from tests.support.digests import sha256
from tests.support.fake_upstream import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    FakeUpstream,
)
from tests.support.oci import make_image, push_image
from tests.support.proxy import (
    ALL_MANIFEST_TYPES,
    CACHE_STATUSES,
    Proxy,
    ProxyFactory,
    assert_proxied,
    fetch,
)

pytestmark = pytest.mark.timeout(30)

MANIFEST_TYPES = {OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST}


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST])
async def test_manifest_bytes_and_headers(
    fake: FakeUpstream, proxy: Proxy, media_type: str
) -> None:
    image = fake.add_image("team/app", "v1", media_type=media_type)
    for reference, expected_status in (("v1", "MISS"), ("v1", "HIT"), (image.digest, "HIT")):
        pulled = await proxy.manifest("team/app", reference)
        assert_proxied(pulled)
        assert pulled.body == image.manifest
        assert pulled.headers["Docker-Content-Digest"] == image.digest
        assert pulled.headers["Content-Type"] == media_type
        assert pulled.headers["Content-Length"] == str(len(image.manifest))
        assert pulled.cache_status == expected_status, reference
    head = await proxy.head(
        proxy.path("team/app", "manifests", "v1"), {"Accept": ALL_MANIFEST_TYPES}
    )
    assert head.status == 200
    assert head.headers["Docker-Content-Digest"] == image.digest
    assert head.headers["Content-Length"] == str(len(image.manifest))
    assert head.cache_status in CACHE_STATUSES
    assert fake.count("GET", "manifest") == 1


async def test_upstream_is_asked_with_the_full_accept_list(
    fake: FakeUpstream, proxy: Proxy
) -> None:
    """The proxy asks for every manifest type even when the client accepts one."""
    child = fake.add_image("multi", None)
    index = fake.add_index("multi", "v1", [child])
    pulled = await proxy.manifest("multi", "v1", accept=OCI_INDEX)
    assert_proxied(pulled)
    assert pulled.headers["Docker-Content-Digest"] == index
    sent = [r for r in fake.requests if r.kind == "manifest"]
    assert sent
    for request in sent:
        accepted = {
            t.split(";")[0].strip()
            for t in ",".join(request.headers.getall("Accept", [])).split(",")
        }
        assert accepted >= MANIFEST_TYPES, accepted


async def test_blob_bytes_and_headers(fake: FakeUpstream, proxy: Proxy) -> None:
    image = fake.add_image("team/app", "v1", layer_sizes=(300_000,))
    for blob in image.blobs:
        for expected_status in ("MISS", "HIT"):
            pulled = await proxy.blob("team/app", sha256(blob))
            assert_proxied(pulled)
            assert pulled.body == blob
            assert pulled.headers["Docker-Content-Digest"] == sha256(blob)
            assert pulled.headers["Content-Length"] == str(len(blob))
            assert pulled.headers["Content-Type"] == "application/octet-stream"
            assert pulled.cache_status == expected_status
    assert fake.count("GET", "blob") == len(image.blobs)
    assert proxy.is_cached(sha256(image.layers[0]))


async def test_blob_head_and_range(fake: FakeUpstream, proxy: Proxy) -> None:
    data = bytes(range(256)) * 1000
    digest = fake.add_blob("a", data)
    head = await proxy.head(proxy.path("a", "blobs", digest))
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(data))
    assert head.headers["Docker-Content-Digest"] == digest
    assert head.cache_status in CACHE_STATUSES
    assert_proxied(await proxy.blob("a", digest))
    ranged = await proxy.blob("a", digest, {"Range": "bytes=1000-1999"})
    assert ranged.status == 206
    assert ranged.body == data[1000:2000]
    assert ranged.cache_status == "HIT"


async def test_tags_list_and_referrers(fake: FakeUpstream, proxy: Proxy) -> None:
    image = fake.add_image("team/app", "v1")
    fake.set_tag("team/app", "v2", image.digest)
    signature = fake.add_referrer("team/app", image, "application/vnd.example.sig")
    tags = await proxy.get("/v2/p/fake/team/app/tags/list")
    assert tags.status == 200, tags.body
    assert tags.json()["tags"] == ["v1", "v2"]
    referrers = await proxy.get(f"/v2/p/fake/team/app/referrers/{image.digest}")
    assert referrers.status == 200, referrers.body
    doc = referrers.json()
    assert doc["mediaType"] == OCI_INDEX
    assert [m["digest"] for m in doc["manifests"]] == [signature]


async def test_upstream_404s_carry_oci_codes(fake: FakeUpstream, proxy: Proxy) -> None:
    fake.add_image("team/app", "v1")
    missing_tag = await proxy.manifest("team/app", "nope")
    assert missing_tag.status == 404
    assert missing_tag.oci_code() == "MANIFEST_UNKNOWN"
    missing_digest = await proxy.manifest("team/app", sha256(b"nothing"))
    assert missing_digest.status == 404
    assert missing_digest.oci_code() == "MANIFEST_UNKNOWN"
    missing_blob = await proxy.blob("team/app", sha256(b"nothing"))
    assert missing_blob.status == 404
    assert missing_blob.oci_code() == "BLOB_UNKNOWN"
    missing_repo = await proxy.manifest("no/such/repo", "latest")
    assert missing_repo.status == 404
    assert missing_repo.oci_code() in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN")


async def test_unknown_upstream_is_never_dialled(fake: FakeUpstream, proxy: Proxy) -> None:
    fake.add_image("x", "latest")
    for path in (
        "/v2/p/nope/x/manifests/latest",
        f"/v2/p/nope/x/blobs/{sha256(b'x')}",
        "/v2/p/nope/x/tags/list",
    ):
        pulled = await proxy.get(path)
        assert pulled.status == 404, path
        assert pulled.oci_code() == "NAME_UNKNOWN", path
    assert fake.requests == []


async def test_writes_under_the_prefix_are_denied(fake: FakeUpstream, proxy: Proxy) -> None:
    image = fake.add_image("x", "latest")
    digest = sha256(image.layers[0])
    client = proxy.client
    attempts = [
        ("POST", "/v2/p/fake/x/blobs/uploads/"),
        ("POST", f"/v2/p/fake/x/blobs/uploads/?digest={digest}"),
        ("POST", "/v2/p/fake/x/blobs/uploads/?mount=" + digest + "&from=other"),
        ("PUT", "/v2/p/fake/x/manifests/latest"),
        ("DELETE", "/v2/p/fake/x/manifests/latest"),
        ("DELETE", f"/v2/p/fake/x/manifests/{image.digest}"),
        ("DELETE", f"/v2/p/fake/x/blobs/{digest}"),
        ("PATCH", "/v2/p/fake/x/blobs/uploads/abc"),
        ("PUT", f"/v2/p/fake/x/blobs/uploads/abc?digest={digest}"),
        ("DELETE", "/v2/p/fake/x/blobs/uploads/abc"),
    ]
    for method, path in attempts:
        pulled = await fetch(client, method, path, {"Content-Type": OCI_MANIFEST})
        assert pulled.status == 403, (method, path, pulled.status)
        assert pulled.oci_code() == "DENIED", (method, path)
    assert fake.requests == []


@pytest.mark.parametrize(
    ("local", "remote"),
    [("alpine", "library/alpine"), ("bitnami/redis", "bitnami/redis")],
)
async def test_docker_hub_library_rule(
    fake: FakeUpstream, make_proxy: ProxyFactory, local: str, remote: str
) -> None:
    image = fake.add_image(remote, "3.20")
    proxy = await make_proxy(upstreams={"docker.io": {"url": fake.url, "tag_ttl": "2s"}})
    pulled = await proxy.manifest(local, "3.20")
    assert_proxied(pulled)
    assert pulled.body == image.manifest
    blob = await proxy.blob(local, sha256(image.layers[0]))
    assert_proxied(blob)
    assert blob.body == image.layers[0]
    assert {r.name for r in fake.requests if r.name} == {remote}


async def test_ns_query_routes_unprefixed_pulls(fake: FakeUpstream, proxy: Proxy) -> None:
    image = fake.add_image("team/app", "v1")
    pulled = await proxy.get("/v2/team/app/manifests/v1?ns=fake", {"Accept": ALL_MANIFEST_TYPES})
    assert_proxied(pulled)
    assert pulled.body == image.manifest
    blob = await proxy.get(f"/v2/team/app/blobs/{sha256(image.layers[0])}?ns=fake")
    assert_proxied(blob)
    assert blob.body == image.layers[0]
    assert fake.count("GET", "manifest", name="team/app") == 1
    again = await proxy.get("/v2/team/app/manifests/v1?ns=fake", {"Accept": ALL_MANIFEST_TYPES})
    assert again.cache_status == "HIT"
    assert fake.count("GET", "manifest") == 1


async def test_ns_naming_an_unconfigured_upstream_is_not_proxied(
    fake: FakeUpstream, proxy: Proxy
) -> None:
    fake.add_image("team/app", "v1")
    pulled = await proxy.get("/v2/team/app/manifests/v1?ns=nope", {"Accept": ALL_MANIFEST_TYPES})
    assert pulled.status == 404
    assert fake.requests == []


async def test_mirror_upstream(fake: FakeUpstream, make_proxy: ProxyFactory) -> None:
    """Un-prefixed pulls of unknown repositories come from the mirror; pushes stay local."""
    remote = fake.add_image("team/app", "v1")
    shadowed = fake.add_image("mine", "v1")
    proxy = await make_proxy(proxy={"mirror_upstream": "fake"})
    local = make_image()
    await push_image(proxy.client, "mine", local, "v1")
    assert fake.requests == []

    pulled = await proxy.get("/v2/team/app/manifests/v1", {"Accept": ALL_MANIFEST_TYPES})
    assert_proxied(pulled)
    assert pulled.body == remote.manifest
    blob = await proxy.get(f"/v2/team/app/blobs/{sha256(remote.layers[0])}")
    assert_proxied(blob)
    assert blob.body == remote.layers[0]

    mine = await proxy.get("/v2/mine/manifests/v1", {"Accept": ALL_MANIFEST_TYPES})
    assert mine.status == 200
    assert mine.body == local.manifest != shadowed.manifest
    assert fake.count(name="mine") == 0
    assert not (proxy.config.registry_storage / "repositories" / "team").exists()
    assert fake.count(method="POST") == fake.count(method="PUT") == 0


async def test_without_mirror_unprefixed_pulls_stay_local(fake: FakeUpstream, proxy: Proxy) -> None:
    fake.add_image("team/app", "v1")
    pulled = await proxy.get("/v2/team/app/manifests/v1", {"Accept": ALL_MANIFEST_TYPES})
    assert pulled.status == 404
    assert fake.requests == []


async def test_tag_answers_only_with_a_type_the_client_accepts(
    fake: FakeUpstream, proxy: Proxy
) -> None:
    """An OCI index is never handed to a client that only accepts Docker v2 manifests."""
    child = fake.add_image("multi", None)
    fake.add_index("multi", "v1", [child])
    full = await proxy.manifest("multi", "v1")
    assert_proxied(full)
    narrow = await proxy.manifest("multi", "v1", accept=DOCKER_MANIFEST)
    if narrow.status == 200:
        assert narrow.headers["Content-Type"] == DOCKER_MANIFEST
    else:
        assert narrow.status == 404, narrow.status
        assert narrow.oci_code() == "MANIFEST_UNKNOWN"
