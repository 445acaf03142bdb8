"""Upload-session limits: a global cap beside the per-client one, and idle sessions aged out.

Before: only a per-address cap, so many addresses could open sessions without bound, and
sessions abandoned behind one reverse proxy (one address) locked all its clients out of
pushing until `upload_max_age` (24 h). Now `server.max_upload_sessions` caps them all
together, and sessions that received nothing for `server.upload_idle_timeout` are purged
(often enough to free the caps), while one that is receiving a body never is.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from regproxy.errors import BlobUploadUnknown, TooManyRequests
from regproxy.server.keys import UPLOADS
from regproxy.storage.uploads import Uploads
from tests.support.inprocess import make_config, start_client
from tests.support.oci import assert_error, envelope_codes, sha256
from tests.support.served import finish_upload, get_blob, upload_id, upload_offset

Start = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Start]:
    """Start a registry (on 127.0.0.1) with these `[server]` keys."""
    clients: list[TestClient] = []

    async def start(**server: object) -> TestClient:
        client = await start_client(make_config(tmp_path, server=server))
        clients.append(client)
        return client

    try:
        yield start
    finally:
        for client in clients:
            await client.close()


@pytest.fixture
async def from_address(
    serve: Start,
) -> AsyncIterator[Callable[[TestClient, int], aiohttp.ClientSession]]:
    """A client session connecting to the registry from 127.0.0.`n` (many clients on one
    machine: every 127/8 address is loopback)."""
    sessions: list[aiohttp.ClientSession] = []

    def make(registry: TestClient, n: int) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(local_addr=(f"127.0.0.{n}", 0))
        session = aiohttp.ClientSession(str(registry.make_url("")), connector=connector)
        sessions.append(session)
        return session

    try:
        yield make
    finally:
        for session in sessions:
            await session.close()


def uploads_root(registry: TestClient) -> Path:
    return registry.app[UPLOADS].root


async def poll(predicate: Callable[[], Awaitable[bool]], timeout: float = 8.0) -> float:
    """Seconds until `predicate` holds; fails after `timeout`."""
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < timeout, "condition not reached in time"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


# ---- the global cap ------------------------------------------------------------------------


async def test_many_addresses_together_stop_at_the_global_cap(serve: Start, from_address) -> None:
    registry = await serve(max_upload_sessions=20, max_uploads_per_client=5)
    statuses: list[int] = []
    refusals: list[str] = []
    for n in range(2, 10):  # 8 addresses, 6 attempts each: 48 sessions asked for
        http = from_address(registry, n)
        for _ in range(6):
            resp = await http.post("/v2/many/blobs/uploads/")
            statuses.append(resp.status)
            if resp.status == 429:
                refusals.append(await resp.text())
    assert statuses.count(202) == 20
    assert statuses.count(429) == 28
    assert all(envelope_codes(body.encode()) == ["TOOMANYREQUESTS"] for body in refusals)
    assert any("maximum of 20 open upload sessions" in body for body in refusals)
    assert any("per client" in body for body in refusals)  # the first four addresses: 5 each
    assert len(list(uploads_root(registry).iterdir())) == 20
    assert registry.app[UPLOADS].open_total() == 20


@pytest.mark.parametrize("trusted", [True, False])
async def test_behind_a_trusted_proxy_the_per_client_cap_counts_forwarded_addresses(
    serve: Start, trusted: bool
) -> None:
    """One reverse proxy, many clients: with `trust_forwarded_headers` each forwarded
    address has its own per-client cap (the global cap still holds them all); without
    it, the header is the client's word and proves nothing."""
    registry = await serve(
        trust_forwarded_headers=trusted, max_uploads_per_client=2, max_upload_sessions=5
    )
    statuses = []
    for n in range(4):
        for _ in range(2):
            headers = {"X-Forwarded-For": f"198.51.100.9, 192.0.2.{n}"}
            resp = await registry.post("/v2/proxied/blobs/uploads/", headers=headers)
            statuses.append(resp.status)
    assert statuses.count(202) == (5 if trusted else 2)


async def test_concurrent_creates_cannot_overshoot_the_global_cap(
    serve: Start, from_address
) -> None:
    registry = await serve(max_upload_sessions=10)
    clients = [from_address(registry, n) for n in range(2, 42)]
    answers = await asyncio.gather(*(c.post("/v2/rush/blobs/uploads/") for c in clients))
    assert sorted(r.status for r in answers) == [202] * 10 + [429] * 30
    assert len(list(uploads_root(registry).iterdir())) == 10


async def test_finishing_or_cancelling_frees_a_global_slot(serve: Start) -> None:
    registry = await serve(max_upload_sessions=2)
    first = (await registry.post("/v2/slots/blobs/uploads/")).headers["Location"]
    second = (await registry.post("/v2/slots/blobs/uploads/")).headers["Location"]
    await assert_error(await registry.post("/v2/slots/blobs/uploads/"), 429, "TOOMANYREQUESTS")
    assert (await registry.delete(first)).status == 204
    third = await registry.post("/v2/slots/blobs/uploads/")
    assert third.status == 202
    await finish_upload(registry, second, b"done", 0)
    data = b"monolithic"
    resp = await registry.post(f"/v2/slots/blobs/uploads/?digest={sha256(data)}", data=data)
    assert resp.status == 201, await resp.text()


# ---- idle sessions age out -----------------------------------------------------------------


async def test_idle_sessions_are_purged_and_free_the_caps(serve: Start) -> None:
    """Sessions abandoned behind one address (a reverse proxy) no longer lock it out for
    `upload_max_age`: after `upload_idle_timeout` they are gone and the caps free up."""
    registry = await serve(
        upload_idle_timeout="2s", max_uploads_per_client=3, max_upload_sessions=1000
    )
    locations = []
    for _ in range(3):
        resp = await registry.post("/v2/abandoned/blobs/uploads/")
        assert resp.status == 202
        locations.append(resp.headers["Location"])
    resp = await registry.patch(locations[0], data=b"some bytes")  # received something once
    assert resp.status == 202
    await assert_error(await registry.post("/v2/abandoned/blobs/uploads/"), 429, "TOOMANYREQUESTS")

    async def all_gone() -> bool:  # (asking a session's status is no activity)
        answers = [await registry.get(location) for location in locations]
        return all(resp.status == 404 for resp in answers)

    # the first one received later than the others: it may go one purge after them
    waited = await poll(all_gone)
    # idle timeout (2 s) + purge interval (1 s) + slack; `upload_max_age` is 24 h
    assert waited < 5.0, waited
    for location in locations:
        await assert_error(await registry.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
        await assert_error(await registry.patch(location, data=b"x"), 404, "BLOB_UPLOAD_UNKNOWN")
        assert not (uploads_root(registry) / upload_id(location)).exists()
    for _ in range(3):
        assert (await registry.post("/v2/abandoned/blobs/uploads/")).status == 202


async def test_a_session_kept_busy_is_not_purged(serve: Start) -> None:
    """Idle means: nothing received. A session getting a PATCH every 0.5 s outlives a
    1 s idle timeout many times over, while an untouched one beside it goes."""
    registry = await serve(upload_idle_timeout="1s")
    busy = (await registry.post("/v2/busy/blobs/uploads/")).headers["Location"]
    idle = (await registry.post("/v2/busy/blobs/uploads/")).headers["Location"]
    data = os.urandom(8 * 1000)
    for start in range(0, len(data), 1000):
        resp = await registry.patch(
            busy,
            data=data[start : start + 1000],
            headers={"Content-Range": f"{start}-{start + 999}"},
        )
        assert resp.status == 202, await resp.text()
        await asyncio.sleep(0.5)
    await assert_error(await registry.get(idle), 404, "BLOB_UPLOAD_UNKNOWN")
    assert await upload_offset(registry, busy) == len(data)
    await finish_upload(registry, busy, data, len(data))
    assert await get_blob(registry, "busy", sha256(data)) == data


@pytest.mark.parametrize("limit", ["upload_idle_timeout", "upload_max_age"])
async def test_a_session_receiving_a_body_is_never_purged(serve: Start, limit: str) -> None:
    """A body arriving over 3 s (aiohttp stores it only at its end: under 1 MiB) outlasts
    a 1 s limit; the purge leaves the session alone until the body is in."""
    registry = await serve(**{limit: "1s"})
    location = (await registry.post("/v2/receiving/blobs/uploads/")).headers["Location"]
    data = os.urandom(3000)

    async def slowly() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 100):
            yield data[start : start + 100]
            await asyncio.sleep(0.1)

    resp = await registry.patch(location, data=slowly(), headers={"Content-Length": str(len(data))})
    assert resp.status == 202, await resp.text()
    assert resp.headers["Range"] == f"0-{len(data) - 1}"
    if limit == "upload_idle_timeout":
        # it just received: finishing right away works
        resp = await registry.put(f"{location}?digest={sha256(data)}")
        assert resp.status == 201, await resp.text()
        assert await get_blob(registry, "receiving", sha256(data)) == data
    else:
        # `upload_max_age` is the limit for sessions in use: past it, the next purge
        # takes the session once its body is in
        async def gone() -> bool:
            return (await registry.get(location)).status == 404

        await poll(gone, timeout=4.0)
        await assert_error(
            await registry.put(f"{location}?digest={sha256(data)}"), 404, "BLOB_UPLOAD_UNKNOWN"
        )


# ---- Uploads.purge itself ------------------------------------------------------------------


def test_purge_rules(tmp_path: Path) -> None:
    uploads = Uploads(tmp_path, direct_writes=False)
    now = time.time()
    fresh = uploads.create("a")
    stale = uploads.create("a")
    stale.touched = now - 100  # received nothing for 100 s
    old = uploads.create("a")
    old.started = now - 1000  # started 1000 s ago, still in use
    busy = uploads.create("a")
    busy.started, busy.touched = now - 1000, now - 1000
    with uploads.using(busy):
        assert uploads.purge(500, now=now, idle_timeout=60) == 2
        assert uploads.open_total() == 2
    for session in (stale, old):
        with pytest.raises(BlobUploadUnknown):
            uploads.get("a", session.id)
        assert not session.folder.exists()
    assert uploads.get("a", fresh.id) is fresh
    # `using` ended: the session's idle time restarted, but it is past `upload_max_age`
    assert uploads.purge(500, now=time.time(), idle_timeout=60) == 1
    with pytest.raises(BlobUploadUnknown):
        uploads.get("a", busy.id)
    # a session purged after a request looked it up cannot be used
    with pytest.raises(BlobUploadUnknown), uploads.using(stale):
        pass


def test_purge_ages_out_sessions_left_by_an_earlier_process(tmp_path: Path) -> None:
    earlier = Uploads(tmp_path, direct_writes=False)
    left = earlier.create("a")
    earlier.write(left, [b"abc"])
    later = Uploads(tmp_path, direct_writes=False)
    now = time.time()
    assert later.purge(86400, now=now, idle_timeout=60) == 0
    assert later.purge(86400, now=now + 120, idle_timeout=60) == 1
    assert not left.folder.exists()


def test_create_counts_limits(tmp_path: Path) -> None:
    uploads = Uploads(tmp_path, direct_writes=False)
    for client in ("x", "x", "y"):
        uploads.create("a", client=client, max_per_client=2, max_total=3)
    with pytest.raises(TooManyRequests, match="per client"):
        uploads.create("a", client="x", max_per_client=2, max_total=10)
    with pytest.raises(TooManyRequests, match="maximum of 3"):
        uploads.create("a", client="z", max_per_client=2, max_total=3)
    assert len(list(uploads.root.iterdir())) == 3
