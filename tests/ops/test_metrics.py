"""`/metrics`: counters move by exactly what a push, a pull and a proxied pull did."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from regproxy.digest import Digest
from regproxy.server import metrics as metrics_mod
from regproxy.server import ops
from regproxy.server.app import create_app
from regproxy.server.keys import PROXY_STORE
from regproxy.storage.runs import record_run
from tests.ops.helpers import (
    BLOB_ROUTE,
    MANIFEST_ROUTE,
    UPLOAD_ROUTE,
    UPLOADS_ROUTE,
    Samples,
    delta,
    parse,
    scrape,
)
from tests.support.fake_upstream import FakeUpstream
from tests.support.inprocess import make_config, start_client
from tests.support.oci import Image, make_image, push_image, sha256
from tests.support.proxy import fetch, wait_until

pytestmark = pytest.mark.timeout(60)

ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
EXACT = {"store_scan_interval": 0}  # every scrape walks the stores: exact figures


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[TestClient]:
    client = await start_client(make_config(tmp_path / "registry", metrics=EXACT))
    try:
        yield client
    finally:
        await client.close()


async def pull(client: TestClient, name: str, reference: str, image: Image) -> list[str | None]:
    """GET the manifest and every blob; returns the X-Cache-Status of each answer."""
    statuses = []
    pulled = await fetch(client, "GET", f"/v2/{name}/manifests/{reference}", ACCEPT)
    assert pulled.status == 200 and pulled.body == image.manifest, pulled.status
    statuses.append(pulled.cache_status)
    for blob in image.blobs:
        pulled = await fetch(client, "GET", f"/v2/{name}/blobs/{sha256(blob)}")
        assert pulled.status == 200 and pulled.body == blob, pulled.status
        statuses.append(pulled.cache_status)
    return statuses


async def test_push_and_pull_move_the_counters_exactly(registry: TestClient) -> None:
    image = make_image((3000, 5000))
    blob_bytes = sum(len(b) for b in image.blobs)
    before = await scrape(registry)

    await push_image(registry, "team/app", image, "v1")
    pushed = await scrape(registry)
    d = lambda name, **labels: delta(before, pushed, name, **labels)  # noqa: E731
    requests = "regproxy_http_requests_total"
    assert d(requests, method="POST", route=UPLOADS_ROUTE, status="201") == len(image.blobs)
    assert d(requests, method="PUT", route=MANIFEST_ROUTE, status="201") == 1
    assert d("regproxy_http_received_bytes_total", route=UPLOADS_ROUTE) == blob_bytes
    assert d("regproxy_http_received_bytes_total", route=MANIFEST_ROUTE) == len(image.manifest)
    assert d("regproxy_http_sent_bytes_total", route=MANIFEST_ROUTE) == 0
    latency = "regproxy_http_request_duration_seconds_count"
    assert d(latency, method="POST", route=UPLOADS_ROUTE) == len(image.blobs)
    # the stores: every blob plus the manifest (stored as a blob too)
    assert pushed.get("regproxy_store_blobs", store="registry") == len(image.blobs) + 1
    assert pushed.get("regproxy_store_bytes", store="registry") == blob_bytes + len(image.manifest)
    assert pushed.get("regproxy_store_repositories", store="registry") == 1
    assert pushed.get("regproxy_store_blobs", store="proxy") == 0

    assert await pull(registry, "team/app", "v1", image) == [None] * (1 + len(image.blobs))
    pulled = await scrape(registry)
    d = lambda name, **labels: delta(pushed, pulled, name, **labels)  # noqa: E731
    assert d(requests, method="GET", route=MANIFEST_ROUTE, status="200") == 1
    assert d(requests, method="GET", route=BLOB_ROUTE, status="200") == len(image.blobs)
    assert d("regproxy_http_sent_bytes_total", route=MANIFEST_ROUTE) == len(image.manifest)
    assert d("regproxy_http_sent_bytes_total", route=BLOB_ROUTE) == blob_bytes
    assert d("regproxy_http_received_bytes_total", route=BLOB_ROUTE) == 0
    assert d(latency, method="GET", route=BLOB_ROUTE) == len(image.blobs)
    # a HEAD sends no body
    resp = await registry.head(f"/v2/team/app/blobs/{sha256(image.layers[0])}")
    assert resp.status == 200
    headed = await scrape(registry)
    assert delta(pulled, headed, requests, method="HEAD", route=BLOB_ROUTE, status="200") == 1
    assert delta(pulled, headed, "regproxy_http_sent_bytes_total", route=BLOB_ROUTE) == 0
    # the scrape in progress is the only request in flight
    assert headed.get("regproxy_http_requests_in_flight") == 1


async def test_routes_are_templates_never_paths(registry: TestClient) -> None:
    await registry.get("/v2/some/secret-name/manifests/latest")
    await registry.get("/v2/some/secret-name/blobs/sha256:" + "0" * 64)
    await registry.get("/no/such/endpoint/at-all")
    samples = await scrape(registry)
    assert "secret-name" not in samples.text and "at-all" not in samples.text
    assert samples.get(
        "regproxy_http_requests_total", method="GET", route=MANIFEST_ROUTE, status="404"
    )
    assert samples.get(
        "regproxy_http_requests_total", method="GET", route="unmatched", status="404"
    )
    assert samples.label_values("route") <= {
        MANIFEST_ROUTE,
        BLOB_ROUTE,
        "unmatched",
        "/metrics",
    }


async def test_uploads_in_progress(registry: TestClient) -> None:
    assert (await scrape(registry)).get("regproxy_uploads_in_progress") == 0
    resp = await registry.post("/v2/team/app/blobs/uploads/")
    assert resp.status == 202
    location = resp.headers["Location"]
    resp = await registry.patch(location, data=b"x" * 100, headers={"Content-Range": "0-99"})
    assert resp.status == 202
    samples = await scrape(registry)
    assert samples.get("regproxy_uploads_in_progress") == 1
    assert samples.get("regproxy_http_received_bytes_total", route=UPLOAD_ROUTE) == 100
    resp = await registry.delete(location)
    assert resp.status == 204
    assert (await scrape(registry)).get("regproxy_uploads_in_progress") == 0


async def test_proxied_pull_moves_proxy_and_upstream_counters(tmp_path: Path) -> None:
    """A second regproxy (in this process, its own registry of metrics) is the upstream."""
    upstream = await start_client(make_config(tmp_path / "upstream", metrics=EXACT))
    proxy: TestClient | None = None
    try:
        image = make_image((4000, 6000))
        blob_bytes = sum(len(b) for b in image.blobs)
        await push_image(upstream, "lib/app", image, "v1")
        url = str(upstream.make_url("")).rstrip("/")
        proxy = await start_client(
            make_config(
                tmp_path / "proxy",
                proxy={"upstreams": {"up": {"url": url, "tag_ttl": 0}}},
                metrics=EXACT,
            )
        )
        proxied = "p/up/lib/app"
        up_before, before = await scrape(upstream), await scrape(proxy)

        # 1. cold cache: everything is a miss, fetched once from the upstream
        assert await pull(proxy, proxied, "v1", image) == ["MISS"] * 4
        assert proxy.app is not None
        store = proxy.app[PROXY_STORE]
        await wait_until(
            lambda: all(store.has_blob(Digest.parse(sha256(b))) for b in image.blobs),
            what="commits",
        )
        cold, up_after = await scrape(proxy), await scrape(upstream)
        d = lambda name, **labels: delta(before, cold, name, **labels)  # noqa: E731
        assert d("regproxy_proxy_requests_total", upstream="up", result="miss") == 4
        assert d("regproxy_proxy_requests_total", upstream="up", result="hit") == 0
        assert d("regproxy_upstream_requests_total", upstream="up") == 4
        assert d("regproxy_upstream_received_bytes_total", upstream="up") == blob_bytes + len(
            image.manifest
        )
        assert d("regproxy_upstream_request_duration_seconds_count", upstream="up") == 4
        assert cold.get("regproxy_store_blobs", store="proxy") == 4
        assert cold.get("regproxy_store_bytes", store="proxy") == blob_bytes + len(image.manifest)
        assert cold.get("regproxy_store_blobs", store="registry") == 0
        sent = "regproxy_http_sent_bytes_total"
        assert d(sent, route=BLOB_ROUTE) == blob_bytes
        # the upstream's own registry saw exactly those requests
        u = lambda name, **labels: delta(up_before, up_after, name, **labels)  # noqa: E731
        requests = "regproxy_http_requests_total"
        assert u(requests, method="GET", route=MANIFEST_ROUTE, status="200") == 1
        assert u(requests, method="GET", route=BLOB_ROUTE, status="200") == 3
        assert u(sent, route=BLOB_ROUTE) == blob_bytes
        assert u(sent, route=MANIFEST_ROUTE) == len(image.manifest)
        assert "regproxy_proxy_requests_total" not in up_after.names()  # no upstreams there

        # 2. warm cache: the tag is revalidated (HEAD, tag_ttl = 0), blobs are hits
        assert await pull(proxy, proxied, "v1", image) == ["REVALIDATED"] + ["HIT"] * 3
        warm = await scrape(proxy)
        d = lambda name, **labels: delta(cold, warm, name, **labels)  # noqa: E731
        assert d("regproxy_proxy_requests_total", upstream="up", result="revalidated") == 1
        assert d("regproxy_proxy_requests_total", upstream="up", result="hit") == 3
        assert d("regproxy_proxy_requests_total", upstream="up", result="miss") == 0
        assert d("regproxy_upstream_requests_total", upstream="up") == 1
        assert d("regproxy_upstream_received_bytes_total", upstream="up") == 0

        # 3. upstream gone: the cached manifest is served stale, the error is counted
        await upstream.close()
        pulled = await fetch(proxy, "GET", f"/v2/{proxied}/manifests/v1", ACCEPT)
        assert pulled.status == 200 and pulled.cache_status == "STALE"
        stale = await scrape(proxy)
        d = lambda name, **labels: delta(warm, stale, name, **labels)  # noqa: E731
        assert d("regproxy_proxy_requests_total", upstream="up", result="stale") == 1
        assert d("regproxy_upstream_errors_total", upstream="up", reason="connect") == 1
        assert d("regproxy_upstream_requests_total", upstream="up") == 1
    finally:
        if proxy is not None:
            await proxy.close()
        await upstream.close()


async def test_coalesced_readers_and_upstream_5xx(tmp_path: Path) -> None:
    fake = FakeUpstream()
    await fake.start()
    proxy = await start_client(
        make_config(tmp_path, proxy={"upstreams": {"fake": {"url": fake.url}}}, metrics=EXACT)
    )
    try:
        image = fake.add_image("lib/slow", "v1", layer_sizes=(1024 * 1024,))
        layer = image.layers[0]
        path = f"/v2/p/fake/lib/slow/blobs/{sha256(layer)}"
        fake.faults.chunk_delay = 0.05  # 16 chunks of 64 KiB: the fetch takes ~0.8 s
        before = await scrape(proxy)
        first = asyncio.ensure_future(fetch(proxy, "GET", path))
        await wait_until(lambda: fake.in_flight >= 1, what="the upstream fetch to start")
        others = await asyncio.gather(fetch(proxy, "GET", path), fetch(proxy, "GET", path))
        for pulled in (await first, *others):
            assert pulled.status == 200 and pulled.body == layer
        after = await scrape(proxy)
        d = lambda name, **labels: delta(before, after, name, **labels)  # noqa: E731
        assert fake.count("GET", "blob") == 1
        assert d("regproxy_proxy_requests_total", upstream="fake", result="miss") == 3
        assert d("regproxy_proxy_coalesced_total", upstream="fake") == 2
        assert d("regproxy_upstream_requests_total", upstream="fake") == 1

        fake.clear_faults()
        fake.fail(503, count=1, kinds={"manifest"})
        pulled = await fetch(proxy, "GET", "/v2/p/fake/lib/slow/manifests/v1", ACCEPT)
        assert pulled.status >= 500
        failed = await scrape(proxy)
        assert delta(after, failed, "regproxy_upstream_errors_total", upstream="fake",
                     reason="http_5xx") == 1  # fmt: skip
    finally:
        await proxy.close()
        await fake.close()


async def test_each_app_has_its_own_registry(tmp_path: Path) -> None:
    one = await start_client(make_config(tmp_path / "one"))
    two = await start_client(make_config(tmp_path / "two"))
    try:
        for _ in range(3):
            assert (await one.get("/v2/")).status == 200
        first, second = await scrape(one), await scrape(two)
        requests = "regproxy_http_requests_total"
        assert first.get(requests, method="GET", route="/v2/", status="200") == 3
        assert second.get(requests, method="GET", route="/v2/", status="200") == 0
    finally:
        await one.close()
        await two.close()


async def test_store_figures_are_cached_between_walks(tmp_path: Path) -> None:
    """With the default interval a push shows up only at the next walk, not per scrape."""
    client = await start_client(make_config(tmp_path, metrics={"store_scan_interval": "1h"}))
    try:
        first = await scrape(client)  # the first scrape waits for the first walk
        assert first.get("regproxy_store_blobs", store="registry") == 0
        assert first.get("regproxy_store_scan_timestamp_seconds", store="registry") > 0
        await push_image(client, "team/app", make_image((100,)), "v1")
        again = await scrape(client)
        assert again.get("regproxy_store_blobs", store="registry") == 0
        assert again.get("regproxy_store_scan_timestamp_seconds", store="registry") == first.get(
            "regproxy_store_scan_timestamp_seconds", store="registry"
        )
    finally:
        await client.close()


async def test_gc_and_verify_runs_and_eviction(tmp_path: Path) -> None:
    fake = FakeUpstream()
    await fake.start()
    config = make_config(
        tmp_path,
        proxy_max_size=1,  # every cached blob is over budget: the evictor runs at once
        proxy={"upstreams": {"fake": {"url": fake.url}}},
    )
    client = await start_client(config)
    try:
        samples = await scrape(client)
        assert "regproxy_command_runs_total" not in samples.names()
        record_run(config.temporary_registry_storage, "gc", True, 1.5, 4096)
        record_run(config.temporary_registry_storage, "gc", True, 0.5, 100)
        record_run(config.temporary_registry_storage, "verify", False, 3.0)
        samples = await scrape(client)
        assert samples.get("regproxy_command_runs_total", command="gc") == 2
        assert samples.get("regproxy_command_failures_total", command="gc") == 0
        assert samples.get("regproxy_command_last_run_duration_seconds", command="gc") == 0.5
        assert samples.get("regproxy_command_last_run_success", command="gc") == 1
        assert samples.get("regproxy_gc_freed_bytes_total") == 4196
        assert samples.get("regproxy_command_runs_total", command="verify") == 1
        assert samples.get("regproxy_command_last_run_success", command="verify") == 0
        assert samples.get("regproxy_command_last_run_timestamp_seconds", command="verify") > 0

        image = fake.add_image("lib/app", "v1", layer_sizes=(2048,))
        pulled = await fetch(client, "GET", f"/v2/p/fake/lib/app/blobs/{sha256(image.config)}")
        assert pulled.status == 200

        async def evicted() -> bool:
            return (await scrape(client)).get("regproxy_proxy_evictions_total") >= 1

        await wait_until(evicted, what="the LRU eviction")
        samples = await scrape(client)
        assert samples.get("regproxy_proxy_evicted_bytes_total") == len(image.config)
    finally:
        await client.close()
        await fake.close()


async def test_separate_metrics_listener(tmp_path: Path) -> None:
    config = make_config(tmp_path, metrics={"listen": "127.0.0.1:0"})
    app = create_app(config)
    client = TestClient(TestServer(app, host="127.0.0.1", port=0))
    await client.start_server()
    runner = await ops.start_listener(app)
    assert runner is not None
    try:
        assert (await client.get("/v2/")).status == 200
        assert (await client.get("/metrics")).status == 404  # not on the main listener
        host, port = runner.addresses[0][:2]
        async with client.session.get(f"http://{host}:{port}/metrics") as resp:
            assert resp.status == 200
            samples = parse(await resp.text())
        requests = "regproxy_http_requests_total"
        assert samples.get(requests, method="GET", route="/v2/", status="200") == 1
        assert samples.get(requests, method="GET", route="unmatched", status="404") == 1
        for path, status in (("/healthz", 200), ("/readyz", 200)):
            async with client.session.get(f"http://{host}:{port}{path}") as resp:
                assert resp.status == status
    finally:
        await runner.cleanup()
        await client.close()


async def test_ops_listener_answers_like_the_main_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad path on the ops listener: the OCI JSON 404 and an access line, no traceback."""
    app = create_app(make_config(tmp_path, metrics={"listen": "127.0.0.1:0"}))
    client = TestClient(TestServer(app, host="127.0.0.1", port=0))
    await client.start_server()
    runner = await ops.start_listener(app)
    assert runner is not None
    caplog.set_level(logging.INFO, logger="regproxy.access")
    try:
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}/no/such/path"
        async with client.session.get(url, headers={"X-Request-ID": "ops-404"}) as resp:
            assert resp.status == 404
            assert resp.content_type == "application/json"
            body = await resp.json()
            assert resp.headers["X-Request-ID"] == "ops-404"
        assert body["errors"][0]["code"] == "NAME_UNKNOWN"
        lines = [r for r in caplog.records if r.name == "regproxy.access"]
        fields = [getattr(r, "access", {}) for r in lines]
        assert any(
            f.get("path") == "/no/such/path"
            and f.get("status") == 404
            and f["request_id"] == "ops-404"
            for f in fields
        ), fields
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        # the main app's request metrics count the registry's traffic, not the ops listener's
        async with client.session.get(f"http://{host}:{port}/metrics") as resp:
            samples = parse(await resp.text())
        assert (
            samples.get(
                "regproxy_http_requests_total", method="GET", route="unmatched", status="404"
            )
            == 0
        )
    finally:
        await runner.cleanup()
        await client.close()


def test_exposition_parses_with_no_state() -> None:
    """The families render (and parse) before any request or scan happened."""
    metrics = metrics_mod.Metrics(make_config(Path("/nonexistent")))
    samples: Samples = parse(metrics.render().decode())
    assert samples.get("regproxy_http_requests_in_flight") == 0
    assert samples.get("regproxy_info", version=__import__("regproxy").__version__) == 1
