"""Real clients against regproxy with both stores on S3 (the session's SeaweedFS).

One regproxy process for the module, its pushed images and its pull-through cache both in
one bucket (prefixes ``registry`` and ``proxy``), its upstream Debian's ``docker-registry``.
Each client — skopeo, podman, docker (the session's private dockerd) and ctr (that
dockerd's containerd) — pushes one small image and pulls it back, then pulls another
through the cache. Every check ends at the bytes: digests equal, and the blobs are objects
in the bucket, not files on the proxy's disk.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ctr import Ctr
from tests.support.digests import sha256
from tests.support.dockerd import DockerDaemon
from tests.support.images import (
    Image,
    layout_blob,
    make_image,
    read_oci_layout,
    write_docker_archive,
    write_oci_archive,
    write_oci_layout,
)
from tests.support.podman import Podman
from tests.support.processes import ReferenceRegistry, RegproxyProcess, registry_target
from tests.support.pull_through import PullThrough, proxy_config
from tests.support.registry_http import get_manifest
from tests.support.s3store import blob_key, bucket_keys, s3_section, s3_store_env
from tests.support.seaweed import SeaweedS3
from tests.support.skopeo import Skopeo

#: small layers: the point is the S3 paths, not throughput (one is above aiohttp's
#: in-memory body limit, so it takes the socket-read path into the upload)
LAYERS = (96 * 1024, 1536 * 1024)
_namespaces = itertools.count()


@pytest.fixture(scope="module")
def bucket(seaweed: SeaweedS3) -> str:
    return seaweed.create_bucket()


@pytest.fixture(scope="module")
def pull_through(
    seaweed: SeaweedS3, bucket: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PullThrough]:
    """docker-registry as the upstream and one regproxy on S3 in front of it; the same
    regproxy is the push target (`registry`)."""
    if registry_target() != "regproxy":
        pytest.skip("regproxy's stores on S3; no reference registry to run this on")
    workdir = tmp_path_factory.mktemp("s3-clients")
    upstream = ReferenceRegistry(workdir / "upstream")
    upstream.start()
    try:
        proxy = RegproxyProcess(
            workdir / "proxy",
            extra_config=s3_section(seaweed, workdir / "proxy") + proxy_config(upstream.url, None),
            env=s3_store_env(bucket),
        )
        proxy.start()
        try:
            yield PullThrough(
                kind="distribution",
                upstream=upstream,
                proxy=proxy,
                seeder=Skopeo(workdir / "seeder"),
                workdir=workdir,
            )
        finally:
            proxy.stop()
    finally:
        upstream.stop()


@pytest.fixture(scope="module")
def registry(pull_through: PullThrough) -> RegproxyProcess:
    return pull_through.proxy


@pytest.fixture
def ctr(dockerd: DockerDaemon) -> Iterator[Ctr]:
    client = Ctr(dockerd, f"regproxy-s3-test-{next(_namespaces)}")
    try:
        yield client
    finally:
        client.remove_all_images()


def assert_in_bucket(seaweed: SeaweedS3, bucket: str, prefix: str, digests: list[str]) -> None:
    """Each blob is an object of the store at ``s3://bucket/prefix``."""
    keys = set(bucket_keys(seaweed, bucket, f"{prefix}/blobs/"))
    missing = [d for d in digests if blob_key(prefix, d) not in keys]
    assert not missing, f"not stored in s3://{bucket}/{prefix}: {missing}"


def assert_no_local_blobs(registry: RegproxyProcess) -> None:
    """The local folders a file-backed store would use stay empty: blobs went to S3."""
    for folder in (registry.storage_dir, registry.proxy_storage_dir):
        assert not [p for p in folder.rglob("*") if p.is_file()], f"files in {folder}"


def assert_layout_holds(layout: Path, img: Image) -> None:
    assert read_oci_layout(layout, "v1")["digest"] == img.manifest_digest
    for digest, data in {**img.blobs(), **img.manifests()}.items():
        stored = layout_blob(layout, digest)
        assert sha256(stored) == digest
        assert stored == data, f"{digest} differs after the round trip"


# ---- push and pull back ----------------------------------------------------------------


def test_skopeo_push_pull(
    registry: RegproxyProcess,
    seaweed: SeaweedS3,
    bucket: str,
    skopeo: Skopeo,
    repo: str,
    tmp_path: Path,
) -> None:
    img = make_image("s3-skopeo", LAYERS)
    layout = write_oci_layout(tmp_path / "image", img, "v1")
    ref = f"docker://{registry.host}/{repo}:v1"
    skopeo.copy(f"oci:{layout}:v1", ref, "--preserve-digests")
    assert skopeo.inspect_raw_digest(ref) == img.manifest_digest

    skopeo.copy(ref, f"oci:{tmp_path / 'out'}:v1", "--preserve-digests")
    assert_layout_holds(tmp_path / "out", img)
    assert_in_bucket(seaweed, bucket, "registry", list(img.blobs()))
    assert_no_local_blobs(registry)


def test_podman_push_pull(
    registry: RegproxyProcess,
    seaweed: SeaweedS3,
    bucket: str,
    podman: Podman,
    repo: str,
    tmp_path: Path,
) -> None:
    """podman recompresses on push: the image ID, the diff_ids and the digest it reports
    for its push are what must survive."""
    img = make_image("s3-podman", LAYERS)
    podman.pull(f"oci:{write_oci_layout(tmp_path / 'image', img, 'v1')}:v1")
    ref = f"{registry.host}/{repo}:v1"
    pushed = podman.push(img.image_id, f"docker://{ref}", "--format", "oci")
    resp = get_manifest(registry.url, repo, "v1")
    assert (resp.status, sha256(resp.body)) == (200, pushed)

    podman("rmi", "--all", "--force")
    assert podman.pull(ref) == img.image_id.removeprefix("sha256:")
    info = podman.image_inspect(ref)
    assert info["Digest"] == pushed
    assert info["RootFS"]["Layers"] == img.diff_ids
    manifest = json.loads(resp.body)
    assert_in_bucket(seaweed, bucket, "registry", [d["digest"] for d in manifest["layers"]])


def test_docker_push_pull(
    registry: RegproxyProcess,
    seaweed: SeaweedS3,
    bucket: str,
    docker: DockerDaemon,
    repo: str,
    tmp_path: Path,
) -> None:
    img = make_image("s3-docker", LAYERS)
    archive = write_docker_archive(tmp_path / "image.tar", img, ["regproxy-test/s3-docker:v1"])
    docker.docker("load", "--input", archive)
    ref = f"{registry.host}/{repo}:v1"
    docker.docker("tag", "regproxy-test/s3-docker:v1", ref)
    digest, _ = docker.push(ref)
    resp = get_manifest(registry.url, repo, "v1")
    assert (resp.status, resp.header("Docker-Content-Digest")) == (200, digest)

    docker.remove_all_images()
    assert f"Digest: {digest}" in docker.docker("pull", ref).stdout
    info = docker.image_inspect(ref)
    assert info["Id"] == img.image_id
    assert info["RootFS"]["Layers"] == img.diff_ids
    assert f"{registry.host}/{repo}@{digest}" in info["RepoDigests"]
    manifest = json.loads(resp.body)
    assert_in_bucket(seaweed, bucket, "registry", [d["digest"] for d in manifest["layers"]])


def test_ctr_push_pull(
    registry: RegproxyProcess,
    seaweed: SeaweedS3,
    bucket: str,
    dockerd: DockerDaemon,
    repo: str,
    tmp_path: Path,
) -> None:
    """containerd keeps content byte for byte: every digest survives."""
    img = make_image("s3-ctr", LAYERS)
    name = "import.test/regproxy/s3-ctr"
    ref = f"{registry.host}/{repo}:v1"
    pusher = Ctr(dockerd, f"regproxy-s3-test-{next(_namespaces)}")
    puller = Ctr(dockerd, f"regproxy-s3-test-{next(_namespaces)}")
    try:
        pusher("images", "import", write_oci_archive(tmp_path / "image.tar", img, "v1", name=name))
        pusher("images", "push", "--plain-http", ref, f"{name}:v1")
        pusher.remove_all_images()  # the content goes: the pull must download it all

        puller("images", "pull", "--plain-http", ref)
        assert puller.image_digest(ref) == img.manifest_digest
        expected = {img.manifest_digest: img.manifest, **img.blobs()}
        assert puller.content_digests() == set(expected)
        for digest, data in expected.items():
            assert puller.content(digest) == data, f"{digest} differs after the round trip"
    finally:
        pusher.remove_all_images()
        puller.remove_all_images()
    assert_in_bucket(seaweed, bucket, "registry", list(img.blobs()))


# ---- pull through the cache (proxy_storage on S3) -------------------------------------


def _cached_upstream_image(pull_through: PullThrough, seed: str, repo: str) -> Image:
    """An image pushed to the upstream only, to be pulled through the cache."""
    img = make_image(seed, LAYERS)
    pull_through.push(img, repo)
    return img


def _assert_cached(
    pull_through: PullThrough, seaweed: SeaweedS3, bucket: str, img: Image, since: int
) -> None:
    """The cache holds the image in the bucket, and only regproxy reached the upstream."""
    assert_in_bucket(seaweed, bucket, "proxy", list(img.blobs()))
    assert pull_through.client_requests_upstream(since) == []
    assert_no_local_blobs(pull_through.proxy)


def test_skopeo_pull_through(
    pull_through: PullThrough, seaweed: SeaweedS3, bucket: str, skopeo: Skopeo, repo: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    img = _cached_upstream_image(pull_through, "s3-proxy-skopeo", repo)
    since = pull_through.upstream_log.mark()
    ref = f"docker://{pull_through.proxied(repo)}:v1"
    skopeo.copy(ref, f"oci:{tmp_path / 'out'}:v1")
    assert_layout_holds(tmp_path / "out", img)
    _assert_cached(pull_through, seaweed, bucket, img, since)

    # a second pull is answered from the bucket alone
    with pull_through.upstream_down():
        skopeo.copy(ref, f"oci:{tmp_path / 'again'}:v1")
    assert_layout_holds(tmp_path / "again", img)


def test_podman_pull_through(
    pull_through: PullThrough, seaweed: SeaweedS3, bucket: str, podman: Podman, repo: str
) -> None:
    img = _cached_upstream_image(pull_through, "s3-proxy-podman", repo)
    since = pull_through.upstream_log.mark()
    ref = f"{pull_through.proxied(repo)}:v1"
    assert podman.pull(ref) == img.image_id.removeprefix("sha256:")
    info = podman.image_inspect(ref)
    assert info["Digest"] == img.manifest_digest
    assert info["RootFS"]["Layers"] == img.diff_ids
    _assert_cached(pull_through, seaweed, bucket, img, since)


def test_docker_pull_through(
    pull_through: PullThrough, seaweed: SeaweedS3, bucket: str, docker: DockerDaemon, repo: str
) -> None:
    img = _cached_upstream_image(pull_through, "s3-proxy-docker", repo)
    since = pull_through.upstream_log.mark()
    ref = f"{pull_through.proxied(repo)}:v1"
    assert f"Digest: {img.manifest_digest}" in docker.docker("pull", ref).stdout
    info = docker.image_inspect(ref)
    assert info["Id"] == img.image_id
    assert info["RootFS"]["Layers"] == img.diff_ids
    _assert_cached(pull_through, seaweed, bucket, img, since)


def test_ctr_pull_through(
    pull_through: PullThrough, seaweed: SeaweedS3, bucket: str, ctr: Ctr, repo: str
) -> None:
    img = _cached_upstream_image(pull_through, "s3-proxy-ctr", repo)
    since = pull_through.upstream_log.mark()
    ref = f"{pull_through.proxied(repo)}:v1"
    ctr("images", "pull", "--plain-http", ref)
    assert ctr.image_digest(ref) == img.manifest_digest
    expected = {img.manifest_digest: img.manifest, **img.blobs()}
    assert ctr.content_digests() == set(expected)
    for digest, data in expected.items():
        assert ctr.content(digest) == data, f"{digest} differs after the pull through the cache"
    _assert_cached(pull_through, seaweed, bucket, img, since)
