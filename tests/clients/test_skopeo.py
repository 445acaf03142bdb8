"""skopeo against the registry: the containers/image push and pull code paths.

skopeo is the most literal client: with ``--preserve-digests`` it sends manifests byte for
byte, so these tests can demand that every digest survives the round trip.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.digests import sha256
from tests.support.images import (
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    ImageIndex,
    layout_blob,
    make_image,
    make_index,
    read_oci_layout,
    write_oci_layout,
)
from tests.support.processes import RegistryServer
from tests.support.registry_http import get_manifest, request
from tests.support.skopeo import Skopeo


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Image, Path]:
    """A three-layer amd64 image in an OCI layout, tag ``v1``. skopeo sends each layer as
    one PATCH with a Content-Length: the 3 MiB one is read past aiohttp (`sockbody`)."""
    img = make_image("skopeo-image", (300 * 1024, 3 * 1024 * 1024, 20 * 1024))
    return img, write_oci_layout(tmp_path_factory.mktemp("layout") / "image", img, "v1")


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageIndex, Path]:
    """An amd64+arm64 index whose children share a base layer, tag ``v1``."""
    idx = make_index("skopeo-index", (200 * 1024, 64 * 1024))
    return idx, write_oci_layout(tmp_path_factory.mktemp("layout") / "index", idx, "v1")


def assert_layout_holds(layout: Path, content: Image | ImageIndex) -> None:
    """Every manifest and blob of ``content`` is in ``layout``, byte for byte."""
    for digest, data in {**content.blobs(), **content.manifests()}.items():
        stored = layout_blob(layout, digest)
        assert sha256(stored) == digest
        assert stored == data, f"{digest} differs after the round trip"


def test_copy_roundtrip_preserves_digests(
    registry: RegistryServer,
    skopeo: Skopeo,
    repo: str,
    image: tuple[Image, Path],
    tmp_path: Path,
) -> None:
    img, layout = image
    ref = f"docker://{registry.host}/{repo}:v1"
    skopeo.copy(f"oci:{layout}:v1", ref, "--preserve-digests")

    assert skopeo.inspect_raw_digest(ref) == img.manifest_digest

    out = tmp_path / "out"
    skopeo.copy(ref, f"oci:{out}:v1", "--preserve-digests")
    desc = read_oci_layout(out, "v1")
    assert desc["digest"] == img.manifest_digest
    assert desc["mediaType"] == OCI_MANIFEST
    manifest = json.loads(layout_blob(out, desc["digest"]))
    assert [layer["digest"] for layer in manifest["layers"]] == img.layer_digests
    assert manifest["config"]["digest"] == img.config_digest
    assert_layout_holds(out, img)


def test_copy_all_multiarch_index(
    registry: RegistryServer,
    skopeo: Skopeo,
    repo: str,
    index: tuple[ImageIndex, Path],
    tmp_path: Path,
) -> None:
    idx, layout = index
    ref = f"docker://{registry.host}/{repo}:v1"
    skopeo.copy(f"oci:{layout}:v1", ref, "--all", "--preserve-digests")

    assert skopeo.inspect_raw(ref) == idx.index
    for child in idx.images:
        child_ref = f"docker://{registry.host}/{repo}@{child.manifest_digest}"
        assert skopeo.inspect_raw(child_ref) == child.manifest

    resp = get_manifest(registry.url, repo, "v1")
    assert resp.status == 200
    assert resp.header("Content-Type") == OCI_INDEX
    assert resp.header("Docker-Content-Digest") == idx.digest

    out = tmp_path / "out"
    skopeo.copy(ref, f"oci:{out}:v1", "--all", "--preserve-digests")
    assert read_oci_layout(out, "v1")["digest"] == idx.digest
    assert_layout_holds(out, idx)


def test_copy_single_platform_from_index(
    registry: RegistryServer,
    skopeo: Skopeo,
    repo: str,
    index: tuple[ImageIndex, Path],
    tmp_path: Path,
) -> None:
    """Without ``--all`` skopeo resolves the index to one child: the client picks by the
    index the registry serves, then fetches the child by digest."""
    idx, layout = index
    ref = f"docker://{registry.host}/{repo}:v1"
    skopeo.copy(f"oci:{layout}:v1", ref, "--all", "--preserve-digests")

    out = tmp_path / "arm64"
    skopeo(
        "--override-arch",
        "arm64",
        "--override-os",
        "linux",
        "copy",
        "--src-tls-verify=false",
        ref,
        f"oci:{out}:v1",
    )
    arm64 = idx.image_for("arm64")
    assert read_oci_layout(out, "v1")["digest"] == arm64.manifest_digest
    assert_layout_holds(out, arm64)


def test_inspect(
    registry: RegistryServer, skopeo: Skopeo, repo: str, image: tuple[Image, Path]
) -> None:
    img, layout = image
    ref = f"docker://{registry.host}/{repo}:v1"
    skopeo.copy(f"oci:{layout}:v1", ref, "--preserve-digests")

    info = skopeo.inspect(ref)
    assert info["Digest"] == img.manifest_digest
    assert info["Layers"] == img.layer_digests
    assert info["Architecture"] == "amd64"
    assert info["Os"] == "linux"
    assert info["Labels"] == {"org.regproxy.test.seed": "skopeo-image"}
    # --config --raw reads the config blob itself.
    config = skopeo("inspect", "--tls-verify=false", "--config", "--raw", ref).stdout
    assert sha256(config.encode()) == img.config_digest


def test_list_tags(
    registry: RegistryServer, skopeo: Skopeo, repo: str, image: tuple[Image, Path]
) -> None:
    """Several tags of one image: the later pushes find every blob already present."""
    _, layout = image
    tags = ["v1", "v1.0.1", "latest", "Release_2"]
    for tag in tags:
        skopeo.copy(f"oci:{layout}:v1", f"docker://{registry.host}/{repo}:{tag}")
    assert sorted(skopeo.list_tags(f"docker://{registry.host}/{repo}")) == sorted(tags)


def test_copy_between_repositories(
    registry: RegistryServer, skopeo: Skopeo, repo: str, image: tuple[Image, Path]
) -> None:
    """Registry-to-registry copy; skopeo may cross-repository-mount the blobs."""
    img, layout = image
    src = f"docker://{registry.host}/{repo}/src:v1"
    dest = f"docker://{registry.host}/{repo}/dest:v2"
    skopeo.copy(f"oci:{layout}:v1", src, "--preserve-digests")
    skopeo.copy(src, dest, "--preserve-digests")
    assert skopeo.inspect_raw_digest(dest) == img.manifest_digest
    for digest in img.blobs():
        resp = request(f"{registry.url}/v2/{repo}/dest/blobs/{digest}", method="HEAD")
        assert resp.status == 200, f"{digest} missing in the destination repository"


def test_delete(
    registry: RegistryServer, skopeo: Skopeo, repo: str, image: tuple[Image, Path]
) -> None:
    img, layout = image
    ref = f"docker://{registry.host}/{repo}:v1"
    skopeo.copy(f"oci:{layout}:v1", ref, "--preserve-digests")
    assert get_manifest(registry.url, repo, img.manifest_digest).status == 200

    skopeo.delete(ref)

    assert get_manifest(registry.url, repo, img.manifest_digest).status == 404
    assert get_manifest(registry.url, repo, "v1").status == 404
    result = skopeo("inspect", "--tls-verify=false", "--raw", ref, check=False)
    assert result.returncode != 0
    assert "manifest unknown" in result.stderr.lower(), result.stderr
