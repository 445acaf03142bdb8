"""`proxy_max_size`: least-recently-pulled cached content goes; pushed content stays."""

from __future__ import annotations

import asyncio
import os

import pytest

from regproxy.server import app as server_app
from tests.support.fake_upstream import FakeUpstream
from tests.support.oci import make_image, push_image
from tests.support.proxy import ProxyFactory, assert_proxied, snapshot, wait_until

pytestmark = pytest.mark.timeout(40)

BLOB = 100 * 1024
BUDGET = 250 * 1024


async def test_lru_eviction_under_the_byte_budget(
    fake: FakeUpstream, make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the evictor rests between passes; shorten the rest when the knob exists (else just wait)
    monkeypatch.setattr(server_app, "EVICTION_INTERVAL", 0.2, raising=False)
    proxy = await make_proxy(proxy_max_size=BUDGET)
    pushed = make_image(layer_sizes=(400 * 1024,))  # alone bigger than the budget
    await push_image(proxy.client, "local/app", pushed, "v1")
    registry_before = snapshot(proxy.config.registry_storage)
    assert registry_before

    # one blob per repository, so per-blob and per-repository LRU agree
    blobs = {f"r{i}": os.urandom(BLOB) for i in range(1, 7)}
    digests = {repo: fake.add_blob(repo, data) for repo, data in blobs.items()}
    order: list[str] = []

    async def pull(repo: str) -> None:
        pulled = await proxy.blob(repo, digests[repo])
        assert_proxied(pulled)
        assert pulled.body == blobs[repo]
        if repo in order:
            order.remove(repo)
        order.append(repo)
        await asyncio.sleep(0.05)  # distinct access times

    for repo in ("r1", "r2", "r3", "r4", "r5"):
        await pull(repo)
    await pull("r1")  # r1 is now more recent than r2…r5
    await pull("r6")
    assert order == ["r2", "r3", "r4", "r5", "r1", "r6"]

    def within_budget() -> bool:
        return sum(proxy.cached_blobs().values()) <= BUDGET

    await wait_until(within_budget, timeout=25, interval=0.1, what="eviction under the budget")
    cached = proxy.cached_blobs()
    kept = [repo for repo in order if digests[repo] in cached]
    assert "r6" in kept, "the most recently pulled blob was evicted"
    assert kept == order[len(order) - len(kept) :], f"not LRU: kept {kept} of {order}"

    assert snapshot(proxy.config.registry_storage) == registry_before
    local = await proxy.get("/v2/local/app/manifests/v1", {"Accept": pushed.media_type})
    assert local.status == 200
    assert local.body == pushed.manifest

    # an evicted blob is simply fetched again
    evicted = order[0]
    again = await proxy.blob(evicted, digests[evicted])
    assert again.cache_status == "MISS"
    assert again.body == blobs[evicted]
    assert fake.count("GET", "blob", name=evicted) == 2
