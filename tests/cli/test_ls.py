"""`regproxy ls`: tables with human sizes, `--tags`, filters, sorting, JSON with bytes."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from regproxy.storage.store import Store
from tests.cli.conftest import Registry
from tests.cli.helpers import arun_cli, assert_one_line_error, invoke, write_config
from tests.storage.helpers import cache_image, push_index
from tests.support.oci import make_image, push_image

REPOSITORY_KEYS = {
    "name",
    "kind",
    "upstream",
    "remote",
    "size",
    "unique_size",
    "shared_size",
    "updated",
    "last_pulled",
    "last_revalidated",
    "tags",
    "manifests",
}
TAG_KEYS = {"tag", "digest", "updated", "media_type", "platforms", "size"}
MANIFEST_KEYS = {
    "digest",
    "media_type",
    "artifact_type",
    "platforms",
    "size",
    "tags",
    "pushed",
    "complete",
    "children",
}


async def _fill(registry: Registry) -> None:
    big = make_image(layer_sizes=(300_000,))
    await push_image(registry.client, "team/big", big, "v1")
    await push_image(registry.client, "team/small", make_image(layer_sizes=(10,)), "v1")
    untagged = make_image(layer_sizes=(20,))
    await push_image(registry.client, "team/small", untagged, untagged.digest)
    await push_index(registry.client, "multi", "latest", n=2)
    cache_image(Store(registry.config.proxy_storage), "docker.io/library/alpine", size=5000)


async def test_json(registry: Registry) -> None:
    await _fill(registry)
    ran = invoke("ls", "-c", registry.path, "--json")
    assert ran.code == 0, ran.stderr
    doc = ran.json()
    assert set(doc) == {"stores", "repositories"}
    assert [s["kind"] for s in doc["stores"]] == ["local", "proxy"]
    assert all(set(s) == {"kind", "root", "repositories", "blobs", "bytes"} for s in doc["stores"])
    repos = {r["name"]: r for r in doc["repositories"]}
    assert list(repos) == sorted(repos)  # --sort name is the default
    assert set(repos) == {"team/big", "team/small", "multi", "p/docker.io/library/alpine"}
    for repo in repos.values():
        assert set(repo) == REPOSITORY_KEYS
        assert all(set(t) == TAG_KEYS for t in repo["tags"])
        assert all(set(m) == MANIFEST_KEYS for m in repo["manifests"])
        assert isinstance(repo["size"], int)
        datetime.strptime(repo["updated"], "%Y-%m-%dT%H:%M:%SZ")
    assert repos["team/big"]["size"] > 300_000
    assert repos["multi"]["tags"][0]["platforms"] == ["linux/amd64", "linux/arm64"]
    cached = repos["p/docker.io/library/alpine"]
    assert (cached["kind"], cached["upstream"], cached["remote"]) == (
        "proxy",
        "docker.io",
        "library/alpine",
    )
    assert cached["last_pulled"] and cached["last_revalidated"]
    assert len(repos["team/small"]["manifests"]) == 2


async def test_tables(registry: Registry) -> None:
    await _fill(registry)
    ran = invoke("ls", "-c", registry.path)
    assert ran.code == 0, ran.stderr
    for text in ("team/big", "p/docker.io/library/alpine", "proxy:docker.io", "KiB", "ago"):
        assert text in ran.stdout, text
    ran = invoke("ls", "-c", registry.path, "--tags", "team/")
    assert ran.code == 0
    lines = [line for line in ran.stdout.splitlines() if line.startswith("team/")]
    assert len(lines) == 3 and "<none>" in ran.stdout and "oci image" in ran.stdout
    assert "multi" not in ran.stdout


async def test_filters_and_sorting(registry: Registry) -> None:
    await _fill(registry)

    def names(*args: str) -> list[str]:
        ran = invoke("ls", "-c", registry.path, "--json", *args)
        assert ran.code == 0, ran.stderr
        return [r["name"] for r in ran.json()["repositories"]]

    assert names("--local") == ["multi", "team/big", "team/small"]
    assert names("--proxy") == ["p/docker.io/library/alpine"]
    assert names("--sort", "size")[0] == "team/big"
    assert names("--sort", "age")[0] == "p/docker.io/library/alpine"  # the newest
    assert names("p/") == ["p/docker.io/library/alpine"]
    ran = invoke("ls", "-c", registry.path, "nothing/here")
    assert_one_line_error(ran, 1, "no repository matches")
    assert_one_line_error(invoke("ls", "-c", registry.path, "--local", "--proxy"), 2, "--local")


def test_empty_and_bad_config(tmp_path: Path) -> None:
    ran = invoke("ls", "-c", write_config(tmp_path), "--json")
    assert ran.code == 0 and ran.json() == {"stores": [], "repositories": []}
    assert_one_line_error(invoke("ls", "-c", tmp_path / "none.toml"), 2, "not found")


async def test_unreadable_storage_is_one_line(registry: Registry) -> None:
    await push_image(registry.client, "app", make_image(), "v1")
    root = registry.config.registry_storage
    root.chmod(0o000)
    try:
        ran = await arun_cli("ls", "-c", registry.path, as_restricted=True)
    finally:
        root.chmod(0o755)
    assert_one_line_error(ran, 2, "permission denied", str(root))
