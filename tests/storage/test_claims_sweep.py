"""gc removes the blob claims of replicas that died mid-fetch, and only those.

A live holder rewrites its claim every `CLAIM_RENEW` seconds; one not rewritten for
`CLAIM_LITTER_AGE` (shortened here to a second) was left behind. On disk and on S3.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from regproxy.storage import gc as gc_mod
from regproxy.storage import replicas as replicas_mod
from regproxy.storage import stores
from regproxy.storage.store import Store
from tests.support.digests import sha256
from tests.support.inprocess import make_config
from tests.support.s3store import s3_config
from tests.support.seaweed import SeaweedS3

LITTER_AGE = 1.0


@pytest.fixture(params=["fs", "s3"])
def proxy_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "fs":
        config = make_config(tmp_path)
    else:
        seaweed: SeaweedS3 = request.getfixturevalue("seaweed")
        config = s3_config(seaweed, request.getfixturevalue("s3_bucket"), tmp_path)
    return stores.open_store(config.proxy_storage, config.s3)


def _claim(store: Store, data: bytes) -> Path:
    digest = sha256(data).removeprefix("sha256:")
    path = store.layout.root / replicas_mod.CLAIMS / "sha256" / digest
    store.backend.write_atomic(path, b'{"replica":"0badf00d","expires":1}')
    return path


def test_gc_sweeps_claims_left_by_dead_replicas(
    proxy_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replicas_mod, "CLAIM_LITTER_AGE", LITTER_AGE)
    store = proxy_store
    left = _claim(store, b"a blob nobody pulled again")
    # older than the litter age, past an object store's whole-second clock too
    time.sleep(LITTER_AGE + gc_mod.clock_slack(store) + 0.3)
    renewed = _claim(store, b"a blob a live replica fetches")

    report = gc_mod.collect(store, grace=0.0, dry_run=True, label="proxy")
    assert report.temp_files_removed == 1
    assert store.backend.exists(left)
    report = gc_mod.collect(store, grace=0.0, label="proxy")
    assert report.temp_files_removed == 1
    assert not store.backend.exists(left)
    assert store.backend.exists(renewed)
