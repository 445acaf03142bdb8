"""`storage.inventory`: what `ls` shows (sizes, unique vs shared bytes, platforms, times)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from aiohttp.test_utils import TestClient

from regproxy import manifest as mf
from regproxy.config import Config
from regproxy.digest import of_bytes
from regproxy.storage import stores
from regproxy.storage.inventory import LOCAL, PROXY, inventory
from regproxy.storage.store import Store
from tests.storage.helpers import push_index, put_blob
from tests.support.inprocess import start_client
from tests.support.oci import make_artifact, make_image, push_image
from tests.support.s3store import s3_config
from tests.support.seaweed import SeaweedS3


async def test_sizes_unique_and_shared(client: TestClient, config: Config) -> None:
    base = make_image(layer_sizes=(10_000,))
    await push_image(client, "one", base, "v1")
    await push_image(client, "two", base, "v1")  # the same image in a second repository
    extra = make_image(layer_sizes=(3000,))
    await push_image(client, "two", extra, "v2")
    found = inventory([(LOCAL, Store(config.registry_storage))])
    repos = {r.name: r for r in found.repositories}
    base_bytes = len(base.manifest) + len(base.config) + 10_000
    extra_bytes = len(extra.manifest) + len(extra.config) + 3000
    assert repos["one"].size == base_bytes
    assert (repos["one"].unique_size, repos["one"].shared_size) == (0, base_bytes)
    assert repos["two"].size == base_bytes + extra_bytes
    assert (repos["two"].unique_size, repos["two"].shared_size) == (extra_bytes, base_bytes)
    tags = {t.tag: t.digest for t in repos["two"].tags}
    assert tags == {"v1": base.digest, "v2": extra.digest}
    manifest = next(m for m in repos["two"].manifests if m.digest == extra.digest)
    assert manifest.size == extra_bytes and manifest.tags == ["v2"]
    assert manifest.platforms == ["linux/amd64"] and manifest.complete
    assert manifest.media_type == mf.OCI_MANIFEST
    assert repos["two"].updated is not None and time.time() - repos["two"].updated < 60
    (local,) = found.stores
    assert local.repositories == 2 and local.bytes == base_bytes + extra_bytes


async def test_index_platforms_and_artifacts(client: TestClient, config: Config) -> None:
    index, children = await push_index(client, "multi", "latest", n=3)
    sig = make_artifact("application/vnd.example.sig", subject=children[0])
    await push_image(client, "multi", sig, sig.digest)
    found = inventory([(LOCAL, Store(config.registry_storage))], name_prefix="mul")
    (repo,) = found.repositories
    by_digest = {m.digest: m for m in repo.manifests}
    assert by_digest[index.digest].platforms == ["linux/amd64", "linux/arm64", "linux/s390x"]
    child_bytes = sum(len(c.manifest) + sum(len(b) for b in c.blobs) for c in children)
    assert by_digest[index.digest].size == len(index.manifest) + child_bytes
    assert by_digest[sig.digest].artifact_type == "application/vnd.example.sig"
    assert by_digest[sig.digest].platforms == []
    assert inventory([(LOCAL, Store(config.registry_storage))], "nomatch").repositories == []


def test_cached_repository_names_and_times(config: Config) -> None:
    store = Store(config.proxy_storage)
    layer = os.urandom(2000)
    put_blob(store, "docker.io/library/alpine", layer)
    cfg = json.dumps({"os": "linux", "architecture": "arm64", "variant": "v8"}).encode()
    put_blob(store, "docker.io/library/alpine", cfg)
    missing = os.urandom(100)  # a layer never pulled: the cached image is partial
    doc = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": str(of_bytes(cfg)),
            "size": len(cfg),
        },
        "layers": [
            {"mediaType": "x", "digest": str(of_bytes(b)), "size": len(b)} for b in (layer, missing)
        ],
    }
    data = json.dumps(doc).encode()
    store.put_manifest(
        "docker.io/library/alpine",
        data,
        mf.parse(data),
        of_bytes(data),
        tag="3.20",
        check_references=False,
    )
    store.mark_pulled("docker.io/library/alpine")
    found = inventory([(PROXY, store)], proxy_prefix="p")
    (repo,) = found.repositories
    assert repo.name == "p/docker.io/library/alpine"
    assert (repo.kind, repo.upstream, repo.remote) == (PROXY, "docker.io", "library/alpine")
    assert repo.last_pulled is not None and repo.last_revalidated is not None
    (manifest,) = repo.manifests
    assert not manifest.complete
    assert manifest.platforms == ["linux/arm64/v8"]
    assert manifest.size == len(data) + len(cfg) + len(layer)


async def test_a_store_on_s3(seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path) -> None:
    """The same inventory from a bucket: sizes from the listing, times from the objects."""
    config = s3_config(seaweed, s3_bucket, tmp_path)
    client = await start_client(config)
    try:
        image = make_image(layer_sizes=(10_000,))
        await push_image(client, "team/app", image, "v1")
        _index, children = await push_index(client, "multi", "latest", n=2)
    finally:
        await client.close()
    found = inventory([(LOCAL, stores.open_store(config.registry_storage, config.s3))])
    repos = {r.name: r for r in found.repositories}
    assert set(repos) == {"team/app", "multi"}
    assert repos["team/app"].size == len(image.manifest) + len(image.config) + 10_000
    assert [(t.tag, t.digest) for t in repos["team/app"].tags] == [("v1", image.digest)]
    updated = repos["team/app"].tags[0].updated
    assert updated is not None and time.time() - updated < 60
    index = next(m for m in repos["multi"].manifests if m.tags == ["latest"])
    assert index.platforms == ["linux/amd64", "linux/arm64"] and index.complete
    assert {m.digest for m in repos["multi"].manifests} >= {c.digest for c in children}
