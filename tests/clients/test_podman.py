"""podman (rootful, private vfs storage) pushing to and pulling from the registry.

podman stores layers uncompressed and recompresses on push, so the pushed manifest is not
the generated one; what must survive is the image ID (config digest), the diff_ids, and
the manifest digest podman reports for its push, which a pull must resolve to again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.digests import sha256
from tests.support.images import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    Image,
    make_image,
    make_index,
    write_oci_layout,
)
from tests.support.podman import Podman
from tests.support.processes import RegistryServer
from tests.support.registry_http import get_manifest
from tests.support.skopeo import Skopeo


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Image, Path]:
    img = make_image("podman-image", (512 * 1024, 128 * 1024))
    return img, write_oci_layout(tmp_path_factory.mktemp("layout") / "image", img, "v1")


@pytest.mark.parametrize(("fmt", "media_type"), [("oci", OCI_MANIFEST), ("v2s2", DOCKER_MANIFEST)])
def test_push_pull_roundtrip(
    registry: RegistryServer,
    podman: Podman,
    repo: str,
    image: tuple[Image, Path],
    fmt: str,
    media_type: str,
) -> None:
    """Push in OCI and in Docker schema 2 format, then pull into empty storage."""
    img, layout = image
    podman.pull(f"oci:{layout}:v1")
    ref = f"{registry.host}/{repo}:v1"

    pushed = podman.push(img.image_id, f"docker://{ref}", "--format", fmt)

    resp = get_manifest(registry.url, repo, "v1")
    assert resp.status == 200
    assert sha256(resp.body) == pushed
    assert resp.header("Docker-Content-Digest") == pushed
    assert resp.header("Content-Type") == media_type

    podman("rmi", "--all", "--force")
    assert podman.pull(ref) == img.image_id.removeprefix("sha256:")
    info = podman.image_inspect(ref)
    assert info["Id"] == img.image_id.removeprefix("sha256:")
    assert info["Digest"] == pushed
    assert f"{registry.host}/{repo}@{pushed}" in info["RepoDigests"]
    assert info["RootFS"]["Layers"] == img.diff_ids

    # Pulling by digest resolves to the same image.
    podman("rmi", "--all", "--force")
    assert podman.pull(f"{registry.host}/{repo}@{pushed}") == img.image_id.removeprefix("sha256:")


def test_pull_platform_from_index(
    registry: RegistryServer, podman: Podman, skopeo: Skopeo, repo: str, tmp_path: Path
) -> None:
    """podman resolves a multi-arch index to the child for the requested platform."""
    idx = make_index("podman-index", (96 * 1024,))
    layout = write_oci_layout(tmp_path / "index", idx, "v1")
    ref = f"{registry.host}/{repo}:v1"
    skopeo.copy(f"oci:{layout}:v1", f"docker://{ref}", "--all", "--preserve-digests")

    for arch in ("amd64", "arm64"):
        child = idx.image_for(arch)
        image_id = podman.pull(ref, "--platform", f"linux/{arch}")
        assert image_id == child.image_id.removeprefix("sha256:")
        info = podman.image_inspect(image_id)
        assert info["Architecture"] == arch
        assert info["RootFS"]["Layers"] == child.diff_ids
