"""skopeo pulling through regproxy's cache (``/v2/p/ref/<name>``) from a real upstream.

The upstream is Debian's ``docker-registry`` or a second regproxy (each module runs once
per kind). skopeo copies OCI content without converting it, so every digest the proxy
serves must be the upstream's, byte for byte.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support.digests import sha256
from tests.support.images import (
    OCI_INDEX,
    Image,
    ImageIndex,
    layout_blob,
    make_image,
    make_index,
    read_oci_layout,
    write_oci_layout,
)
from tests.support.processes import http_status
from tests.support.pull_through import TAG_TTL, PullThrough, wait_past_ttl
from tests.support.registry_http import get_manifest
from tests.support.skopeo import Skopeo


def assert_layout_holds(layout: Path, content: Image | ImageIndex, tag: str = "v1") -> None:
    """``layout`` names ``content`` under ``tag`` and holds all of it, byte for byte."""
    assert read_oci_layout(layout, tag)["digest"] == content.top_digest
    for digest, data in {**content.blobs(), **content.manifests()}.items():
        stored = layout_blob(layout, digest)
        assert sha256(stored) == digest
        assert stored == data, f"{digest} differs after the pull through the proxy"


def blob_gets(pull_through: PullThrough, repo: str, since: int) -> Counter[str]:
    """Digests of the blob GETs the upstream answered for ``repo`` since ``since``."""
    prefix = f"/v2/{repo}/blobs/"
    return Counter(
        entry.path.removeprefix(prefix)
        for entry in pull_through.upstream_log.entries(since)
        if entry.method == "GET" and entry.path.startswith(prefix)
    )


def test_copy_inspect_list_tags_through_proxy(
    pull_through: PullThrough, skopeo: Skopeo, repo: str, tmp_path: Path
) -> None:
    img = make_image(pull_through.seed("proxy-skopeo-image"), (300 * 1024, 1024 * 1024, 20 * 1024))
    pull_through.push(img, repo, "v1")
    pull_through.push(img, repo, "v2")
    since = pull_through.upstream_log.mark()
    ref = f"docker://{pull_through.proxied(repo)}"

    out = tmp_path / "out"
    skopeo.copy(f"{ref}:v1", f"oci:{out}:v1")
    assert_layout_holds(out, img)

    info = skopeo.inspect(f"{ref}:v1")
    assert info["Digest"] == img.manifest_digest
    assert info["Layers"] == img.layer_digests
    assert skopeo.inspect_raw(f"{ref}:v1") == img.manifest
    assert sorted(skopeo.list_tags(ref)) == ["v1", "v2"]

    # skopeo never reached the upstream itself; regproxy fetched every blob exactly once
    assert pull_through.client_requests_upstream(since) == []
    assert blob_gets(pull_through, repo, since) == Counter(dict.fromkeys(img.blobs(), 1))


def test_copy_all_index_through_proxy(
    pull_through: PullThrough, skopeo: Skopeo, repo: str, tmp_path: Path
) -> None:
    idx = make_index(pull_through.seed("proxy-skopeo-index"), (200 * 1024, 64 * 1024))
    pull_through.push(idx, repo)
    ref = f"docker://{pull_through.proxied(repo)}:v1"

    out = tmp_path / "out"
    skopeo.copy(ref, f"oci:{out}:v1", "--all")
    assert read_oci_layout(out, "v1")["mediaType"] == OCI_INDEX
    assert_layout_holds(out, idx)
    assert skopeo.inspect_raw(ref) == idx.index


def test_cached_content_served_when_upstream_is_down(
    pull_through: PullThrough, skopeo: Skopeo, repo: str, tmp_path: Path
) -> None:
    """Warm the cache, stop the upstream, wait until the tags are stale: every pull is still
    served (the tag revalidation fails, so the cached copy is answered, marked STALE)."""
    img = make_image(pull_through.seed("proxy-skopeo-down-image"), (150 * 1024, 30 * 1024))
    idx = make_index(pull_through.seed("proxy-skopeo-down-index"), (50 * 1024,))
    pull_through.push(img, f"{repo}/image")
    pull_through.push(idx, f"{repo}/index")
    image_ref = f"docker://{pull_through.proxied(f'{repo}/image')}"
    index_ref = f"docker://{pull_through.proxied(f'{repo}/index')}"
    skopeo.copy(f"{image_ref}:v1", f"oci:{tmp_path / 'warm-image'}:v1")
    skopeo.copy(f"{index_ref}:v1", f"oci:{tmp_path / 'warm-index'}:v1", "--all")
    assert skopeo.list_tags(image_ref) == ["v1"]
    cached_at = time.monotonic()

    with pull_through.upstream_down():
        assert http_status(f"{pull_through.upstream.url}/v2/") is None
        wait_past_ttl(cached_at)

        skopeo.copy(f"{image_ref}:v1", f"oci:{tmp_path / 'image'}:v1")
        assert_layout_holds(tmp_path / "image", img)
        skopeo.copy(f"{index_ref}:v1", f"oci:{tmp_path / 'index'}:v1", "--all")
        assert_layout_holds(tmp_path / "index", idx)
        assert skopeo.inspect(f"{image_ref}:v1")["Digest"] == img.manifest_digest
        assert skopeo.list_tags(image_ref) == ["v1"]

        resp = get_manifest(pull_through.proxy.url, f"p/ref/{repo}/image", "v1")
        assert resp.status == 200
        assert resp.body == img.manifest
        assert resp.header("X-Cache-Status") == "STALE"


def test_tag_repointed_upstream_is_seen_after_ttl(
    pull_through: PullThrough, skopeo: Skopeo, repo: str
) -> None:
    first = make_image(pull_through.seed("proxy-skopeo-tag-a"), (10 * 1024,))
    second = make_image(pull_through.seed("proxy-skopeo-tag-b"), (10 * 1024,))
    ref = f"docker://{pull_through.proxied(repo)}:v1"
    pull_through.push(first, repo)
    assert skopeo.inspect_raw(ref) == first.manifest
    cached_at = time.monotonic()

    pull_through.push(second, repo)
    since = pull_through.upstream_log.mark()
    seen = skopeo.inspect_raw(ref)
    if time.monotonic() - cached_at < TAG_TTL:  # (always, unless the machine stalls)
        assert seen == first.manifest, "a fresh cached tag was revalidated before its TTL"
        assert pull_through.upstream_log.entries(since) == []

    wait_past_ttl(cached_at)
    assert skopeo.inspect_raw(ref) == second.manifest
    asked = [(e.method, e.path) for e in pull_through.upstream_log.entries(since)]
    assert ("HEAD", f"/v2/{repo}/manifests/v1") in asked, "a stale tag is revalidated with HEAD"


def test_push_under_proxy_prefix_is_denied(
    pull_through: PullThrough, skopeo: Skopeo, repo: str, tmp_path: Path
) -> None:
    img = make_image(pull_through.seed("proxy-skopeo-push"), (10 * 1024,))
    layout = write_oci_layout(tmp_path / "layout", img, "v1")
    since = pull_through.upstream_log.mark()
    result = skopeo(
        "copy",
        "--dest-tls-verify=false",
        f"oci:{layout}:v1",
        f"docker://{pull_through.proxied(repo)}:v1",
        check=False,
    )
    assert result.returncode != 0
    assert "denied" in result.stderr.lower(), result.stderr
    # skopeo's HEAD probes of the blobs are reads and may be answered from upstream;
    # nothing is ever written there
    assert {e.method for e in pull_through.upstream_log.entries(since)} <= {"HEAD", "GET"}
    assert pull_through.client_requests_upstream(since) == []


def test_concurrent_cold_copies_fetch_each_blob_once(
    pull_through: PullThrough, skopeo: Skopeo, repo: str, tmp_path: Path
) -> None:
    """Four skopeo copies of one cold image at once: the upstream serves each blob once."""
    img = make_image(
        pull_through.seed("proxy-skopeo-coalesce"), (6 * 1024 * 1024, 2 * 1024 * 1024, 64 * 1024)
    )
    pull_through.push(img, repo)
    since = pull_through.upstream_log.mark()
    ref = f"docker://{pull_through.proxied(repo)}:v1"
    outs = [tmp_path / f"out{i}" for i in range(4)]

    with ThreadPoolExecutor(len(outs)) as pool:
        for result in pool.map(lambda out: skopeo.copy(ref, f"oci:{out}:v1"), outs):
            assert result.returncode == 0

    for out in outs:
        assert_layout_holds(out, img)
    expected = Counter(dict.fromkeys(img.blobs(), 1))
    pull_through.upstream_log.wait_for(
        lambda _entries: set(blob_gets(pull_through, repo, since)) >= set(expected), since=since
    )
    assert blob_gets(pull_through, repo, since) == expected
    manifest_gets = [
        e
        for e in pull_through.upstream_log.entries(since)
        if e.method == "GET" and e.path == f"/v2/{repo}/manifests/v1"
    ]
    assert len(manifest_gets) == 1, manifest_gets
    assert pull_through.client_requests_upstream(since) == []
