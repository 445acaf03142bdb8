"""The docker CLI through a real (private) dockerd: ``load``, ``tag``, ``push``, ``pull``.

docker recompresses layers on push, so only the image ID (config digest), the diff_ids and
the manifest digest that ``docker push`` reports can be compared end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.dockerd import DockerDaemon
from tests.support.images import (
    Image,
    make_image,
    make_index,
    write_docker_archive,
    write_oci_layout,
)
from tests.support.processes import RegistryServer
from tests.support.registry_http import get_manifest
from tests.support.skopeo import Skopeo


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Image, Path]:
    img = make_image("docker-image", (400 * 1024, 700 * 1024, 30 * 1024))
    path = tmp_path_factory.mktemp("docker") / "image.tar"
    return img, write_docker_archive(path, img, ["regproxy-test/docker-image:v1"])


def test_push_pull_roundtrip(
    registry: RegistryServer, docker: DockerDaemon, repo: str, image: tuple[Image, Path]
) -> None:
    img, archive = image
    docker.docker("load", "--input", archive)
    ref = f"{registry.host}/{repo}:v1"
    docker.docker("tag", "regproxy-test/docker-image:v1", ref)

    digest, _ = docker.push(ref)
    resp = get_manifest(registry.url, repo, "v1")
    assert resp.status == 200
    assert resp.header("Docker-Content-Digest") == digest

    docker.remove_all_images()
    out = docker.docker("pull", ref).stdout
    assert f"Digest: {digest}" in out

    info = docker.image_inspect(ref)
    assert info["Id"] == img.image_id
    assert f"{registry.host}/{repo}@{digest}" in info["RepoDigests"]
    assert info["RootFS"]["Layers"] == img.diff_ids

    docker.remove_all_images()
    docker.docker("pull", f"{registry.host}/{repo}@{digest}")
    assert docker.image_inspect(f"{registry.host}/{repo}@{digest}")["Id"] == img.image_id


def test_push_to_second_repository_reuses_blobs(
    registry: RegistryServer, docker: DockerDaemon, repo: str, image: tuple[Image, Path]
) -> None:
    """A second push of the same layers: docker tries a cross-repository mount (or finds
    the blobs present); either way the second repository must be complete."""
    img, archive = image
    docker.docker("load", "--input", archive)
    first, second = f"{registry.host}/{repo}/one:v1", f"{registry.host}/{repo}/two:v1"
    docker.docker("tag", "regproxy-test/docker-image:v1", first)
    docker.docker("tag", "regproxy-test/docker-image:v1", second)
    digest_one, _ = docker.push(first)
    digest_two, _ = docker.push(second)
    assert digest_one == digest_two

    docker.remove_all_images()
    docker.docker("pull", second)
    assert docker.image_inspect(second)["Id"] == img.image_id


def test_pull_multiarch_index(
    registry: RegistryServer, docker: DockerDaemon, skopeo: Skopeo, repo: str, tmp_path: Path
) -> None:
    """docker picks its platform's child out of an OCI index pushed by another client."""
    idx = make_index("docker-index", (80 * 1024,))
    layout = write_oci_layout(tmp_path / "index", idx, "v1")
    ref = f"{registry.host}/{repo}:v1"
    skopeo.copy(f"oci:{layout}:v1", f"docker://{ref}", "--all", "--preserve-digests")

    out = docker.docker("pull", "--platform", "linux/amd64", ref).stdout
    assert f"Digest: {idx.digest}" in out
    amd64 = idx.image_for("amd64")
    info = docker.image_inspect(ref)
    assert info["Id"] == amd64.image_id
    assert info["RootFS"]["Layers"] == amd64.diff_ids
    assert f"{registry.host}/{repo}@{idx.digest}" in info["RepoDigests"]
