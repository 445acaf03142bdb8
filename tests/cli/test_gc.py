"""`regproxy gc` as an operator runs it: options, report, JSON, exit codes, bad input."""

from __future__ import annotations

from pathlib import Path

from regproxy.storage.store import Store
from tests.cli.conftest import Registry
from tests.cli.helpers import arun_cli, assert_one_line_error, invoke, write_config
from tests.ops.helpers import scrape
from tests.storage.helpers import (
    age_tree,
    assert_pullable,
    blob_path,
    cache_image,
    push_index,
    push_orphan,
    snapshot,
)
from tests.support.oci import make_image, push_image

STORE_KEYS = {
    "store",
    "dry_run",
    "blobs_removed",
    "bytes_freed",
    "manifests_removed",
    "tags_removed",
    "uploads_removed",
    "temp_files_removed",
    "blobs_kept",
    "seconds",
    "removed",
}
EVICTION_KEYS = {
    "store",
    "dry_run",
    "budget",
    "size_before",
    "size_after",
    "blobs_removed",
    "bytes_freed",
    "seconds",
}


async def test_json_report_per_store(registry: Registry) -> None:
    image = make_image()
    await push_image(registry.client, "app", image, "v1")
    orphan = await push_orphan(registry.client, "app", 700)
    cached = cache_image(Store(registry.config.proxy_storage), "up/library/alpine")
    age_tree(registry.config.registry_storage, 7200)
    ran = invoke("gc", "-c", registry.path, "--json")
    assert ran.code == 0, ran.stderr
    doc = ran.json()
    assert set(doc) == {"dry_run", "bytes_freed", "seconds", "stores", "eviction"}
    stores = {s["store"]: s for s in doc["stores"]}
    assert set(stores) == {"registry", "proxy", "temporary"}
    assert all(set(s) == STORE_KEYS for s in stores.values())
    assert set(doc["eviction"]) == EVICTION_KEYS  # proxy_max_size from the config
    assert doc["eviction"]["budget"] == 10 * 1024**3
    assert stores["registry"]["removed"] == [orphan]
    assert stores["registry"]["bytes_freed"] == 700 == doc["bytes_freed"]
    assert stores["proxy"]["blobs_removed"] == 0  # young: inside the default 1h grace
    assert not blob_path(registry.config.registry_storage, orphan).exists()
    assert all(Store(registry.config.proxy_storage).has_blob(d) for d in cached)
    await assert_pullable(registry.client, "app", image)


async def test_table_report_and_dry_run(registry: Registry) -> None:
    await push_image(registry.client, "app", make_image(), "v1")
    await push_orphan(registry.client, "app", 3000)
    age_tree(registry.config.registry_storage, 7200)
    before = snapshot(registry.config.registry_storage)
    ran = invoke("gc", "-c", registry.path, "--dry-run")
    assert ran.code == 0, ran.stderr
    assert "dry run" in ran.stdout and "would free 2.9 KiB" in ran.stdout
    for label in ("registry", "proxy", "temporary", "proxy (LRU)"):
        assert label in ran.stdout
    assert snapshot(registry.config.registry_storage) == before
    ran = invoke("gc", "-c", registry.path)
    assert ran.code == 0 and "freed 2.9 KiB" in ran.stdout


async def test_proxy_options_never_evict_pushed_content(registry: Registry) -> None:
    pushed = [make_image(layer_sizes=(50_000,)) for _ in range(3)]
    for i, image in enumerate(pushed):
        await push_image(registry.client, f"team/app{i}", image, "v1")
    index, children = await push_index(registry.client, "team/multi", "latest")
    proxy = Store(registry.config.proxy_storage)
    cached = cache_image(proxy, "up/library/alpine", size=20_000)
    age_tree(registry.config.registry_storage, 30 * 86400)
    age_tree(registry.config.proxy_storage, 30 * 86400)
    ran = invoke(
        "gc",
        "-c",
        registry.path,
        "--json",
        "--grace",
        "0",
        "--proxy-max-age",
        "1d",
        "--proxy-max-size",
        "0",
    )
    assert ran.code == 0, ran.stderr
    stores = {s["store"]: s for s in ran.json()["stores"]}
    assert stores["registry"]["blobs_removed"] == 0
    assert stores["proxy"]["tags_removed"] == 1 and stores["proxy"]["blobs_removed"] == len(cached)
    assert not any(proxy.has_blob(d) for d in cached)
    for i, image in enumerate(pushed):
        await assert_pullable(registry.client, f"team/app{i}", image)
    for image in (index, *children):
        await assert_pullable(registry.client, "team/multi", image)


async def test_lru_budget_from_option(registry: Registry) -> None:
    proxy = Store(registry.config.proxy_storage)
    old = cache_image(proxy, "up/a", layers=2, size=40_000)
    age_tree(registry.config.proxy_storage / "blobs", 3600)
    new = cache_image(proxy, "up/b", layers=2, size=40_000)
    ran = invoke("gc", "-c", registry.path, "--json", "--proxy-max-size", "100KiB")
    assert ran.code == 0, ran.stderr
    eviction = ran.json()["eviction"]
    assert eviction["budget"] == 100 * 1024 and eviction["size_after"] <= 100 * 1024
    assert all(proxy.has_blob(d) for d in new)
    assert not all(proxy.has_blob(d) for d in old)


def test_bad_options_and_config(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    for args, fragment in (
        (["--grace", "soon"], "--grace"),
        (["--proxy-max-age", "-1"], "--proxy-max-age"),
        (["--proxy-max-size", "lots"], "--proxy-max-size"),
    ):
        assert_one_line_error(invoke("gc", "-c", cfg, *args), 2, fragment)
    assert_one_line_error(invoke("gc", "-c", tmp_path / "nope.toml"), 2, "not found")
    broken = tmp_path / "broken.toml"
    broken.write_text("registry_storage = [")
    assert_one_line_error(invoke("gc", "-c", broken), 2, "invalid TOML")


def test_nothing_stored_yet(tmp_path: Path) -> None:
    ran = invoke("gc", "-c", write_config(tmp_path), "--json")
    assert ran.code == 0 and ran.json()["stores"] == []
    assert not (tmp_path / "registry").exists()  # gc creates no storage folders


async def test_read_only_storage_is_one_line(registry: Registry) -> None:
    await push_image(registry.client, "app", make_image(), "v1")
    root = registry.config.registry_storage
    root.chmod(0o555)
    try:
        ran = await arun_cli("gc", "-c", registry.path, as_restricted=True)
        dry = await arun_cli("gc", "-c", registry.path, "--dry-run", as_restricted=True)
    finally:
        root.chmod(0o755)
    assert_one_line_error(ran, 2, "cannot write to", str(root), "permission denied")
    assert dry.code == 0, dry.stderr  # a dry run only reads


async def test_json_runs_are_recorded_for_metrics(registry: Registry) -> None:
    """`--json` is how cron and scripts run gc: /metrics must count those runs too."""
    await push_orphan(registry.client, "app", 700)
    age_tree(registry.config.registry_storage, 7200)
    assert invoke("gc", "-c", registry.path, "--json", "--dry-run").code == 0  # changes nothing
    ran = invoke("gc", "-c", registry.path, "--json")
    assert ran.code == 0, ran.stderr
    samples = await scrape(registry.client)
    assert samples.get("regproxy_command_runs_total", command="gc") == 1
    assert samples.get("regproxy_command_failures_total", command="gc") == 0
    assert samples.get("regproxy_command_last_run_success", command="gc") == 1
    assert samples.get("regproxy_gc_freed_bytes_total") == 700 == ran.json()["bytes_freed"]


async def test_failed_runs_are_recorded_as_failed(registry: Registry) -> None:
    root = registry.config.registry_storage
    root.chmod(0o555)
    try:
        ran = await arun_cli("gc", "-c", registry.path, "--json", as_restricted=True)
    finally:
        root.chmod(0o755)
    assert_one_line_error(ran, 2, "cannot write to", str(root))
    samples = await scrape(registry.client)
    assert samples.get("regproxy_command_runs_total", command="gc") == 1
    assert samples.get("regproxy_command_failures_total", command="gc") == 1
    assert samples.get("regproxy_command_last_run_success", command="gc") == 0
