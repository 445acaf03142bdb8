"""Parse Docker v2 and OCI manifests and indexes into what the registry needs.

The registry never rewrites a manifest: it keeps the exact bytes and uses this
parse only to learn the media type, the blobs and child manifests it
references (which must exist before it is accepted) and its `subject`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from regproxy.digest import Digest
from regproxy.errors import DigestInvalid, ManifestInvalid, ManifestTooLarge

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
#: Manifests up to this size are hashed and parsed on the event loop (microseconds);
#: larger ones on the storage threads.
INLINE_LIMIT = 64 * 1024
#: What a manifest may cost to parse, counted on the bytes before any object is built:
#: JSON objects and arrays, and elements. A 4 MiB index of real descriptors stays far
#: below both; `[{},{},…]` or `[1,1,…]` of the same size would build millions of objects.
MAX_JSON_CONTAINERS = 100_000
MAX_JSON_ELEMENTS = 200_000
#: Descriptor sizes are int64 on every client (Go's `int64`, Java's `long`).
MAX_DESCRIPTOR_SIZE = 2**63 - 1

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
INDEX_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
IMAGE_TYPES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
MANIFEST_TYPES = INDEX_TYPES | IMAGE_TYPES
#: What the proxy sends upstream, and what we accept on PUT without a body hint.
ACCEPT_ALL = ", ".join(sorted(MANIFEST_TYPES))
#: Foreign layers live elsewhere (Windows base layers); they are never required locally.
FOREIGN_LAYER_TYPES = frozenset(
    {
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    }
)


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: dict[str, Any] | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.platform:
            out["platform"] = self.platform
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True, slots=True)
class Manifest:
    media_type: str
    blobs: tuple[Descriptor, ...] = ()  # config + layers that must exist in the repo
    children: tuple[Descriptor, ...] = ()  # manifests of an index
    subject: Descriptor | None = None
    artifact_type: str | None = None
    config_media_type: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def referrer_artifact_type(self) -> str | None:
        """The artifactType a referrers listing shows: explicit, else the config's type."""
        return self.artifact_type or self.config_media_type


def _descriptor(raw: Any, where: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise ManifestInvalid(f"{where} is not a descriptor object")
    media_type = raw.get("mediaType")
    size = raw.get("size")
    digest = raw.get("digest")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestInvalid(f"{where}.mediaType is missing")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_DESCRIPTOR_SIZE:
        raise ManifestInvalid(f"{where}.size is not a non-negative 64-bit integer")
    if not isinstance(digest, str):
        raise ManifestInvalid(f"{where}.digest is missing")
    try:
        parsed = Digest.parse(digest)
    except DigestInvalid as exc:
        raise ManifestInvalid(f"{where}.digest: {exc.message}") from None
    platform = raw.get("platform")
    annotations = raw.get("annotations")
    artifact_type = raw.get("artifactType")
    return Descriptor(
        media_type,
        parsed,
        size,
        platform if isinstance(platform, dict) else None,
        artifact_type if isinstance(artifact_type, str) else None,
        annotations if isinstance(annotations, dict) else None,
    )


def detect_media_type(doc: dict[str, Any], content_type: str | None) -> str:
    """The manifest's media type: its own field, the Content-Type, or its shape."""
    declared = doc.get("mediaType")
    header = (content_type or "").split(";", 1)[0].strip().lower() or None
    if header in ("application/json", "application/octet-stream", "*/*"):
        header = None
    if declared is not None and not isinstance(declared, str):
        raise ManifestInvalid("mediaType is not a string")
    if declared and header and declared != header:
        raise ManifestInvalid(
            f"Content-Type {header!r} does not match the manifest's mediaType {declared!r}"
        )
    media_type = declared or header
    if media_type is None:
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if media_type not in MANIFEST_TYPES:
        raise ManifestInvalid(f"unsupported manifest media type {media_type!r}")
    return media_type


def _no_constants(name: str) -> Any:
    """NaN and ±Infinity are not JSON (RFC 8259); Go and Java clients refuse to parse them."""
    raise ValueError(f"{name} is not a JSON number")


def parse(data: bytes, content_type: str | None = None) -> Manifest:
    """Parse and validate manifest bytes; raise `ManifestInvalid` with a reason."""
    if len(data) > MAX_MANIFEST_SIZE:
        raise ManifestTooLarge(f"manifest is larger than {MAX_MANIFEST_SIZE} bytes")
    containers = data.count(b"{") + data.count(b"[")
    if containers > MAX_JSON_CONTAINERS or data.count(b",") > MAX_JSON_ELEMENTS:
        raise ManifestInvalid("manifest has more JSON objects or elements than any image needs")
    try:
        doc = json.loads(data, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestInvalid(f"manifest is not valid JSON: {exc}") from None
    except RecursionError:
        raise ManifestInvalid("manifest JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid("manifest is not a JSON object")
    if doc.get("schemaVersion") != 2:
        raise ManifestInvalid("only schemaVersion 2 manifests are supported")
    media_type = detect_media_type(doc, content_type)
    subject = _descriptor(doc["subject"], "subject") if doc.get("subject") is not None else None
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise ManifestInvalid("artifactType is not a string")
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ManifestInvalid("annotations is not an object")

    if media_type in INDEX_TYPES:
        raw_children = doc.get("manifests")
        if not isinstance(raw_children, list):
            raise ManifestInvalid("an index needs a manifests list")
        children = tuple(
            _descriptor(item, f"manifests[{i}]") for i, item in enumerate(raw_children)
        )
        return Manifest(
            media_type,
            children=children,
            subject=subject,
            artifact_type=artifact_type,
            annotations=annotations,
        )

    if "config" not in doc:
        raise ManifestInvalid("an image manifest needs a config descriptor")
    config = _descriptor(doc["config"], "config")
    raw_layers = doc.get("layers", [])
    if not isinstance(raw_layers, list):
        raise ManifestInvalid("layers is not a list")
    layers = tuple(_descriptor(item, f"layers[{i}]") for i, item in enumerate(raw_layers))
    required = (config, *(d for d in layers if d.media_type not in FOREIGN_LAYER_TYPES))
    return Manifest(
        media_type,
        blobs=required,
        subject=subject,
        artifact_type=artifact_type,
        config_media_type=config.media_type,
        annotations=annotations,
    )


def walk(
    root: Digest,
    load: Callable[[Digest], Manifest | None],
    seen: set[Digest] | None = None,
    also: Callable[[Digest], Iterable[Digest]] | None = None,
) -> Iterator[tuple[Digest, Manifest | None]]:
    """Every manifest reachable from `root` through index children, each once, with its
    parse (None: missing or unreadable, walked as a leaf); gc, inventory and verify each
    read what they need (its `blobs`: config and layers) from what this yields.

    `load` says how a digest becomes a manifest (a store read, a scan's cache); `also`
    adds edges the bytes do not hold (gc: the referrers whose `subject` is a kept
    manifest); `seen` carries the visited digests across walks (gc marks many roots).
    """
    visited: set[Digest] = set() if seen is None else seen
    stack = [root]
    while stack:
        digest = stack.pop()
        if digest in visited:
            continue
        visited.add(digest)
        manifest = load(digest)
        yield digest, manifest
        if manifest is not None:
            stack.extend(d.digest for d in manifest.children)
        if also is not None:
            stack.extend(also(digest))
