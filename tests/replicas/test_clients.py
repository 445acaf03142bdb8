"""skopeo, podman, docker and ctr push and pull through HAProxy in front of three
replicas on one shared store (a folder, or a SeaweedFS bucket), each replica with its own
temporary folder: every request of a push may land on another replica.

Each client pushes an image with a layer above aiohttp's in-memory body limit, pulls it
back, and the bytes must be the ones pushed: digests preserved (skopeo, ctr) or the image
ID and diff IDs (docker and podman recompress on push). Afterwards each replica serves
the pushed manifest and blobs directly, byte-identical.
"""

from __future__ import annotations

import itertools
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
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
from tests.support.registry_http import get_manifest
from tests.support.replicas import REPLICA_HEADER, Cluster
from tests.support.skopeo import Skopeo

pytestmark = [pytest.mark.clients, pytest.mark.timeout(180)]

#: one layer under and one above aiohttp's in-memory limit (the socket-read path)
LAYERS = (96 * 1024, 3 * 1024 * 1024 + 5)
_namespaces = itertools.count()


@pytest.fixture
def repo(request: pytest.FixtureRequest) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    return f"replicas/{name}"


@pytest.fixture
def docker(dockerd: DockerDaemon) -> Iterator[DockerDaemon]:
    try:
        yield dockerd
    finally:
        dockerd.remove_all_images()


async def assert_served_by_every_replica(
    cluster: Cluster, repo: str, manifest_digest: str, blobs: dict[str, bytes]
) -> None:
    """Each replica, asked directly, has the manifest and every blob with its exact bytes."""
    async with aiohttp.ClientSession() as session:
        for replica in cluster.replicas:
            url = f"{replica.url}/v2/{repo}/manifests/{manifest_digest}"
            async with session.get(url) as resp:
                assert resp.status == 200, (replica.replica_name, await resp.text())
                assert sha256(await resp.read()) == manifest_digest
                assert resp.headers[REPLICA_HEADER] == replica.replica_name
            for digest, data in blobs.items():
                async with session.get(f"{replica.url}/v2/{repo}/blobs/{digest}") as resp:
                    assert resp.status == 200, (replica.replica_name, digest)
                    assert await resp.read() == data, (replica.replica_name, digest)


def pushed_blobs(cluster: Cluster, repo: str, ref: str) -> tuple[str, dict[str, bytes]]:
    """The manifest digest under `ref` and {digest: bytes} of its config and layers, as
    the balancer serves them."""
    resp = get_manifest(cluster.url, repo, ref)
    assert resp.status == 200
    manifest = json.loads(resp.body)
    blobs = {}
    for entry in [manifest["config"], *manifest["layers"]]:
        got = get_blob(cluster.url, repo, entry["digest"])
        assert sha256(got) == entry["digest"]
        blobs[entry["digest"]] = got
    return sha256(resp.body), blobs


def get_blob(url: str, repo: str, digest: str) -> bytes:
    with urllib.request.urlopen(f"{url}/v2/{repo}/blobs/{digest}", timeout=30) as resp:
        return bytes(resp.read())


def assert_layout_holds(layout: Path, img: Image) -> None:
    assert read_oci_layout(layout, "v1")["digest"] == img.manifest_digest
    for digest, data in {**img.blobs(), **img.manifests()}.items():
        assert layout_blob(layout, digest) == data, f"{digest} differs after the round trip"


def requests_spread(cluster: Cluster, repo: str) -> set[str]:
    """The replicas HAProxy sent this repository's requests to."""
    return {server for server, line in cluster.lb.requests_by_server() if f"/v2/{repo}/" in line}


async def test_skopeo(cluster: Cluster, skopeo: Skopeo, repo: str, tmp_path: Path) -> None:
    img = make_image("replicas-skopeo", LAYERS)
    layout = write_oci_layout(tmp_path / "image", img, "v1")
    ref = f"docker://{cluster.host}/{repo}:v1"
    skopeo.copy(f"oci:{layout}:v1", ref, "--preserve-digests")
    assert skopeo.inspect_raw_digest(ref) == img.manifest_digest

    skopeo.copy(ref, f"oci:{tmp_path / 'out'}:v1", "--preserve-digests")
    assert_layout_holds(tmp_path / "out", img)
    await assert_served_by_every_replica(cluster, repo, img.manifest_digest, img.blobs())
    assert requests_spread(cluster, repo) == set(cluster.names)


async def test_podman(cluster: Cluster, podman: Podman, repo: str, tmp_path: Path) -> None:
    """podman recompresses on push: the image ID, the diff IDs and the digest it reports
    for its push are what must survive."""
    img = make_image("replicas-podman", LAYERS)
    podman.pull(f"oci:{write_oci_layout(tmp_path / 'image', img, 'v1')}:v1")
    ref = f"{cluster.host}/{repo}:v1"
    pushed = podman.push(img.image_id, f"docker://{ref}", "--format", "oci")

    podman("rmi", "--all", "--force")
    assert podman.pull(ref) == img.image_id.removeprefix("sha256:")
    info = podman.image_inspect(ref)
    assert info["Digest"] == pushed
    assert info["RootFS"]["Layers"] == img.diff_ids
    digest, blobs = pushed_blobs(cluster, repo, "v1")
    assert digest == pushed
    await assert_served_by_every_replica(cluster, repo, pushed, blobs)
    assert requests_spread(cluster, repo) == set(cluster.names)


async def test_docker(cluster: Cluster, docker: DockerDaemon, repo: str, tmp_path: Path) -> None:
    img = make_image("replicas-docker", LAYERS)
    local = "regproxy-test/replicas-docker:v1"
    docker.docker("load", "--input", write_docker_archive(tmp_path / "image.tar", img, [local]))
    ref = f"{cluster.host}/{repo}:v1"
    docker.docker("tag", local, ref)
    digest, _ = docker.push(ref)

    docker.remove_all_images()
    assert f"Digest: {digest}" in docker.docker("pull", ref).stdout
    info = docker.image_inspect(ref)
    assert info["Id"] == img.image_id
    assert info["RootFS"]["Layers"] == img.diff_ids
    served, blobs = pushed_blobs(cluster, repo, "v1")
    assert served == digest
    await assert_served_by_every_replica(cluster, repo, digest, blobs)
    assert requests_spread(cluster, repo) == set(cluster.names)


async def test_ctr(cluster: Cluster, dockerd: DockerDaemon, repo: str, tmp_path: Path) -> None:
    """containerd keeps content byte for byte: every digest survives."""
    img = make_image("replicas-ctr", LAYERS)
    name = "import.test/regproxy/replicas-ctr"
    ref = f"{cluster.host}/{repo}:v1"
    pusher = Ctr(dockerd, f"regproxy-replicas-{next(_namespaces)}")
    puller = Ctr(dockerd, f"regproxy-replicas-{next(_namespaces)}")
    try:
        pusher("images", "import", write_oci_archive(tmp_path / "image.tar", img, "v1", name=name))
        pusher("images", "push", "--plain-http", ref, f"{name}:v1")
        pusher.remove_all_images()

        puller("images", "pull", "--plain-http", ref)
        assert puller.image_digest(ref) == img.manifest_digest
        expected = {img.manifest_digest: img.manifest, **img.blobs()}
        assert puller.content_digests() == set(expected)
        for digest, data in expected.items():
            assert puller.content(digest) == data, f"{digest} differs after the round trip"
    finally:
        pusher.remove_all_images()
        puller.remove_all_images()
    await assert_served_by_every_replica(cluster, repo, img.manifest_digest, img.blobs())
    assert requests_spread(cluster, repo) == set(cluster.names)
