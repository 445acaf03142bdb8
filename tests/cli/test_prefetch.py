"""`regproxy prefetch` against a real upstream (a second regproxy), as a subprocess."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from regproxy.config import Config
from regproxy.proxy.prefetch import ImageRefError, Platform, parse_image, read_image_list
from tests.cli.conftest import Upstream
from tests.cli.helpers import arun_cli, assert_one_line_error, load, write_config
from tests.storage.helpers import blob_path, push_index
from tests.support.inprocess import make_config, start_client
from tests.support.oci import make_image, push_image, sha256

IMAGE_KEYS = {
    "image",
    "repository",
    "upstream",
    "reference",
    "ok",
    "error",
    "digest",
    "media_type",
    "cache_status",
    "platforms",
    "manifests",
    "blobs",
    "blobs_cached",
    "blobs_fetched",
    "bytes_fetched",
    "seconds",
}


@pytest.fixture
async def serve() -> AsyncIterator:
    """Start regproxy servers on a configuration; all are closed at teardown."""
    started: list[TestClient] = []

    async def start(config: Config) -> TestClient:
        client = await start_client(config)
        started.append(client)
        return client

    try:
        yield start
    finally:
        for client in started:
            await client.close()


def _cached(config: Config, digest: str) -> bool:
    return blob_path(config.proxy_storage, digest).is_file()


async def _get(client: TestClient, path: str) -> tuple[int, str | None, bytes]:
    resp = await client.get(path)
    return resp.status, resp.headers.get("X-Cache-Status"), await resp.read()


async def test_prefetch_then_serve_from_cache(tmp_path: Path, upstream: Upstream, serve) -> None:
    image = make_image(layer_sizes=(300_000, 4000))
    await push_image(upstream.client, "org/app", image, "1.0")
    cfg = write_config(tmp_path / "px", upstreams={"up": upstream.url})
    config = load(cfg)

    ran = await arun_cli("prefetch", "-c", cfg, "--json", "p/up/org/app:1.0")
    assert ran.code == 0, ran.stderr
    assert ran.stderr == ""
    doc = ran.json()
    assert set(doc) == {"ok", "failed", "bytes_fetched", "seconds", "images"}
    (result,) = doc["images"]
    assert set(result) == IMAGE_KEYS
    assert result["ok"] and result["digest"] == image.digest
    assert (result["repository"], result["reference"]) == ("p/up/org/app", "1.0")
    assert (result["blobs"], result["blobs_fetched"]) == (3, 3)
    assert result["bytes_fetched"] == sum(len(b) for b in image.blobs) == doc["bytes_fetched"]
    for digest in (image.digest, *(sha256(b) for b in image.blobs)):
        assert _cached(config, digest), digest
    assert not os.listdir(config.temporary_registry_storage / "spool")

    # a server on that storage answers from the cache without asking the upstream
    before = len(upstream.requests)
    proxy = await serve(config)
    status, cache, body = await _get(proxy, "/v2/p/up/org/app/manifests/1.0")
    assert (status, cache, body) == (200, "HIT", image.manifest)
    for blob in image.blobs:
        status, cache, body = await _get(proxy, f"/v2/p/up/org/app/blobs/{sha256(blob)}")
        assert (status, cache) == (200, "HIT") and body == blob
    assert len(upstream.requests) == before

    # a second prefetch finds everything fresh: no upstream request at all
    ran = await arun_cli("prefetch", "-c", cfg, "--json", "p/up/org/app:1.0")
    assert ran.code == 0, ran.stderr
    (again,) = ran.json()["images"]
    assert (again["cache_status"], again["blobs_fetched"], again["bytes_fetched"]) == ("HIT", 0, 0)
    assert len(upstream.requests) == before


async def test_stale_tag_costs_one_head(tmp_path: Path, upstream: Upstream) -> None:
    image = make_image()
    await push_image(upstream.client, "org/app", image, "1.0")
    cfg = write_config(
        tmp_path / "px", extra=f'[proxy.upstreams.up]\nurl = "{upstream.url}"\ntag_ttl = 0\n'
    )
    assert (await arun_cli("prefetch", "-c", cfg, "p/up/org/app:1.0")).code == 0
    upstream.requests.clear()
    ran = await arun_cli("prefetch", "-c", cfg, "--json", "p/up/org/app:1.0")
    assert ran.code == 0, ran.stderr
    (result,) = ran.json()["images"]
    assert result["cache_status"] == "REVALIDATED" and result["bytes_fetched"] == 0
    assert upstream.asked() == [("HEAD", "/v2/org/app/manifests/1.0")]


async def test_multi_arch_platforms(tmp_path: Path, upstream: Upstream) -> None:
    index, children = await push_index(upstream.client, "org/multi", "v1", n=3)
    cfg = write_config(tmp_path / "px", upstreams={"up": upstream.url})
    config = load(cfg)
    ran = await arun_cli(
        "prefetch", "-c", cfg, "--json", "--platform", "linux/arm64", "p/up/org/multi:v1"
    )
    assert ran.code == 0, ran.stderr
    (result,) = ran.json()["images"]
    assert result["platforms"] == ["linux/arm64"] and result["manifests"] == 2
    assert _cached(config, index.digest) and _cached(config, children[1].digest)
    assert all(_cached(config, sha256(b)) for b in children[1].blobs)
    assert not _cached(config, children[0].digest)
    assert not any(_cached(config, sha256(b)) for b in children[0].blobs + children[2].blobs)

    ran = await arun_cli("prefetch", "-c", cfg, "--json", "--all-platforms", "p/up/org/multi:v1")
    assert ran.code == 0, ran.stderr
    (result,) = ran.json()["images"]
    assert result["manifests"] == 4 and result["blobs_cached"] == len(children[1].blobs)
    for child in children:
        assert _cached(config, child.digest)
        assert all(_cached(config, sha256(b)) for b in child.blobs)

    ran = await arun_cli("prefetch", "-c", cfg, "--platform", "windows/amd64", "p/up/org/multi:v1")
    assert_one_line_error(ran, 1, "no manifest for windows/amd64", "linux/arm64")


async def test_reference_forms_and_image_file(tmp_path: Path, upstream: Upstream, serve) -> None:
    """Registry host, digest, Docker Hub's `library/` rule, and `-f FILE`."""
    alpine, app = make_image(), make_image()
    await push_image(upstream.client, "library/alpine", alpine, "3.20")
    await push_image(upstream.client, "org/app", app, "1.0")
    cfg = write_config(tmp_path / "px", upstreams={"up": upstream.url, "docker.io": upstream.url})
    config = load(cfg)
    listing = tmp_path / "images.txt"
    listing.write_text(
        "# warm these before the demo\nalpine:3.20\n\n"
        f"{upstream.host}/org/app@{app.digest}  # pinned\n"
    )
    ran = await arun_cli("prefetch", "-c", cfg, "--json", "-f", listing)
    assert ran.code == 0, ran.stderr
    results = ran.json()["images"]
    assert [(r["repository"], r["reference"]) for r in results] == [
        ("p/docker.io/library/alpine", "3.20"),
        ("p/up/org/app", app.digest),
    ]
    assert (config.proxy_storage / "repositories/docker.io/library/alpine/_tags/3.20").is_file()
    proxy = await serve(config)
    for path in (
        "/v2/p/docker.io/alpine/manifests/3.20",
        f"/v2/p/up/org/app/manifests/{app.digest}",
    ):
        status, cache, _ = await _get(proxy, path)
        assert (status, cache) == (200, "HIT"), path


async def test_failures_are_reported_per_image(tmp_path: Path, upstream: Upstream) -> None:
    good = make_image()
    await push_image(upstream.client, "org/app", good, "1.0")
    cfg = write_config(tmp_path / "px", upstreams={"up": upstream.url})
    ran = await arun_cli("prefetch", "-c", cfg, "--json", "p/up/org/app:1.0", "p/up/org/nope:1")
    assert ran.code == 1
    ok, bad = ran.json()["images"]
    assert ok["ok"] and not bad["ok"]
    assert "not found" in bad["error"]
    assert ran.stderr.strip() == f"regproxy: p/up/org/nope:1: {bad['error']}"
    # the table shows the reason too
    ran = await arun_cli("prefetch", "-c", cfg, "p/up/org/nope:1")
    assert_one_line_error(ran, 1, "p/up/org/nope:1", "not found")
    assert "failed" in ran.stdout


async def test_unreachable_upstream(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "px", upstreams={"up": "http://127.0.0.1:9"})
    ran = await arun_cli("prefetch", "-c", cfg, "p/up/org/app:1.0")
    assert_one_line_error(ran, 1, "p/up/org/app:1.0", "unavailable")


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        ("p/elsewhere/org/app:1", "upstream 'elsewhere' is not configured"),
        ("quay.io/org/app:1", "no configured upstream for registry 'quay.io'"),
        ("p/up/Org/App:1", "invalid repository name"),
        ("p/up/org/app@sha256:abc", "invalid digest"),
    ],
)
async def test_bad_references_are_usage_errors(tmp_path: Path, image: str, fragment: str) -> None:
    cfg = write_config(tmp_path / "px", upstreams={"up": "http://127.0.0.1:9"})
    ran = await arun_cli("prefetch", "-c", cfg, image)
    assert_one_line_error(ran, 2, fragment)


async def test_bad_config_and_read_only_storage(tmp_path: Path, upstream: Upstream) -> None:
    ran = await arun_cli("prefetch", "-c", tmp_path / "missing.toml", "p/up/a:1")
    assert_one_line_error(ran, 2, "configuration", "not found")
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'registry_storage = "r"\nproxy_storage = "p"\ntemporary_registry_storage = "t"\nnope = 1\n'
    )
    assert_one_line_error(await arun_cli("prefetch", "-c", bad, "p/up/a:1"), 2, "nope")

    await push_image(upstream.client, "org/app", make_image(), "1.0")
    cfg = write_config(tmp_path / "px", upstreams={"up": upstream.url})
    config = load(cfg)
    config.proxy_storage.mkdir(parents=True)
    config.proxy_storage.chmod(0o555)
    try:
        ran = await arun_cli("prefetch", "-c", cfg, "p/up/org/app:1.0", as_restricted=True)
    finally:
        config.proxy_storage.chmod(0o755)
    assert_one_line_error(ran, 2, "cannot write to", str(config.proxy_storage), "permission denied")


def test_parse_image_references(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        proxy={
            "upstreams": {
                "hub": {"url": "https://registry-1.docker.io"},
                "ghcr.io": {"url": "https://ghcr.io"},
                "local": {"url": "http://127.0.0.1:5001"},
            }
        },
    )
    cases = {
        "docker.io/library/alpine:3.20": ("hub", "library/alpine", "3.20"),
        "alpine": ("hub", "library/alpine", "latest"),
        "nginx/nginx:1": ("hub", "nginx/nginx", "1"),
        f"ghcr.io/org/app@sha256:{'a' * 64}": ("ghcr.io", "org/app", f"sha256:{'a' * 64}"),
        f"ghcr.io/org/app:1@sha256:{'b' * 64}": ("ghcr.io", "org/app", f"sha256:{'b' * 64}"),
        "127.0.0.1:5001/team/tool:dev": ("local", "team/tool", "dev"),
        "p/ghcr.io/org/app:2": ("ghcr.io", "org/app", "2"),
    }
    for text, (upstream, remote, reference) in cases.items():
        ref = parse_image(text, config)
        assert (ref.target.upstream, ref.target.remote, ref.reference) == (
            upstream,
            remote,
            reference,
        ), text
    assert parse_image("alpine", config).pull_name == "p/hub/library/alpine:latest"
    for text in ("", "quay.io/a/b", "p/nope/a", "UPPER/case", "a:b:c", "a@sha256:zz"):
        with pytest.raises(ImageRefError):
            parse_image(text, config)
    assert read_image_list(["# c", " a:1 # x", "", "b"]) == ["a:1", "b"]
    assert str(Platform.parse("linux/arm/v7")) == "linux/arm/v7"
    assert Platform.parse("linux/arm64").matches({"os": "linux", "architecture": "arm64"})
    with pytest.raises(ValueError):
        Platform.parse("linux")


async def test_config_error_from_upstream_password(tmp_path: Path) -> None:
    """An upstream password read from an unset variable is a configuration error (exit 2)."""
    cfg = write_config(
        tmp_path / "px",
        extra='[proxy.upstreams.up]\nurl = "http://127.0.0.1:9"\n'
        'username = "u"\npassword_env = "REGPROXY_TEST_UNSET_PASSWORD"\n',
    )
    ran = await arun_cli("prefetch", "-c", cfg, "p/up/org/app:1")
    assert_one_line_error(ran, 2, "configuration error", "REGPROXY_TEST_UNSET_PASSWORD")
