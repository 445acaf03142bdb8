"""docker (a real dockerd) pulling through regproxy's cache.

Two dialects: the explicit proxy path (``docker pull PROXY/p/ref/<name>``, with the
session's dockerd) and dockerd's ``registry-mirrors`` (a second dockerd of this module
whose only mirror is regproxy, which serves un-prefixed pulls of repositories it does not
hold from its upstream named ``docker.io`` — here the local test upstream, holding
``library/testimg``).

The mirror dockerd gets ``HTTP(S)_PROXY`` pointing at a loopback port that refuses
connections: if the mirror failed, its fallback to the real Docker Hub would fail too,
instead of leaving the machine (loopback addresses never go through the proxy).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.access_log import AIOHTTP_AGENT
from tests.support.dockerd import DockerDaemon
from tests.support.images import make_image, make_index, write_docker_archive
from tests.support.pull_through import HUB_NAME, PullThrough
from tests.support.registry_http import get_manifest, request
from tests.support.skopeo import Skopeo

DOCKER_AGENT = "docker/"


@pytest.fixture(scope="module")
def proxy_mirror_upstream() -> str | None:
    """This module's regproxy answers un-prefixed pulls of unknown names from docker.io."""
    return HUB_NAME


@pytest.fixture(scope="module")
def mirror_daemon(pull_through: PullThrough, refused_url: str) -> Iterator[DockerDaemon]:
    """A dockerd whose Docker Hub mirror is this module's regproxy."""
    daemon = DockerDaemon(
        config={"registry-mirrors": [pull_through.proxy.url]},
        env={"HTTPS_PROXY": refused_url, "HTTP_PROXY": refused_url},
    )
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def mirror_docker(mirror_daemon: DockerDaemon) -> Iterator[DockerDaemon]:
    try:
        yield mirror_daemon
    finally:
        mirror_daemon.remove_all_images()


def test_pull_through_proxy_path(
    pull_through: PullThrough, docker: DockerDaemon, repo: str
) -> None:
    img = make_image(pull_through.seed("proxy-docker-image"), (300 * 1024, 60 * 1024))
    pull_through.push(img, repo)
    ref = f"{pull_through.proxied(repo)}:v1"
    since = pull_through.upstream_log.mark()

    out = docker.docker("pull", ref).stdout
    assert f"Digest: {img.manifest_digest}" in out
    info = docker.image_inspect(ref)
    assert info["Id"] == img.image_id
    assert info["RootFS"]["Layers"] == img.diff_ids
    assert f"{pull_through.proxied(repo)}@{img.manifest_digest}" in info["RepoDigests"]
    assert pull_through.client_requests_upstream(since) == []


def test_pull_platform_of_index_through_proxy_path(
    pull_through: PullThrough, docker: DockerDaemon, repo: str
) -> None:
    idx = make_index(pull_through.seed("proxy-docker-index"), (70 * 1024,))
    pull_through.push(idx, repo)
    ref = f"{pull_through.proxied(repo)}:v1"

    out = docker.docker("pull", "--platform", "linux/arm64", ref).stdout
    assert f"Digest: {idx.digest}" in out
    arm64 = idx.image_for("arm64")
    info = docker.image_inspect(ref)
    assert info["Id"] == arm64.image_id
    assert info["Architecture"] == "arm64"
    assert info["RootFS"]["Layers"] == arm64.diff_ids


def test_registry_mirror_serves_docker_hub_names(
    pull_through: PullThrough, mirror_docker: DockerDaemon
) -> None:
    img = make_image(pull_through.seed("proxy-docker-mirror"), (120 * 1024,))
    pull_through.push(img, "library/testimg")
    upstream_since = pull_through.upstream_log.mark()
    proxy_since = pull_through.proxy_log.mark()

    out = mirror_docker.docker("pull", "testimg:v1").stdout
    assert f"Digest: {img.manifest_digest}" in out
    info = mirror_docker.image_inspect("testimg:v1")
    assert info["Id"] == img.image_id
    assert info["RootFS"]["Layers"] == img.diff_ids

    # dockerd asked the mirror for the un-prefixed Docker Hub name ...
    asked = {
        e.path
        for e in pull_through.proxy_log.entries(proxy_since)
        if DOCKER_AGENT in e.agent and e.status == 200
    }
    assert "/v2/library/testimg/manifests/v1" in asked
    assert {f"/v2/library/testimg/blobs/{d}" for d in img.blobs()} <= asked
    # ... and regproxy fetched it from the upstream configured as docker.io
    fetched = {e.path for e in pull_through.upstream_log.entries(upstream_since)}
    assert "/v2/library/testimg/manifests/v1" in fetched
    assert pull_through.client_requests_upstream(upstream_since) == []
    assert get_manifest(pull_through.proxy.url, "library/testimg", "v1").header(
        "X-Cache-Status"
    ) in ("HIT", "REVALIDATED")
    # the same content is cached under the upstream's name, reachable by the proxy path too
    assert (
        get_manifest(
            pull_through.proxy.url, f"p/{HUB_NAME}/library/testimg", img.manifest_digest
        ).header("X-Cache-Status")
        == "HIT"
    )


def test_push_stays_local_with_mirror(
    pull_through: PullThrough,
    docker: DockerDaemon,
    mirror_docker: DockerDaemon,
    tmp_path: Path,
) -> None:
    """A push to regproxy lands in its own storage, never upstream; a mirror pull of that
    name then gets the local image (the documented shadowing trade-off)."""
    img = make_image(pull_through.seed("proxy-docker-pushed"), (90 * 1024,))
    archive = write_docker_archive(tmp_path / "image.tar", img, ["regproxy-test/pushed:v1"])
    docker.docker("load", "--input", archive)
    ref = f"{pull_through.proxy.host}/library/pushed:v1"
    docker.docker("tag", "regproxy-test/pushed:v1", ref)
    since = pull_through.upstream_log.mark()

    digest, _ = docker.push(ref)
    local = get_manifest(pull_through.proxy.url, "library/pushed", "v1")
    assert local.status == 200
    assert local.header("Docker-Content-Digest") == digest
    assert local.header("X-Cache-Status") is None  # served from registry storage

    assert mirror_docker.docker("pull", "pushed:v1").stdout
    assert mirror_docker.image_inspect("pushed:v1")["Id"] == img.image_id

    assert [e for e in pull_through.upstream_log.entries(since) if "pushed" in e.path] == []
    assert request(f"{pull_through.upstream.url}/v2/library/pushed/tags/list").status == 404


def test_push_of_mirrored_image_under_its_hub_name_stays_local(
    pull_through: PullThrough, mirror_docker: DockerDaemon
) -> None:
    """Pull ``library/testimg2`` through the mirror, then push it to regproxy under the same
    name (keeping a copy of a Docker Hub image locally). docker knows the blobs' digests
    from the pull, so it asks regproxy whether they exist before uploading them.

    regproxy must answer those HEADs for the repository being pushed to (nothing local
    yet: 404), not through the mirror route (the proxy cache or the upstream: 200);
    otherwise docker skips the uploads ("Layer already exists") and the manifest PUT, which
    checks registry storage only, fails with MANIFEST_BLOB_UNKNOWN.
    """
    img = make_image(pull_through.seed("proxy-docker-repush"), (80 * 1024,))
    pull_through.push(img, "library/testimg2")
    mirror_docker.docker("pull", "testimg2:v1")
    ref = f"{pull_through.proxy.host}/library/testimg2:local"
    mirror_docker.docker("tag", "testimg2:v1", ref)
    since = pull_through.upstream_log.mark()

    result = mirror_docker.docker("push", ref, check=False)
    assert result.returncode == 0, result.stderr
    local = get_manifest(pull_through.proxy.url, "library/testimg2", "local")
    assert local.status == 200
    assert local.header("X-Cache-Status") is None
    assert [(e.method, e.path) for e in pull_through.upstream_log.entries(since)] == []


def test_copy_of_hub_image_to_its_name_stays_local(
    pull_through: PullThrough, skopeo: Skopeo
) -> None:
    """The same without the cache: ``skopeo copy`` an upstream image into regproxy under
    the same (not yet local) name. skopeo HEADs each blob first; regproxy must answer from
    the repository pushed to, not forward the HEADs to the mirror's upstream (which has
    them, so skopeo would skip the uploads and the manifest PUT would fail)."""
    img = make_image(pull_through.seed("proxy-docker-copy"), (40 * 1024,))
    pull_through.push(img, "library/testimg3")
    since = pull_through.upstream_log.mark()

    result = skopeo(
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--preserve-digests",
        f"docker://{pull_through.upstream.host}/library/testimg3:v1",
        f"docker://{pull_through.proxy.host}/library/testimg3:v1",
        check=False,
    )
    asked = [
        (e.method, e.path)
        for e in pull_through.upstream_log.entries(since)
        if AIOHTTP_AGENT.search(e.agent)
    ]
    assert result.returncode == 0, f"{result.stderr}\nregproxy asked the upstream: {asked}"
    local = get_manifest(pull_through.proxy.url, "library/testimg3", "v1")
    assert (local.status, local.body) == (200, img.manifest)
    assert local.header("X-Cache-Status") is None
    assert asked == []
