"""Upload sessions across workers: started on one, continued, queried and finished on any
other, hashing each byte once when the session does not move, limits held by all.

Two apps built as workers 1 and 2 of one `serve` share a temp folder in this process, so
each test says exactly which worker gets which request.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from regproxy.server.keys import UPLOADS
from regproxy.storage.uploads import Uploads
from tests.support.digests import sha256
from tests.support.inprocess import make_config
from tests.support.served import upload_id
from tests.workers.helpers import start_workers

MiB = 1024 * 1024


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[list[TestClient]]:
    limits = {"max_uploads_per_client": 3, "max_upload_sessions": 5}
    config = make_config(tmp_path, server={**limits, "trust_forwarded_headers": True})
    clients = await start_workers(config, 2)
    try:
        yield clients
    finally:
        for client in clients:
            await client.close()


@pytest.fixture
def rehashed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Bytes hashed again from a session's data file (a move's cost), by any worker."""
    counted: list[int] = []
    catch_up = Uploads._hash_range
    full = Uploads._digest_of_file

    def hash_range(session, hasher, start, end):  # type: ignore[no-untyped-def]
        counted.append(end - start)
        return catch_up(session, hasher, start, end)

    def digest_of_file(self, session, algorithm):  # type: ignore[no-untyped-def]
        counted.append(os.stat(session.data_path).st_size)
        return full(self, session, algorithm)

    monkeypatch.setattr(Uploads, "_hash_range", staticmethod(hash_range))
    monkeypatch.setattr(Uploads, "_digest_of_file", digest_of_file)
    yield counted


async def post(client: TestClient, name: str = "app") -> str:
    resp = await client.post(f"/v2/{name}/blobs/uploads/")
    assert resp.status == 202, await resp.text()
    return resp.headers["Location"]


async def patch(client: TestClient, location: str, data: bytes, start: int) -> str:
    resp = await client.patch(
        location, data=data, headers={"Content-Range": f"{start}-{start + len(data) - 1}"}
    )
    assert resp.status == 202, await resp.text()
    assert resp.headers["Range"] == f"0-{start + len(data) - 1}"
    return resp.headers["Location"]


async def status(client: TestClient, location: str) -> str:
    resp = await client.get(location)
    assert resp.status == 204, await resp.text()
    return resp.headers["Range"]


async def put(client: TestClient, location: str, data: bytes, body: bytes = b"") -> None:
    resp = await client.put(f"{location}?digest={sha256(data)}", data=body)
    assert resp.status == 201, await resp.text()


async def receiving(tmp_path: Path, location: str) -> Path:
    """Until a request holds the session's lock and has written its first bytes."""
    folder = tmp_path / "storage/_tmp/uploads" / upload_id(location)
    for _ in range(500):
        if (folder / "lock").exists() and (folder / "data").stat().st_size:
            return folder
        await asyncio.sleep(0.01)
    raise AssertionError("the body never started arriving")


async def pulled(client: TestClient, data: bytes, name: str = "app") -> bytes:
    resp = await client.get(f"/v2/{name}/blobs/{sha256(data)}")
    assert resp.status == 200
    return await resp.read()


async def test_a_session_that_never_moves_is_hashed_once(
    workers: list[TestClient], rehashed: list[int]
) -> None:
    one, _ = workers
    data = os.urandom(3 * MiB + 5)
    location = await post(one)
    location = await patch(one, location, data[: 2 * MiB], 0)
    location = await patch(one, location, data[2 * MiB :], 2 * MiB)
    await put(one, location, data)
    assert rehashed == []
    assert await pulled(one, data) == data


async def test_docker_spread_post_patch_put_costs_no_rehash(
    workers: list[TestClient], rehashed: list[int]
) -> None:
    """POST on one worker, the whole body on the other, PUT back on the first: the
    appender recorded its digest, so nobody hashes anything twice."""
    one, two = workers
    data = os.urandom(2 * MiB + 11)
    location = await post(one)
    location = await patch(two, location, data, 0)
    assert await status(one, location) == f"0-{len(data) - 1}"
    await put(one, location, data)
    assert sum(rehashed) == 0
    assert await pulled(two, data) == data


async def test_chunks_alternating_between_workers_rehash_only_what_moved(
    workers: list[TestClient], rehashed: list[int]
) -> None:
    one, two = workers
    chunk = MiB + 3
    data = os.urandom(4 * chunk)
    location = await post(one)
    for i, client in enumerate((one, two, one, two)):
        assert await status(workers[(i + 1) % 2], location) == f"0-{max(i * chunk - 1, 0)}"
        location = await patch(client, location, data[i * chunk : (i + 1) * chunk], i * chunk)
    # worker 2 caught up on chunk 0 before chunk 1, on chunk 2 before chunk 3; worker 1 on
    # chunk 1 before chunk 2. Each chunk written elsewhere is read back once per catch-up.
    assert rehashed == [chunk, chunk, chunk]
    await put(two, location, data)  # worker 2 holds the whole running hash: nothing more
    assert sum(rehashed) == 3 * chunk
    assert await pulled(one, data) == data


async def test_a_final_chunk_in_the_put_on_another_worker(
    workers: list[TestClient], rehashed: list[int]
) -> None:
    one, two = workers
    data = os.urandom(MiB + 77)
    location = await post(one)
    location = await patch(one, location, data[:MiB], 0)
    resp = await two.put(
        f"{location}?digest={sha256(data)}",
        data=data[MiB:],
        headers={"Content-Range": f"{MiB}-{len(data) - 1}"},
    )
    assert resp.status == 201, await resp.text()
    assert rehashed == [MiB]  # worker 2 read worker 1's chunk once, then hashed its own
    assert await pulled(one, data) == data


async def test_a_wrong_digest_is_refused_wherever_the_put_goes(
    workers: list[TestClient],
) -> None:
    one, two = workers
    data = os.urandom(100_000)
    location = await post(one)
    location = await patch(two, location, data, 0)
    resp = await one.put(f"{location}?digest={sha256(b'other')}")
    assert resp.status == 400
    assert (await resp.json())["errors"][0]["code"] == "DIGEST_INVALID"
    for client in workers:  # the session is gone for both
        resp = await client.get(location)
        assert resp.status == 404


async def test_a_session_finished_on_one_worker_is_unknown_on_the_other(
    workers: list[TestClient],
) -> None:
    one, two = workers
    data = os.urandom(1000)
    location = await post(one)
    await patch(one, location, data, 0)
    await put(two, location, data)
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        resp = await one.request(method, f"{location}?digest={sha256(data)}", data=b"x")
        assert resp.status == 404, method
        assert (await resp.json())["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"


async def test_cancel_on_another_worker(workers: list[TestClient]) -> None:
    one, two = workers
    location = await post(one)
    await patch(one, location, b"abc", 0)
    resp = await two.delete(location)
    assert resp.status == 204
    resp = await one.get(location)
    assert resp.status == 404


async def test_two_workers_never_append_to_one_session_at_once(
    workers: list[TestClient], tmp_path: Path
) -> None:
    """While worker 1 receives a slow PATCH, a PATCH on worker 2 is refused like a second
    PATCH on one process, and a PUT on worker 2 waits for the first to end."""
    one, two = workers
    first = os.urandom(64 * 1024)
    location = await post(one)
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield first[:1000]
        await release.wait()
        yield first[1000:]

    slow = asyncio.ensure_future(
        one.patch(location, data=slow_body(), headers={"Content-Type": "application/octet-stream"})
    )
    await receiving(tmp_path, location)
    resp = await two.patch(location, data=b"zzz")
    assert resp.status == 400
    assert (await resp.json())["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
    put_task = asyncio.ensure_future(two.put(f"{location}?digest={sha256(first)}"))
    await asyncio.sleep(0.2)
    assert not put_task.done()  # waiting for worker 1's request
    release.set()
    assert (await slow).status == 202
    assert (await put_task).status == 201
    assert await pulled(two, first) == first


async def test_per_client_limits_hold_across_workers(workers: list[TestClient]) -> None:
    one, two = workers
    held = [await post(one), await post(two), await post(one)]  # 3 per client
    for client in workers:
        resp = await client.post("/v2/app/blobs/uploads/")
        assert resp.status == 429
    await two.delete(held[0])  # a slot freed on worker 1's session, by worker 2
    await post(one)


async def test_the_total_limit_holds_across_workers(
    workers: list[TestClient], tmp_path: Path
) -> None:
    two = workers[1]
    # five clients (behind a trusted proxy), one session each: the total is 5
    for i in range(5):
        client = workers[i % 2]
        resp = await client.post(
            "/v2/app/blobs/uploads/", headers={"X-Forwarded-For": f"10.0.0.{i}"}
        )
        assert resp.status == 202, await resp.text()
    sessions = list((tmp_path / "storage/_tmp/uploads").iterdir())
    assert len(sessions) == 5
    resp = await two.post("/v2/app/blobs/uploads/", headers={"X-Forwarded-For": "10.0.0.9"})
    assert resp.status == 429
    assert "maximum of 5" in await resp.text()


async def test_purge_on_one_worker_spares_a_session_the_other_is_writing(
    workers: list[TestClient], tmp_path: Path
) -> None:
    one, two = workers
    location = await post(one)
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        await release.wait()
        yield b"y" * 1000

    slow = asyncio.ensure_future(one.patch(location, data=slow_body()))
    folder = await receiving(tmp_path, location)
    uploads = two.app[UPLOADS]
    # everything is expired for this purge, but worker 1's request holds the lock
    assert uploads.purge(max_age=0, idle_timeout=0) == 0
    assert folder.is_dir()
    release.set()
    assert (await slow).status == 202
    assert uploads.purge(max_age=0, idle_timeout=0) == 1
    assert not folder.exists()
    resp = await one.get(location)
    assert resp.status == 404
