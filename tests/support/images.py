"""Deterministic, network-free generation of container images for client tests.

Real clients (skopeo, podman, docker, ctr) need real images, and tests may not pull any from
the internet. Everything here is built in memory from a seed, so the same seed always gives
byte-identical blobs and manifests, and a test can compare the digests a client reports
against the digests it generated.

Layers are valid gzip-compressed tars holding one file of random bytes, so container engines
can unpack them; configs carry correct ``rootfs.diff_ids`` (sha256 of each uncompressed tar),
which docker, podman and containerd verify on unpack.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .digests import sha256

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"

# A fixed timestamp: tar mtimes and config "created" must not depend on the clock.
_EPOCH = 1_700_000_000
_CREATED = "2023-11-14T22:13:20Z"

DEFAULT_LAYER_SIZES: tuple[int, ...] = (256 * 1024, 1024 * 1024, 64 * 1024)
DEFAULT_PLATFORMS: tuple[tuple[str, str], ...] = (("linux", "amd64"), ("linux", "arm64"))


def canonical_json(obj: Any) -> bytes:
    """Serialise JSON deterministically, so a given seed always yields the same digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    platform: dict[str, str] | None = None
    annotations: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.platform:
            out["platform"] = dict(self.platform)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class Layer:
    """One image layer: the uncompressed tar and its gzip blob."""

    tar: bytes
    blob: bytes

    @property
    def digest(self) -> str:
        """Digest of the compressed blob, as referenced by manifests."""
        return sha256(self.blob)

    @property
    def diff_id(self) -> str:
        """Digest of the uncompressed tar, as listed in the config's ``rootfs.diff_ids``."""
        return sha256(self.tar)

    @property
    def size(self) -> int:
        return len(self.blob)

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(OCI_LAYER_GZIP, self.digest, self.size)


@dataclass(frozen=True)
class Image:
    """A single-platform OCI image: config, layers and the manifest that ties them."""

    config: bytes
    manifest: bytes
    layers: tuple[Layer, ...]
    os: str = "linux"
    architecture: str = "amd64"

    @property
    def config_digest(self) -> str:
        return sha256(self.config)

    @property
    def image_id(self) -> str:
        """What docker and podman call the image ID: the config digest."""
        return self.config_digest

    @property
    def manifest_digest(self) -> str:
        return sha256(self.manifest)

    @property
    def layer_digests(self) -> list[str]:
        return [layer.digest for layer in self.layers]

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]

    @property
    def platform(self) -> dict[str, str]:
        return {"os": self.os, "architecture": self.architecture}

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(OCI_MANIFEST, self.manifest_digest, len(self.manifest), self.platform)

    @property
    def top_digest(self) -> str:
        """Digest a client reports for the pushed reference (here: the manifest's)."""
        return self.manifest_digest

    @property
    def top_bytes(self) -> bytes:
        return self.manifest

    @property
    def top_descriptor(self) -> Descriptor:
        return Descriptor(OCI_MANIFEST, self.manifest_digest, len(self.manifest))

    def blobs(self) -> dict[str, bytes]:
        """Every blob (config and layers) by digest; manifests are not blobs here."""
        out = {self.config_digest: self.config}
        out.update((layer.digest, layer.blob) for layer in self.layers)
        return out

    def manifests(self) -> dict[str, bytes]:
        return {self.manifest_digest: self.manifest}


@dataclass(frozen=True)
class ImageIndex:
    """A multi-platform OCI image index and its child images."""

    index: bytes
    images: tuple[Image, ...] = field(default_factory=tuple)

    @property
    def digest(self) -> str:
        return sha256(self.index)

    @property
    def top_digest(self) -> str:
        return self.digest

    @property
    def top_bytes(self) -> bytes:
        return self.index

    @property
    def top_descriptor(self) -> Descriptor:
        return Descriptor(OCI_INDEX, self.digest, len(self.index))

    def image_for(self, architecture: str, os: str = "linux") -> Image:
        for image in self.images:
            if image.architecture == architecture and image.os == os:
                return image
        raise KeyError(f"{os}/{architecture}")

    def blobs(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for image in self.images:
            out.update(image.blobs())
        return out

    def manifests(self) -> dict[str, bytes]:
        out = {self.digest: self.index}
        for image in self.images:
            out.update(image.manifests())
        return out


def _rng(seed: int | str, *parts: object) -> random.Random:
    # random.Random seeded with a str hashes it with sha512: stable across processes,
    # unlike hash(), which PYTHONHASHSEED randomises.
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def _tar_bytes(entries: Iterable[tuple[str, bytes | None]]) -> bytes:
    """Build a deterministic ustar archive; an entry with ``None`` content is a directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            info.mtime = _EPOCH
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if content is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.mode = 0o644
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def make_layer(seed: int | str, index: int, size: int) -> Layer:
    """Create a gzip tar layer holding ``size`` random bytes in one file.

    The file name includes seed and index, so layers of different images never collide
    when an engine stacks them.
    """
    payload = _rng(seed, "layer", index).randbytes(size)
    safe = str(seed).replace("/", "_")
    tar = _tar_bytes(
        [
            ("regproxy-test/", None),
            (f"regproxy-test/{safe}-{index}.bin", payload),
        ]
    )
    # Random data does not compress: level 1 is as good as 9 and much faster.
    blob = gzip.compress(tar, compresslevel=1, mtime=0)
    return Layer(tar=tar, blob=blob)


def make_image(
    seed: int | str,
    layer_sizes: Sequence[int] = DEFAULT_LAYER_SIZES,
    *,
    os: str = "linux",
    architecture: str = "amd64",
    base_layers: Sequence[Layer] = (),
    annotations: dict[str, str] | None = None,
) -> Image:
    """Build a single-platform OCI image.

    ``base_layers`` are placed below the generated layers, so several images (e.g. the
    children of an index) can share blobs, as real images sharing a base do.
    """
    layers = (
        *base_layers,
        *(make_layer(f"{seed}-{architecture}", i, size) for i, size in enumerate(layer_sizes)),
    )
    config_obj = {
        "architecture": architecture,
        "os": os,
        "created": _CREATED,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Labels": {"org.regproxy.test.seed": str(seed)},
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [
            {"created": _CREATED, "created_by": f"regproxy test layer {i}"}
            for i in range(len(layers))
        ],
    }
    config = canonical_json(config_obj)
    manifest_obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": Descriptor(OCI_CONFIG, sha256(config), len(config)).to_json(),
        "layers": [layer.descriptor.to_json() for layer in layers],
    }
    if annotations:
        manifest_obj["annotations"] = dict(annotations)
    return Image(
        config=config,
        manifest=canonical_json(manifest_obj),
        layers=layers,
        os=os,
        architecture=architecture,
    )


def make_index(
    seed: int | str,
    layer_sizes: Sequence[int] = DEFAULT_LAYER_SIZES,
    *,
    platforms: Sequence[tuple[str, str]] = DEFAULT_PLATFORMS,
    shared_base_size: int | None = 128 * 1024,
) -> ImageIndex:
    """Build a multi-platform OCI index, one child image per ``(os, architecture)``.

    With ``shared_base_size`` every child starts with the same base layer, so pushing the
    index exercises the "blob already exists" path for the second and later children.
    """
    base = (make_layer(f"{seed}-base", 0, shared_base_size),) if shared_base_size else ()
    images = tuple(
        make_image(seed, layer_sizes, os=os_, architecture=arch, base_layers=base)
        for os_, arch in platforms
    )
    index_obj = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [image.descriptor.to_json() for image in images],
    }
    return ImageIndex(index=canonical_json(index_obj), images=images)


def _layout_files(content: Image | ImageIndex, tag: str, name: str | None) -> dict[str, bytes]:
    """Map relative path -> bytes for an OCI image layout holding ``content``."""
    annotations = {REF_NAME_ANNOTATION: tag}
    if name is not None:
        annotations[CONTAINERD_NAME_ANNOTATION] = f"{name}:{tag}"
    top = content.top_descriptor
    top = Descriptor(top.media_type, top.digest, top.size, annotations=annotations)
    index_json = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top.to_json()]}
    files = {
        "oci-layout": canonical_json({"imageLayoutVersion": "1.0.0"}),
        "index.json": canonical_json(index_json),
    }
    for digest, data in {**content.blobs(), **content.manifests()}.items():
        algo, hexdigest = digest.split(":", 1)
        files[f"blobs/{algo}/{hexdigest}"] = data
    return files


def write_oci_layout(
    dest: Path, content: Image | ImageIndex, tag: str = "latest", *, name: str | None = None
) -> Path:
    """Write an OCI image layout directory, usable as skopeo/podman ``oci:DEST:TAG``.

    ``name`` (e.g. ``"example.test/repo"``) additionally records a full image name, which
    ``ctr images import`` uses to name the imported image.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for rel, data in _layout_files(content, tag, name).items():
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return dest


def _write_tar(dest: Path, files: dict[str, bytes]) -> Path:
    dirs = sorted({str(Path(rel).parent) for rel in files} - {"."})
    entries: list[tuple[str, bytes | None]] = [(d + "/", None) for d in dirs]
    entries += sorted(files.items())
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(_tar_bytes(entries))
    return dest


def write_oci_archive(
    dest: Path, content: Image | ImageIndex, tag: str = "latest", *, name: str | None = None
) -> Path:
    """Write an OCI layout as a tar file (``oci-archive:`` / ``ctr images import``)."""
    return _write_tar(dest, _layout_files(content, tag, name))


def write_docker_archive(dest: Path, image: Image, repo_tags: Sequence[str] = ()) -> Path:
    """Write a ``docker save``-format tarball, so ``docker load`` can import ``image``.

    Layers are stored uncompressed, as ``docker save`` does; docker keys them by diff_id
    and recompresses on push, so after a push only the config digest (the image ID) and
    the diff_ids survive unchanged - the layer and manifest digests do not.
    """
    config_name = image.config_digest.split(":", 1)[1] + ".json"
    layer_names = [layer.diff_id.split(":", 1)[1] + "/layer.tar" for layer in image.layers]
    manifest = [{"Config": config_name, "RepoTags": list(repo_tags), "Layers": layer_names}]
    files = {"manifest.json": canonical_json(manifest), config_name: image.config}
    files.update(zip(layer_names, (layer.tar for layer in image.layers), strict=True))
    return _write_tar(dest, files)


def read_oci_layout(path: Path, tag: str = "latest") -> dict[str, Any]:
    """Return the ``index.json`` descriptor that ``tag`` names in an OCI layout.

    For checking what a client wrote (e.g. ``skopeo copy docker://... oci:DIR:TAG``).
    """
    index = json.loads((path / "index.json").read_bytes())
    for desc in index.get("manifests", []):
        if desc.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag:
            found: dict[str, Any] = desc
            return found
    raise KeyError(f"no {tag!r} in {path / 'index.json'}: {index}")


def layout_blob(path: Path, digest: str) -> bytes:
    """Bytes of a blob (or manifest) stored in an OCI layout."""
    algo, hexdigest = digest.split(":", 1)
    return (path / "blobs" / algo / hexdigest).read_bytes()
