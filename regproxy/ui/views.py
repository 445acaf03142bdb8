"""What the repository and image pages show, read from one repository of one store.

Blocking: the page handlers run these on the storage pool (`Offload.run`), one
repository per view, never the whole store. Manifests come through the store's
own manifest cache; image configs through `ConfigCache` here (content addressed,
so an entry never goes stale). Everything a config or manifest says is untrusted:
values of the wrong JSON type are dropped, and the templates escape the rest.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from regproxy import manifest as mf
from regproxy.digest import Digest
from regproxy.errors import RegistryError
from regproxy.storage.inventory import CONFIG_TYPES
from regproxy.storage.store import Store

#: rows a repository page lists at most (a note says when there were more)
MAX_ROWS = 1000
#: image configs larger than this are not read for display
MAX_CONFIG = 4 * 1024 * 1024
#: history entries, labels, environment values and ports shown at most
MAX_ITEMS = 500

KIND_NAMES = {
    mf.OCI_INDEX: "OCI index",
    mf.DOCKER_MANIFEST_LIST: "Docker manifest list",
    mf.OCI_MANIFEST: "OCI manifest",
    mf.DOCKER_MANIFEST: "Docker manifest",
}


def short_type(media_type: str | None) -> str:
    if media_type is None:
        return "unknown"
    return KIND_NAMES.get(media_type, media_type)


class ConfigCache:
    """Parsed image configs by digest (immutable content), bounded, shared by threads."""

    def __init__(self, entries: int = 4096) -> None:
        self._items: OrderedDict[str, dict[str, Any] | None] = OrderedDict()
        self._entries = entries
        self._lock = threading.Lock()

    def get(self, store: Store, digest: Digest, size: int) -> dict[str, Any] | None:
        key = str(digest)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        doc: dict[str, Any] | None = None
        if 0 <= size <= MAX_CONFIG:
            data = store.backend.read(store.blob_path(digest))
            try:
                parsed = json.loads(data) if data is not None else None
            except ValueError:
                parsed = None
            doc = parsed if isinstance(parsed, dict) else None
            if data is None:
                return None  # not (yet) in the store: ask again next time
        with self._lock:
            self._items[key] = doc
            while len(self._items) > self._entries:
                self._items.popitem(last=False)
        return doc


def platform_of(p: Any) -> str | None:
    if not isinstance(p, dict):
        return None
    os_, arch = p.get("os"), p.get("architecture")
    if not isinstance(os_, str) or not isinstance(arch, str) or os_ == "unknown":
        return None
    variant = p.get("variant")
    return f"{os_}/{arch}/{variant}" if isinstance(variant, str) and variant else f"{os_}/{arch}"


@dataclass
class Child:
    digest: str
    media_type: str
    platform: str | None
    size: int
    present: bool
    artifact: str | None = None


@dataclass
class Layer:
    digest: str
    media_type: str
    size: int
    present: bool


@dataclass
class Referrer:
    digest: str
    media_type: str
    artifact_type: str | None
    size: int
    created: str | None


@dataclass
class Facts:
    """One manifest as the pages describe it."""

    digest: str
    media_type: str
    data: bytes
    parsed: mf.Manifest
    #: manifest bytes plus every blob and child manifest it names (each once)
    size: int
    platforms: list[str]
    children: list[Child] = field(default_factory=list)
    artifact_type: str | None = None

    @property
    def is_index(self) -> bool:
        return self.parsed.is_index

    @property
    def kind(self) -> str:
        return short_type(self.media_type)


def _blobs_of(parsed: mf.Manifest, doc: dict[str, Any]) -> dict[str, int]:
    """Digest → size of the config and every layer a manifest names (foreign ones too)."""
    blobs = {str(d.digest): d.size for d in parsed.blobs}
    for raw in doc.get("layers") or []:
        if isinstance(raw, dict) and isinstance(raw.get("digest"), str):
            size = raw.get("size")
            blobs.setdefault(raw["digest"], size if isinstance(size, int) and size >= 0 else 0)
    return blobs


def _load(store: Store, name: str, digest: Digest) -> tuple[bytes, str, mf.Manifest] | None:
    try:
        stored = store.get_manifest(name, str(digest))
        return stored.data, stored.media_type, mf.parse(stored.data, stored.media_type)
    except RegistryError:
        return None


def _doc(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _is_artifact(parsed: mf.Manifest) -> bool:
    return bool(parsed.artifact_type) or parsed.config_media_type not in CONFIG_TYPES


def _image_size(data: bytes, parsed: mf.Manifest) -> int:
    return len(data) + sum(_blobs_of(parsed, _doc(data)).values())


def manifest_facts(store: Store, name: str, digest: Digest, configs: ConfigCache) -> Facts | None:
    """Facts of revision `digest` of `name`; None when it is not (or no longer) there."""
    loaded = _load(store, name, digest)
    if loaded is None:
        return None
    data, media_type, parsed = loaded
    if parsed.is_index:
        return _index_facts(store, name, digest, loaded)
    facts = Facts(str(digest), media_type, data, parsed, _image_size(data, parsed), [])
    if _is_artifact(parsed):
        facts.artifact_type = parsed.referrer_artifact_type()
    elif parsed.blobs:
        config = parsed.blobs[0]
        platform = platform_of(configs.get(store, config.digest, config.size))
        facts.platforms = [platform] if platform else []
    return facts


def _index_facts(
    store: Store, name: str, digest: Digest, loaded: tuple[bytes, str, mf.Manifest]
) -> Facts:
    data, media_type, parsed = loaded
    blobs: dict[str, int] = {}
    children: list[Child] = []
    total = len(data)
    for desc in parsed.children:
        child = _load(store, name, desc.digest)
        artifact: str | None = None
        size = desc.size
        if child is not None:
            child_data, _, child_parsed = child
            total += len(child_data)
            blobs.update(_blobs_of(child_parsed, _doc(child_data)))
            if not child_parsed.is_index:
                size = _image_size(child_data, child_parsed)
                if _is_artifact(child_parsed):
                    artifact = child_parsed.referrer_artifact_type()
        children.append(
            Child(
                str(desc.digest),
                desc.media_type,
                platform_of(desc.platform),
                size,
                child is not None,
                artifact,
            )
        )
    platforms = sorted({c.platform for c in children if c.platform and not c.artifact})
    facts = Facts(str(digest), media_type, data, parsed, total + sum(blobs.values()), platforms)
    facts.children = children
    facts.artifact_type = parsed.artifact_type
    return facts


def referrers_of(store: Store, name: str, digest: Digest) -> list[Referrer]:
    found = []
    for entry in store.referrers(name, digest):
        annotations = entry.get("annotations") or {}
        created = annotations.get("org.opencontainers.image.created")
        found.append(
            Referrer(
                str(entry.get("digest", "")),
                str(entry.get("mediaType", "")),
                entry.get("artifactType"),
                int(entry.get("size") or 0),
                created if isinstance(created, str) else None,
            )
        )
    return found


# ---- the repository page ------------------------------------------------------------------


@dataclass
class TagRow:
    tag: str
    digest: str
    updated: float | None
    facts: Facts | None


@dataclass
class ImageRow:
    facts: Facts
    pushed: float | None
    tags: list[str]
    referrers: list[Referrer]


@dataclass
class RepositoryView:
    name: str
    kind: str
    upstream: str | None
    tags: list[TagRow]
    images: list[ImageRow]
    last_pulled: float | None
    more_tags: int = 0
    more_images: int = 0


def repository_view(
    store: Store, store_name: str, name: str, kind: str, upstream: str | None,
    configs: ConfigCache,
) -> RepositoryView | None:  # fmt: skip
    """Tags and manifests of one repository; None when the store has no such repository."""
    if not store.repository_exists(store_name):
        return None
    facts: dict[str, Facts | None] = {}

    def facts_of(digest: Digest) -> Facts | None:
        key = str(digest)
        if key not in facts:
            facts[key] = manifest_facts(store, store_name, digest, configs)
        return facts[key]

    tag_names = store.tags(store_name, missing_ok=True)
    by_digest: dict[str, list[str]] = {}
    tags: list[TagRow] = []
    for tag in tag_names[:MAX_ROWS]:
        digest = store.tag_digest(store_name, tag)
        if digest is None:
            continue
        updated = store.backend.mtime(store.layout.tag(store_name, tag))
        tags.append(TagRow(tag, str(digest), updated, facts_of(digest)))
        by_digest.setdefault(str(digest), []).append(tag)
    tags.sort(key=lambda t: (-(t.updated or 0.0), t.tag))

    revisions = sorted(store.revisions(store_name), key=lambda r: -r[1])
    inside: set[str] = set()  # children of an index and referrers: shown under their parent
    rows: list[tuple[Facts, float]] = []
    for digest, pushed in revisions[:MAX_ROWS]:
        found = facts_of(digest)
        if found is None:
            continue
        rows.append((found, pushed))
        inside.update(c.digest for c in found.children)
        if found.parsed.subject is not None:
            inside.add(str(digest))
    images = [
        ImageRow(
            found,
            pushed,
            sorted(by_digest.get(found.digest, [])),
            referrers_of(store, store_name, Digest.parse(found.digest)),
        )
        for found, pushed in rows
        if found.digest not in inside
    ]
    last_pulled = store.backend.mtime(store.layout.pulled(store_name)) if upstream else None
    return RepositoryView(
        name,
        kind,
        upstream,
        tags,
        images,
        last_pulled,
        more_tags=max(0, len(tag_names) - MAX_ROWS),
        more_images=max(0, len(revisions) - MAX_ROWS),
    )


# ---- the image page -----------------------------------------------------------------------


@dataclass
class ConfigSummary:
    created: str | None = None
    author: str | None = None
    platform: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    workdir: str | None = None
    user: str | None = None
    stop_signal: str | None = None
    labels: list[tuple[str, str]] = field(default_factory=list)
    ports: list[str] = field(default_factory=list)
    env: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class HistoryRow:
    created: str | None
    created_by: str | None
    comment: str | None
    empty_layer: bool


@dataclass
class ImageView:
    name: str
    facts: Facts
    tags: list[str]
    referrers: list[Referrer]
    subject: str | None
    annotations: list[tuple[str, str]]
    config_digest: str | None = None
    config_media_type: str | None = None
    config: ConfigSummary | None = None
    layers: list[Layer] = field(default_factory=list)
    history: list[HistoryRow] = field(default_factory=list)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _strings(value: Any) -> list[str] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value[:MAX_ITEMS]
    return None


def _pairs(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, dict):
        return []
    return sorted((str(k), str(v)) for k, v in list(value.items())[:MAX_ITEMS])


def summarise_config(doc: dict[str, Any]) -> tuple[ConfigSummary, list[HistoryRow]]:
    inner = doc.get("config")
    inner = inner if isinstance(inner, dict) else {}
    ports = inner.get("ExposedPorts")
    ports = ports if isinstance(ports, dict) else {}
    env = []
    for item in _strings(inner.get("Env")) or []:
        key, _, value = item.partition("=")
        env.append((key, value))
    summary = ConfigSummary(
        created=_str(doc.get("created")),
        author=_str(doc.get("author")),
        platform=platform_of(doc),
        entrypoint=_strings(inner.get("Entrypoint")),
        cmd=_strings(inner.get("Cmd")),
        workdir=_str(inner.get("WorkingDir")) or None,
        user=_str(inner.get("User")) or None,
        stop_signal=_str(inner.get("StopSignal")),
        labels=_pairs(inner.get("Labels")),
        ports=sorted(str(port) for port in list(ports)[:MAX_ITEMS]),
        env=env,
    )
    history = []
    entries = doc.get("history")
    for entry in entries[:MAX_ITEMS] if isinstance(entries, list) else []:
        if isinstance(entry, dict):
            history.append(
                HistoryRow(
                    _str(entry.get("created")),
                    _without_env_values(_str(entry.get("created_by"))),
                    _str(entry.get("comment")),
                    entry.get("empty_layer") is True,
                )
            )
    return summary, history


def image_view(
    store: Store, store_name: str, name: str, digest: Digest, configs: ConfigCache
) -> ImageView | None:
    """One manifest of one repository; None when it is not a revision there."""
    if store.media_type(store_name, digest) is None:
        return None
    facts = manifest_facts(store, store_name, digest, configs)
    if facts is None:
        return None
    tags = [
        tag
        for tag in store.tags(store_name, missing_ok=True)[:MAX_ROWS]
        if store.tag_digest(store_name, tag) == digest
    ]
    parsed = facts.parsed
    view = ImageView(
        name,
        facts,
        tags,
        referrers_of(store, store_name, digest),
        str(parsed.subject.digest) if parsed.subject is not None else None,
        _pairs(parsed.annotations),
    )
    if parsed.is_index or not parsed.blobs:
        return view
    doc = _doc(facts.data)
    config = parsed.blobs[0]
    view.config_digest, view.config_media_type = str(config.digest), config.media_type
    for raw in doc.get("layers") or []:
        if not isinstance(raw, dict) or not isinstance(raw.get("digest"), str):
            continue
        size = raw.get("size")
        try:
            present = store.has_blob(Digest.parse(raw["digest"]))
        except RegistryError:
            present = False
        view.layers.append(
            Layer(
                raw["digest"],
                str(raw.get("mediaType", "")),
                size if isinstance(size, int) else 0,
                present,
            )
        )
    if config.media_type in CONFIG_TYPES:
        config_doc = configs.get(store, config.digest, config.size)
        if config_doc is not None:
            view.config, view.history = summarise_config(config_doc)
    return view


#: `ENV KEY=value …` as docker and buildkit write it into a config's history
_ENV_STEP = re.compile(r"^(?P<head>(?:/bin/sh -c #\(nop\)\s*)?ENV\s+)(?P<rest>.*)$", re.DOTALL)
_ENV_PAIR = re.compile(r"(?P<key>[A-Za-z_][A-Za-z0-9_]*)=(?:\"(?:[^\"\\]|\\.)*\"|\S*)")


def _without_env_values(created_by: str | None) -> str | None:
    """A history step that set environment variables shows their names, not their values:
    the Environment section hides values until expanded, and history must not leak them."""
    if not created_by:
        return created_by
    match = _ENV_STEP.match(created_by.strip())
    if match is None:
        return created_by
    head, rest = match.group("head"), match.group("rest")
    first = rest.split(maxsplit=1)[0] if rest.strip() else ""
    if first and "=" not in first:  # the old form, `ENV KEY value`
        return f"{head}{first} …"
    return head + _ENV_PAIR.sub(lambda m: f"{m.group('key')}=…", rest)
