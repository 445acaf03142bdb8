"""`regproxy verify`: exit codes, JSON, the problem table, and `--repair` from the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

from regproxy.storage.store import Store
from tests.cli.conftest import Registry
from tests.cli.helpers import arun_cli, assert_one_line_error, invoke, write_config
from tests.storage.helpers import blob_path, cache_image
from tests.support.oci import make_image, push_image, sha256

PROBLEM_KEYS = {"store", "kind", "path", "message", "digest", "repair", "needed_by"}
STORE_KEYS = {"store", "root", "blobs", "bytes", "repositories", "manifests", "tags", "seconds"}


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))


async def test_clean_exit_0_and_json(registry: Registry) -> None:
    await push_image(registry.client, "app", make_image(layer_sizes=(1 << 20,)), "v1")
    cache_image(Store(registry.config.proxy_storage), "up/library/alpine")
    ran = invoke("verify", "-c", registry.path, "--json", "--jobs", "2")
    assert ran.code == 0, ran.stdout
    doc = ran.json()
    assert set(doc) == {
        "ok",
        "repair",
        "workers",
        "blobs_hashed",
        "bytes_hashed",
        "hash_seconds",
        "throughput",
        "seconds",
        "stores",
        "problems",
    }
    assert doc["ok"] and doc["problems"] == [] and doc["workers"] == 2
    assert doc["bytes_hashed"] > 1 << 20 and doc["blobs_hashed"] == 7
    assert [s["store"] for s in doc["stores"]] == ["registry", "proxy"]
    assert all(set(s) == STORE_KEYS for s in doc["stores"])
    ran = invoke("verify", "-c", registry.path)
    assert ran.code == 0 and "no problems" in ran.stdout and "hashed 7 blobs" in ran.stdout


async def test_corruption_exit_1_and_repair(registry: Registry) -> None:
    image = make_image()
    await push_image(registry.client, "app", image, "v1")
    cached = cache_image(Store(registry.config.proxy_storage), "up/library/alpine")
    pushed_layer = sha256(image.layers[0])
    pushed_path = blob_path(registry.config.registry_storage, pushed_layer)
    cached_path = blob_path(registry.config.proxy_storage, str(cached[-1]))
    _corrupt(pushed_path)
    _corrupt(cached_path)

    ran = invoke("verify", "-c", registry.path)
    assert ran.code == 1
    assert str(pushed_path) in ran.stdout and str(cached_path) in ran.stdout
    assert "does not match its digest" in ran.stdout
    assert "needed by: app:v1" in ran.stdout

    ran = invoke("verify", "-c", registry.path, "--json", "--repair")
    assert ran.code == 1  # problems were found; verify again to confirm a clean state
    problems = {p["store"]: p for p in ran.json()["problems"]}
    assert all(set(p) == PROBLEM_KEYS for p in problems.values())
    assert problems["registry"]["needed_by"] == ["app:v1"]
    assert "quarantine" in problems["registry"]["repair"]
    assert "next pull" in problems["proxy"]["repair"]
    quarantined = registry.config.registry_storage / "quarantine/sha256" / pushed_layer[7:]
    assert quarantined.is_file() and not pushed_path.exists() and not cached_path.exists()
    note = json.loads(quarantined.with_name(quarantined.name + ".json").read_text())
    assert note["needed_by"] == ["app:v1"]

    # pushing the image again restores it; then all is well
    await push_image(registry.client, "app", image, "v1")
    ran = invoke("verify", "-c", registry.path, "--json")
    assert ran.code == 0, ran.stdout


def test_errors(tmp_path: Path) -> None:
    assert_one_line_error(invoke("verify", "-c", tmp_path / "x.toml"), 2, "not found")
    cfg = write_config(tmp_path)
    ran = invoke("verify", "-c", cfg, "--json")
    assert ran.code == 0 and ran.json()["stores"] == []
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "blobs").write_text("a file where a folder belongs")
    ran = invoke("verify", "-c", cfg)
    assert_one_line_error(ran, 2, str(tmp_path / "registry" / "blobs"))
    assert not os.path.exists(tmp_path / "proxy")


async def test_read_only_store_can_be_verified(registry: Registry) -> None:
    """A read-only store (a mounted backup) is checked without its lock; repair refuses."""
    await push_image(registry.client, "app", make_image(), "v1")
    roots = [registry.config.registry_storage, registry.config.proxy_storage]
    for root in roots:
        (root / "lock").unlink(missing_ok=True)
        root.chmod(0o555)
    try:
        ran = await arun_cli("verify", "-c", registry.path, "--json", as_restricted=True)
        repair = await arun_cli("verify", "-c", registry.path, "--repair", as_restricted=True)
    finally:
        for root in roots:
            root.chmod(0o755)
    assert ran.code == 0, ran.stderr
    assert ran.json()["ok"]
    assert_one_line_error(repair, 2, "cannot write to", "permission denied")
