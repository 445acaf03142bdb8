"""containerd's ``ctr`` (the containerd our dockerd runs) pushing and pulling indexes.

containerd keeps content byte for byte, so unlike docker and podman every digest survives:
the index, each child manifest, each config and each compressed layer.

Each test imports into one containerd namespace, pushes, removes the image there with
``--sync`` (containerd then garbage-collects the content), and pulls into a second
namespace: the pull can only succeed by downloading everything from the registry.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.ctr import Ctr
from tests.support.digests import sha256
from tests.support.dockerd import DockerDaemon
from tests.support.images import (
    OCI_INDEX,
    Image,
    ImageIndex,
    make_image,
    make_index,
    write_oci_archive,
)
from tests.support.processes import RegistryServer
from tests.support.registry_http import get_manifest
from tests.support.tools import run

_namespace_ids = itertools.count()


@pytest.fixture
def new_ctr(dockerd: DockerDaemon) -> Iterator[Callable[[], Ctr]]:
    """Factory of ``Ctr`` clients in fresh namespaces, emptied after the test."""
    made: list[Ctr] = []

    def make() -> Ctr:
        client = Ctr(dockerd, f"regproxy-test-{next(_namespace_ids)}")
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            client.remove_all_images()


def push_from_archive(
    ctr: Ctr, tmp_path: Path, content: Image | ImageIndex, dest: str, *import_flags: str
) -> None:
    """Import ``content`` from an OCI archive, push it to ``dest``, then delete it locally."""
    name = "import.test/regproxy/image"
    archive = write_oci_archive(tmp_path / "image.tar", content, "v1", name=name)
    ctr("images", "import", *import_flags, archive)
    assert ctr.image_digest(f"{name}:v1") == content.top_digest
    _push(ctr, dest, f"{name}:v1")
    ctr.remove_all_images()
    assert ctr.content_digests() == set(), "content survived image removal"


def _push(ctr: Ctr, dest: str, source: str) -> None:
    """`ctr images push`, tried once more only when containerd failed to read its own
    content store (a gRPC error between ctr and the daemon, seen once in many CI runs as
    "rpc error: code = Internal desc = unexpected EOF" under load): that is never an
    answer of the registry, whose failures come back as HTTP errors and fail at once."""
    argv = [*ctr.argv, "images", "push", "--plain-http", dest, source]
    proc = run(argv, check=False)
    if proc.returncode != 0 and "rpc error" in proc.stderr:
        proc = run(argv, check=False)
    assert proc.returncode == 0, f"ctr push failed: {proc.stdout[-2000:]}\n{proc.stderr}"


def test_push_pull_index_all_platforms(
    registry: RegistryServer, new_ctr: Callable[[], Ctr], repo: str, tmp_path: Path
) -> None:
    idx = make_index("ctr-index", (150 * 1024, 40 * 1024))
    ref = f"{registry.host}/{repo}:v1"
    push_from_archive(new_ctr(), tmp_path, idx, ref, "--all-platforms")

    resp = get_manifest(registry.url, repo, "v1")
    assert resp.status == 200
    assert resp.body == idx.index
    assert resp.header("Content-Type") == OCI_INDEX

    puller = new_ctr()
    puller("images", "pull", "--plain-http", "--all-platforms", ref)
    assert puller.image_digest(ref) == idx.digest
    expected = {**idx.blobs(), **idx.manifests()}
    assert puller.content_digests() == set(expected)
    for digest, data in expected.items():
        assert puller.content(digest) == data, f"{digest} differs after the round trip"


def test_pull_one_platform_of_index(
    registry: RegistryServer, new_ctr: Callable[[], Ctr], repo: str, tmp_path: Path
) -> None:
    """A single-platform pull fetches that child's blobs and nothing of the other."""
    idx = make_index("ctr-one-platform", (60 * 1024,))
    ref = f"{registry.host}/{repo}:v1"
    push_from_archive(new_ctr(), tmp_path, idx, ref, "--all-platforms")

    puller = new_ctr()
    puller("images", "pull", "--plain-http", "--platform", "linux/arm64", ref)
    arm64 = idx.image_for("arm64")
    assert puller.content_digests() == {idx.digest, *arm64.manifests(), *arm64.blobs()}
    assert sha256(puller.content(arm64.config_digest)) == arm64.config_digest


def test_push_pull_single_manifest(
    registry: RegistryServer, new_ctr: Callable[[], Ctr], repo: str, tmp_path: Path
) -> None:
    """A plain image manifest (no index), pulled back by tag and by digest. containerd
    pushes each blob as one PUT with a Content-Length: the 3 MiB layer is read past
    aiohttp (`sockbody`)."""
    img = make_image("ctr-image", (220 * 1024, 3 * 1024 * 1024, 10 * 1024))
    ref = f"{registry.host}/{repo}:v1"
    push_from_archive(new_ctr(), tmp_path, img, ref)
    assert sha256(get_manifest(registry.url, repo, "v1").body) == img.manifest_digest

    by_tag = new_ctr()
    by_tag("images", "pull", "--plain-http", ref)
    assert by_tag.image_digest(ref) == img.manifest_digest
    assert by_tag.content_digests() == {img.manifest_digest, *img.blobs()}
    by_tag.remove_all_images()

    by_digest = new_ctr()
    digest_ref = f"{registry.host}/{repo}@{img.manifest_digest}"
    by_digest("images", "pull", "--plain-http", digest_ref)
    assert by_digest.image_digest(digest_ref) == img.manifest_digest
