"""Discovery: `tags/list` and `_catalog`, sorted, with `n`/`last` pagination and `Link`."""

from __future__ import annotations

import re

from aiohttp.test_utils import TestClient

from tests.support.oci import assert_error, make_image, push_blob, push_image, put_manifest

LINK = re.compile(r'<([^>]+)>; rel="next"')


async def _tag_all(client: TestClient, name: str, tags: list[str]) -> None:
    image = make_image(layer_sizes=(10,))
    await push_image(client, name, image, tags[0])
    for tag in tags[1:]:
        resp = await put_manifest(client, name, tag, image.manifest, image.media_type)
        assert resp.status == 201


async def _follow(client: TestClient, url: str, key: str) -> tuple[list[str], int]:
    """Follow `Link` headers to the end; return every item and the number of pages."""
    items: list[str] = []
    pages = 0
    while url:
        resp = await client.get(url)
        assert resp.status == 200, await resp.text()
        items += (await resp.json())[key]
        pages += 1
        link = resp.headers.get("Link")
        if link is None:
            break
        match = LINK.fullmatch(link)
        assert match, link
        url = match.group(1)
    return items, pages


TAGS = ["v1", "V2", "latest", "1.0", "1.10", "1.9", "_under", "a-b", "a.b", "A_b"]


async def test_tags_sorted_lexically(client: TestClient) -> None:
    await _tag_all(client, "tagged", TAGS)
    resp = await client.get("/v2/tagged/tags/list")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert "Link" not in resp.headers
    assert await resp.json() == {"name": "tagged", "tags": sorted(TAGS)}


async def test_tags_pagination(client: TestClient) -> None:
    await _tag_all(client, "paged/repo", TAGS)
    expected = sorted(TAGS)
    resp = await client.get("/v2/paged/repo/tags/list?n=3")
    assert (await resp.json())["tags"] == expected[:3]
    link = LINK.fullmatch(resp.headers["Link"])
    assert link is not None
    assert link.group(1).startswith("/v2/paged/repo/tags/list?")
    assert "n=3" in link.group(1) and f"last={expected[2]}" in link.group(1)
    items, pages = await _follow(client, "/v2/paged/repo/tags/list?n=3", "tags")
    assert items == expected
    assert pages == 4
    resp = await client.get(f"/v2/paged/repo/tags/list?last={expected[4]}")
    assert (await resp.json())["tags"] == expected[5:]
    resp = await client.get(f"/v2/paged/repo/tags/list?n=2&last={expected[4]}")
    assert (await resp.json())["tags"] == expected[5:7]
    # `last` need not be an existing tag
    resp = await client.get("/v2/paged/repo/tags/list?last=b")
    assert (await resp.json())["tags"] == [t for t in expected if t > "b"]
    # a page that reaches the end has no Link
    resp = await client.get(f"/v2/paged/repo/tags/list?n={len(TAGS)}")
    assert (await resp.json())["tags"] == expected
    assert "Link" not in resp.headers
    resp = await client.get("/v2/paged/repo/tags/list?n=0")
    assert resp.status == 200
    assert (await resp.json())["tags"] == []


async def test_tags_bad_n(client: TestClient) -> None:
    await _tag_all(client, "badn", ["a"])
    for bad in ("-1", "x", "1.5", "1e3"):
        resp = await client.get(f"/v2/badn/tags/list?n={bad}")
        await assert_error(resp, 400, "PAGINATION_NUMBER_INVALID")


async def test_tags_unknown_repository(client: TestClient) -> None:
    resp = await client.get("/v2/nowhere/tags/list")
    await assert_error(resp, 404, "NAME_UNKNOWN")


async def test_tags_of_repository_without_tags(client: TestClient) -> None:
    """A repository with only blobs exists and has an empty tag list."""
    await push_blob(client, "blobonly", b"data")
    resp = await client.get("/v2/blobonly/tags/list")
    assert resp.status == 200
    assert await resp.json() == {"name": "blobonly", "tags": []}


async def test_catalog(client: TestClient) -> None:
    resp = await client.get("/v2/_catalog")
    assert resp.status == 200
    assert await resp.json() == {"repositories": []}
    names = ["zeta", "alpha", "alpha/nested/deep", "alpha/nested", "mid", "b-c", "b.c"]
    for name in names:
        await push_blob(client, name, b"x")
    resp = await client.get("/v2/_catalog")
    assert resp.status == 200
    assert await resp.json() == {"repositories": sorted(names)}
    items, pages = await _follow(client, "/v2/_catalog?n=2", "repositories")
    assert items == sorted(names)
    assert pages == 4
    resp = await client.get("/v2/_catalog?n=2&last=alpha/nested")
    assert (await resp.json())["repositories"] == sorted(names)[2:4]
    assert LINK.fullmatch(resp.headers["Link"])
    for bad in ("-5", "abc"):
        resp = await client.get(f"/v2/_catalog?n={bad}")
        await assert_error(resp, 400, "PAGINATION_NUMBER_INVALID")


async def test_catalog_ignores_failed_pushes(client: TestClient) -> None:
    """A refused push does not create a repository."""
    resp = await client.post("/v2/ghost/blobs/uploads/?digest=sha256:" + "0" * 64, data=b"x")
    await assert_error(resp, 400, "DIGEST_INVALID")
    resp = await client.get("/v2/_catalog")
    assert "ghost" not in (await resp.json())["repositories"]
