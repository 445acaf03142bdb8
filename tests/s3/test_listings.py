"""Listings on S3: past one page of keys, and through a store far away.

S3 answers at most 1,000 keys (or common prefixes) per ListObjectsV2 call; a tag list or
catalog longer than that must come out whole, sorted, and paginated by `n`/`last` as
on disk. The tags and repositories are written straight into the bucket (what the
server's own writes would leave there) to keep the test fast.

The catalog lists every folder above the repositories' metadata, one request each: on an
object store with real latency those must not be waited for one after the other.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from tests.support.faultrelay import FaultRelay
from tests.support.inprocess import start_client
from tests.support.oci import make_image, push_image
from tests.support.s3store import s3_config
from tests.support.seaweed import SeaweedS3

pytestmark = pytest.mark.timeout(90)

COUNT = 1_050


def _put_all(engine: SeaweedS3, bucket: str, objects: dict[str, bytes]) -> None:
    client = engine.client(max_pool_connections=16)
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda item: client.put_object(Bucket=bucket, Key=item[0], Body=item[1]),
                objects.items(),
            )
        )


async def _all_pages(client: TestClient, url: str, field: str) -> tuple[list[str], int]:
    """Follow `Link` from `url`; every item and the number of pages."""
    seen: list[str] = []
    pages = 0
    while True:
        async with client.get(url) as resp:
            assert resp.status == 200, await resp.text()
            seen += (await resp.json())[field]
            link = resp.headers.get("Link")
        pages += 1
        if link is None:
            return seen, pages
        match = re.fullmatch(r'<([^>]+)>; rel="next"', link)
        assert match, link
        url = match.group(1)


@pytest.mark.slow
async def test_more_than_one_page_of_tags_and_repositories(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    client = await start_client(s3_config(seaweed, s3_bucket, tmp_path))
    try:
        image = make_image((100,))
        await push_image(client, "big", image, "v1")
        tags = [f"t{i:04d}" for i in range(COUNT)]
        repos = [f"many/r{i:04d}" for i in range(COUNT)]
        objects = {f"registry/repositories/big/_tags/{t}": image.digest.encode() for t in tags}
        for repo in repos:
            objects[f"registry/repositories/{repo}/_tags/v1"] = image.digest.encode()
        _put_all(seaweed, s3_bucket, objects)

        async with client.get("/v2/big/tags/list") as resp:
            listed = (await resp.json())["tags"]
        assert listed == sorted([*tags, "v1"])
        seen, pages = await _all_pages(client, "/v2/big/tags/list?n=300", "tags")
        assert (seen, pages) == (listed, 4)
        async with client.get(f"/v2/big/tags/list?n=5&last={tags[1000]}") as resp:
            assert (await resp.json())["tags"] == tags[1001:1006]
        async with client.get(f"/v2/big/manifests/{tags[1049]}") as resp:
            assert resp.status == 200 and await resp.read() == image.manifest

        everything = sorted(["big", *repos])
        seen, pages = await _all_pages(client, "/v2/_catalog", "repositories")
        assert (seen, pages) == (everything, 2)  # the default page is 1,000
        async with client.get(f"/v2/_catalog?n=3&last={repos[1024]}") as resp:
            assert (await resp.json())["repositories"] == repos[1025:1028]
    finally:
        await client.close()


#: repositories in the latency test, and the relay's delay each way per request (seconds)
FAR_REPOSITORIES = 150
LATENCY = 0.02


async def test_the_catalog_of_a_distant_store_is_listed_in_parallel(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    """Listed one folder after the other, 150 repositories behind 2 x 20 ms would take
    over 6 s; listed a depth at a time they take a fraction of that."""
    repos = [f"team{i % 3}/app{i:03d}" for i in range(FAR_REPOSITORIES)]
    _put_all(
        seaweed, s3_bucket, {f"registry/repositories/{r}/_tags/v1": b"sha256:0" for r in repos}
    )
    with FaultRelay(seaweed.ports["s3.port"]) as relay:
        config = s3_config(seaweed, s3_bucket, tmp_path, s3={"endpoint": relay.url})
        client = await start_client(config)
        try:
            relay.set("pass", delay=LATENCY)
            relay.cut()  # pooled connections pick up the delay too
            started = time.monotonic()
            async with client.get("/v2/_catalog") as resp:
                assert (await resp.json())["repositories"] == sorted(repos)
            took = time.monotonic() - started
            one_by_one = FAR_REPOSITORIES * 2 * LATENCY
            assert took < one_by_one / 2, f"{took:.1f} s: the folders were listed one by one"
        finally:
            relay.heal()
            await client.close()
