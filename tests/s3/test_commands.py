"""The operator commands on a configuration file whose stores are both on S3.

Each command runs as `python -m regproxy <cmd> -c <config>` (a subprocess) while an
in-process server serves the same configuration: `gc` (and `--dry-run`), `ls` (and
`--json`), `verify` (and `--repair`), `prefetch`. And the start-up refusals: a missing
bucket, a wrong secret and a closed port stop `serve` and every offline command with
exit code 2 and one line naming the cause.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.cli.helpers import Ran, arun_cli, assert_one_line_error, load
from tests.storage.helpers import assert_pullable
from tests.support.digests import sha256
from tests.support.fake_upstream import FakeUpstream
from tests.support.inprocess import start_client
from tests.support.oci import make_image, push_blob, push_image
from tests.support.processes import free_port
from tests.support.s3store import blob_key, bucket_keys, write_s3_config
from tests.support.seaweed import SeaweedS3

pytestmark = pytest.mark.timeout(120)


@dataclass
class Site:
    """A configuration file on S3, and a server running on it."""

    path: Path
    client: TestClient
    engine: SeaweedS3
    bucket: str

    def keys(self, prefix: str = "") -> list[str]:
        return bucket_keys(self.engine, self.bucket, prefix)

    def s3(self) -> Any:
        return self.engine.client()

    async def cli(self, *args: str | Path, code: int | None = 0) -> Ran:
        ran = await arun_cli(args[0], "-c", self.path, *args[1:])
        if code is not None:
            assert ran.code == code, (args, ran.code, ran.stdout[-2000:], ran.stderr[-2000:])
        return ran


@pytest.fixture
async def site(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path, fake: FakeUpstream
) -> AsyncIterator[Site]:
    path = write_s3_config(seaweed, s3_bucket, tmp_path / "site", upstreams={"fake": fake.url})
    client = await start_client(load(path))
    try:
        yield Site(path, client, seaweed, s3_bucket)
    finally:
        await client.close()


async def _past_the_clock_slack(since: float) -> None:
    """S3 times have whole seconds, and gc keeps what changed within a second of its
    start: wait until `since` is clearly in the past for it."""
    await asyncio.sleep(max(0.0, since + 2.1 - time.time()))


async def test_gc_and_dry_run(site: Site) -> None:
    kept = make_image((5000, 70_000))
    await push_image(site.client, "team/app", kept, "v1")
    orphans = [os.urandom(300), os.urandom(100_000)]  # a small one, one with a touch marker
    for data in orphans:
        await push_blob(site.client, "team/app", data)
    orphan_keys = [blob_key("registry", sha256(data)) for data in orphans]
    assert set(orphan_keys) <= set(site.keys())
    await _past_the_clock_slack(time.time())

    # the default grace period (1 h) keeps them
    ran = await site.cli("gc", "--json")
    assert [s["blobs_removed"] for s in ran.json()["stores"]] == [0, 0, 0]

    ran = await site.cli("gc", "--grace", "0", "--dry-run", "--json")
    report = ran.json()
    assert report["dry_run"] is True
    registry = report["stores"][0]
    assert registry["store"] == "registry"
    assert sorted(registry["removed"]) == sorted(sha256(d) for d in orphans)
    assert registry["bytes_freed"] == sum(len(d) for d in orphans)
    assert set(orphan_keys) <= set(site.keys()), "a dry run removed something"

    ran = await site.cli("gc", "--grace", "0", "--json")
    registry = ran.json()["stores"][0]
    assert registry["blobs_removed"] == 2
    assert registry["blobs_kept"] == len(kept.blobs) + 1  # and the manifest
    keys = site.keys()
    assert not set(orphan_keys) & set(keys)
    markers = [k for k in keys if k.startswith("registry/_touched/")]
    assert not [k for k in markers if k.endswith(sha256(orphans[1])[7:])], "a marker outlived"
    for blob in (kept.manifest, *kept.blobs):
        assert blob_key("registry", sha256(blob)) in keys
    assert not [k for k in keys if "/lock.d/" in k], "gc left its lease behind"
    await assert_pullable(site.client, "team/app", kept)
    # the swept blobs are gone for clients too, and can be pushed again
    async with site.client.head(f"/v2/team/app/blobs/{sha256(orphans[0])}") as resp:
        assert resp.status == 404
    await push_blob(site.client, "team/app", orphans[0])


async def test_gc_delete_untagged_and_deleted_tags(site: Site) -> None:
    tagged = make_image((1000,))
    untagged = make_image((2000,))
    dropped = make_image((3000,))
    await push_image(site.client, "a", tagged, "v1")
    await push_image(site.client, "a", untagged, untagged.digest)
    await push_image(site.client, "a", dropped, "old")
    async with site.client.delete(f"/v2/a/manifests/{dropped.digest}") as resp:
        assert resp.status == 202
    await _past_the_clock_slack(time.time())
    ran = await site.cli("gc", "--grace", "0", "--json")
    removed = set(ran.json()["stores"][0]["removed"])
    assert removed == {dropped.digest, *(sha256(b) for b in dropped.blobs)}
    await assert_pullable(site.client, "a", untagged)
    ran = await site.cli("gc", "--grace", "0", "--delete-untagged", "--json")
    registry = ran.json()["stores"][0]
    assert registry["manifests_removed"] == 1
    async with site.client.get(f"/v2/a/manifests/{untagged.digest}") as resp:
        assert resp.status == 404
    await assert_pullable(site.client, "a", tagged)
    keys = site.keys("registry/blobs/")
    assert blob_key("registry", sha256(untagged.layers[0])) not in keys


async def test_ls(site: Site, fake: FakeUpstream) -> None:
    await push_image(site.client, "team/big", make_image((300_000,)), "v1", "v2")
    await push_image(site.client, "team/small", make_image((10,)), "v1")
    image = fake.add_image("lib/tool", "3.1", layer_sizes=(4000,))
    async with site.client.get("/v2/p/fake/lib/tool/manifests/3.1") as resp:
        assert resp.status == 200
    for blob in image.blobs:
        async with site.client.get(f"/v2/p/fake/lib/tool/blobs/{sha256(blob)}") as resp:
            assert await resp.read() == blob

    ran = await site.cli("ls", "--json")
    doc = ran.json()
    assert [s["kind"] for s in doc["stores"]] == ["local", "proxy"]
    local, proxy = doc["stores"]
    assert (local["repositories"], proxy["repositories"]) == (2, 1)
    assert local["root"].startswith("s3://") and local["root"].endswith("/registry")
    assert proxy["root"].startswith("s3://") and proxy["root"].endswith("/proxy")
    repos = {r["name"]: r for r in doc["repositories"]}
    assert list(repos) == ["p/fake/lib/tool", "team/big", "team/small"]
    assert repos["team/big"]["size"] > 300_000
    assert sorted(t["tag"] for t in repos["team/big"]["tags"]) == ["v1", "v2"]
    cached = repos["p/fake/lib/tool"]
    assert (cached["kind"], cached["upstream"], cached["remote"]) == ("proxy", "fake", "lib/tool")
    assert cached["last_pulled"]
    assert cached["size"] >= sum(len(b) for b in image.blobs)

    ran = await site.cli("ls", "--tags")
    for text in ("team/big", "team/small", "p/fake/lib/tool", "KiB"):
        assert text in ran.stdout, text
    lines = [line for line in ran.stdout.splitlines() if line.startswith("team/")]
    assert len(lines) == 3, ran.stdout
    ran = await site.cli("ls", "nothing/here", code=1)
    assert_one_line_error(ran, 1, "no repository matches")


async def test_verify_and_repair(site: Site, fake: FakeUpstream) -> None:
    image = make_image((5000, 80_000))
    await push_image(site.client, "app", image, "v1")
    cached = fake.add_image("lib/tool", "v1", layer_sizes=(6000,))
    async with site.client.get("/v2/p/fake/lib/tool/manifests/v1") as resp:
        assert resp.status == 200
    for blob in cached.blobs:
        async with site.client.get(f"/v2/p/fake/lib/tool/blobs/{sha256(blob)}") as resp:
            assert await resp.read() == blob

    ran = await site.cli("verify", "--json")
    doc = ran.json()
    assert doc["ok"] is True and doc["problems"] == []
    assert doc["blobs_hashed"] == len(image.blobs) + 1 + len(cached.blobs) + 1

    s3 = site.s3()
    layer = sha256(image.layers[1])
    cached_layer = sha256(cached.layers[0])
    s3.put_object(Bucket=site.bucket, Key=blob_key("registry", layer), Body=b"x" * 80_000)
    s3.put_object(Bucket=site.bucket, Key=blob_key("proxy", cached_layer), Body=b"rot")
    link = f"registry/repositories/app/_layers/sha256/{sha256(image.layers[0])[7:]}"
    s3.delete_object(Bucket=site.bucket, Key=link)
    orphan = "registry/repositories/app/_layers/sha256/" + "ab" * 32
    s3.put_object(Bucket=site.bucket, Key=orphan, Body=b"")

    ran = await site.cli("verify", code=1)
    assert "does not match its digest" in ran.stdout
    assert "needed by: app:v1" in ran.stdout
    ran = await site.cli("verify", "--json", "--repair", code=1)
    problems = {(p["store"], p["kind"]): p for p in ran.json()["problems"]}
    assert set(problems) == {
        ("registry", "corrupt"),
        ("proxy", "corrupt"),
        ("registry", "missing-link"),
        ("registry", "orphaned-link"),
    }, problems
    assert "quarantine" in problems["registry", "corrupt"]["repair"]
    assert problems["registry", "corrupt"]["needed_by"] == ["app:v1"]
    assert "next pull" in problems["proxy", "corrupt"]["repair"]
    assert problems["registry", "missing-link"]["repair"] == "link re-created"
    assert problems["registry", "orphaned-link"]["repair"] == "link removed"
    keys = site.keys()
    quarantined = f"registry/quarantine/sha256/{layer[7:]}"
    assert quarantined in keys and f"{quarantined}.json" in keys
    note = json.loads(s3.get_object(Bucket=site.bucket, Key=f"{quarantined}.json")["Body"].read())
    assert note["needed_by"] == ["app:v1"]
    assert blob_key("registry", layer) not in keys
    assert blob_key("proxy", cached_layer) not in keys
    assert link in keys and orphan not in keys

    # what is left: the quarantined blob is missing until the image is pushed again
    # (and its link, which gc or `verify --repair` drops), as on disk
    ran = await site.cli("verify", "--json", code=1)
    left = ran.json()["problems"]
    assert sorted(p["kind"] for p in left) == ["missing-blob", "orphaned-link"], left
    assert {p["digest"] for p in left} == {layer}
    await push_image(site.client, "app", image, "v1")
    async with site.client.get(f"/v2/p/fake/lib/tool/blobs/{cached_layer}") as resp:
        assert await resp.read() == cached.layers[0]  # fetched again
    ran = await site.cli("verify", "--json")
    assert ran.json()["ok"] is True
    await assert_pullable(site.client, "app", image)


async def test_prefetch_into_the_s3_cache(site: Site, fake: FakeUpstream) -> None:
    image = fake.add_image("lib/tool", "v1", layer_sizes=(200_000, 5000))
    ran = await site.cli("prefetch", "p/fake/lib/tool:v1", "--json")
    doc = ran.json()
    assert doc["ok"] is True, doc
    (result,) = doc["images"]
    assert result["digest"] == image.digest
    assert result["blobs_fetched"] == len(image.blobs)
    keys = site.keys("proxy/")
    for blob in (image.manifest, *image.blobs):
        assert blob_key("proxy", sha256(blob)) in keys
    local_proxy = site.path.parent / "proxy"
    assert not local_proxy.exists() or not any(local_proxy.rglob("*"))

    # the server answers from what prefetch stored, without asking the upstream
    fake.reset_counts()
    async with site.client.get("/v2/p/fake/lib/tool/manifests/v1") as resp:
        assert resp.status == 200 and await resp.read() == image.manifest
        assert resp.headers["X-Cache-Status"] == "HIT"
    for blob in image.blobs:
        async with site.client.get(f"/v2/p/fake/lib/tool/blobs/{sha256(blob)}") as resp:
            assert resp.headers["X-Cache-Status"] == "HIT"
            assert await resp.read() == blob
    assert fake.requests == []

    # again: everything is cached already
    ran = await site.cli("prefetch", "p/fake/lib/tool:v1", "--json")
    (result,) = ran.json()["images"]
    assert (result["blobs_cached"], result["blobs_fetched"]) == (len(image.blobs), 0)
    assert fake.count("GET", "blob") == 0


async def test_prefetch_from_a_second_regproxy(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    """The upstream is another regproxy (on disk); the cache is on S3."""
    from tests.support.inprocess import make_config

    upstream = await start_client(make_config(tmp_path / "upstream"))
    try:
        image = make_image((120_000,))
        await push_image(upstream, "team/app", image, "1.0")
        url = str(upstream.make_url("")).rstrip("/")
        path = write_s3_config(seaweed, s3_bucket, tmp_path / "site", upstreams={"up": url})
        ran = await arun_cli("prefetch", "-c", path, "p/up/team/app:1.0", "--json")
        assert ran.code == 0, ran.stderr
        assert ran.json()["images"][0]["digest"] == image.digest
        keys = bucket_keys(seaweed, s3_bucket, "proxy/")
        for blob in (image.manifest, *image.blobs):
            assert blob_key("proxy", sha256(blob)) in keys
    finally:
        await upstream.close()


# ---- start-up refusals ------------------------------------------------------------------

COMMANDS: list[tuple[str, ...]] = [
    ("serve", "--listen", "127.0.0.1:0"),
    ("gc", "--dry-run"),
    ("ls",),
    ("verify", "--repair"),
    ("prefetch", "p/fake/lib/tool:v1"),
]


async def _refusals(path: Path, fragment: str) -> None:
    """Every command on `path` stops with exit code 2 and one line naming `fragment`."""
    limit = asyncio.Semaphore(4)

    async def one(args: tuple[str, ...]) -> tuple[tuple[str, ...], Ran]:
        async with limit:
            return args, await arun_cli(args[0], "-c", path, *args[1:], timeout=45)

    for args, ran in await asyncio.gather(*(one(args) for args in COMMANDS)):
        try:
            assert_one_line_error(ran, 2, "configuration error", fragment)
        except AssertionError as exc:
            raise AssertionError(f"regproxy {' '.join(args)}: {exc}") from None


async def test_missing_bucket_stops_every_command(seaweed: SeaweedS3, tmp_path: Path) -> None:
    path = write_s3_config(
        seaweed, "no-such-bucket-here", tmp_path, upstreams={"fake": "http://127.0.0.1:9"}
    )
    await _refusals(path, "no such bucket 'no-such-bucket-here'")


@pytest.mark.slow
async def test_wrong_secret_stops_every_command(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    path = write_s3_config(seaweed, s3_bucket, tmp_path, upstreams={"fake": "http://127.0.0.1:9"})
    (tmp_path / "s3-secret").write_text("not-the-secret\n")
    await _refusals(path, "wrong secret access key")
    assert bucket_keys(seaweed, s3_bucket) == [], "a refused command wrote to the bucket"


@pytest.mark.slow
async def test_closed_port_stops_every_command(seaweed: SeaweedS3, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    path = write_s3_config(
        seaweed,
        "some-bucket",
        tmp_path,
        s3={"endpoint": f"http://127.0.0.1:{port}"},
        upstreams={"fake": "http://127.0.0.1:9"},
    )
    started = time.monotonic()
    await _refusals(path, f"cannot reach the S3 endpoint http://127.0.0.1:{port}")
    assert time.monotonic() - started < 60


#: seconds without a pull after which gc drops a cached repository in the test below
MAX_AGE = 5


@pytest.mark.slow
async def test_gc_expires_and_evicts_the_s3_cache(site: Site, fake: FakeUpstream) -> None:
    """`--proxy-max-size` evicts least-recently-pulled cached blobs, `--proxy-max-age`
    drops repositories not pulled for that long; pushed images are never touched."""
    pushed = make_image((50_000,))
    await push_image(site.client, "mine", pushed, "v1")
    old = fake.add_image("lib/old", "v1", layer_sizes=(100_000,))
    new = fake.add_image("lib/new", "v1", layer_sizes=(100_000,))
    pulled: dict[str, float] = {}
    for image in (old, new):
        repo = image.repo
        pulled[repo] = time.time()
        async with site.client.get(f"/v2/p/fake/{repo}/manifests/v1") as resp:
            assert resp.status == 200
        for blob in image.blobs:
            async with site.client.get(f"/v2/p/fake/{repo}/blobs/{sha256(blob)}") as resp:
                assert await resp.read() == blob
        await asyncio.sleep(1.1)  # S3 times have whole seconds: lib/new is the more recent
    registry_keys = site.keys("registry/blobs/")

    ran = await site.cli("gc", "--proxy-max-size", "150KB", "--json")
    eviction = ran.json()["eviction"]
    assert eviction["blobs_removed"] >= 1 and eviction["size_after"] <= 150_000, eviction
    cached = site.keys("proxy/blobs/")
    assert blob_key("proxy", sha256(old.layers[0])) not in cached
    assert blob_key("proxy", sha256(new.layers[0])) in cached

    # lib/old was last pulled over MAX_AGE + 1 s ago (S3 times have whole seconds);
    # lib/new is pulled again, well within MAX_AGE of the gc below (which takes a second or
    # two to start)
    await asyncio.sleep(max(0.0, pulled["lib/old"] + MAX_AGE + 1.2 - time.time()))
    async with site.client.get("/v2/p/fake/lib/new/manifests/v1") as resp:
        assert resp.status == 200
    await asyncio.sleep(0.3)  # the pull is recorded in the background
    ran = await site.cli("gc", "--proxy-max-age", f"{MAX_AGE}s", "--grace", "0", "--json")
    proxy = ran.json()["stores"][1]
    assert proxy["store"] == "proxy"
    assert (proxy["tags_removed"], proxy["manifests_removed"]) == (1, 1), proxy
    cached = site.keys("proxy/")
    assert blob_key("proxy", old.digest) not in cached
    assert blob_key("proxy", new.digest) in cached
    assert not [k for k in cached if k.startswith("proxy/repositories/fake/lib/old/_tags/")]
    assert site.keys("registry/blobs/") == registry_keys
    await assert_pullable(site.client, "mine", pushed)

    fake.reset_counts()
    async with site.client.get("/v2/p/fake/lib/old/manifests/v1") as resp:
        assert resp.status == 200 and resp.headers["X-Cache-Status"] == "MISS"
    assert fake.count("GET", "manifest") == 1
