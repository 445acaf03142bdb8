"""The whole registry API with `workers = 2`, answered exactly as by one process.

The scripted session of `tests/s3/test_oci_surface.py` (every way to push a blob, every
Range shape, mounts, manifests by tag and digest, an index, tags and catalog pages,
referrers, deletes and the errors around them) runs against an in-process single app and
against `regproxy serve` with two workers, with the same bytes. Against the workers, each
request goes to the other worker than the one before (two keep-alive connections, one per
worker), so an upload session's POST, PATCHes, status and PUT hop between processes at
every step. Each step checks its own expectations, and the two recordings (status, the
headers that carry meaning, body) must be identical, upload ids aside.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from regproxy.server.workers import REPLICA_HEADER
from tests.s3.test_oci_surface import Content, run_session
from tests.support.inprocess import make_config, start_client
from tests.workers.helpers import WorkersProcess, pinned

pytestmark = pytest.mark.timeout(180)


class Alternating:
    """What the session script needs of a client (`request`, `post`), sending each
    request to the other worker than the one before, and counting who answered.

    One keep-alive connection per worker; after an answer that closed its connection (a
    large body read past aiohttp) the next one is pinned to the same worker again."""

    def __init__(self, url: str, replicas: list[str]) -> None:
        self.url = url
        self.replicas = replicas
        self.sessions: list[aiohttp.ClientSession | None] = [None] * len(replicas)
        self.sent = 0
        self.answered: Counter[str] = Counter()

    async def open(self) -> None:
        for slot, replica in enumerate(self.replicas):
            self.sessions[slot] = await pinned(self.url, replica)

    async def close(self) -> None:
        for session in self.sessions:
            if session is not None:
                await session.close()

    def request(self, method: str, path: str, **kw: Any) -> Any:
        slot = self.sent % len(self.sessions)
        self.sent += 1
        session = self.sessions[slot]
        assert session is not None
        return _Counted(self, slot, session.request(method, path, **kw))

    def post(self, path: str, **kw: Any) -> Any:
        return self.request("POST", path, **kw)

    async def answered_by(self, slot: int, response: aiohttp.ClientResponse) -> None:
        replica = response.headers.get(REPLICA_HEADER, "?")
        self.answered[replica] += 1
        closed = response.headers.get("Connection", "").lower() == "close"
        if closed or replica != self.replicas[slot]:
            old = self.sessions[slot]
            self.sessions[slot] = await pinned(self.url, self.replicas[slot])
            if old is not None:
                await old.close()


class _Counted:
    def __init__(self, client: Alternating, slot: int, request: Any) -> None:
        self.client = client
        self.slot = slot
        self.request = request
        self.response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        self.response = await self.request.__aenter__()
        return self.response

    async def __aexit__(self, *exc: Any) -> None:
        await self.request.__aexit__(*exc)
        if self.response is not None:
            await self.client.answered_by(self.slot, self.response)


async def test_the_registry_api_with_two_workers_is_answered_as_by_one_process(
    tmp_path: Path,
) -> None:
    content = Content()
    single = await start_client(make_config(tmp_path / "single"))
    try:
        expected = await run_session(single, content)
    finally:
        await single.close()

    server = WorkersProcess(tmp_path / "workers")
    server.start()
    try:
        replicas = [server.replica(1), server.replica(2)]
        client = Alternating(server.url, replicas)
        try:
            await client.open()
            got = await run_session(client, content)  # type: ignore[arg-type]
        finally:
            await client.close()
    finally:
        server.stop()
    answered = client.answered

    assert len(got) == len(expected)
    for one, two in zip(expected, got, strict=True):
        assert (two.what, two.status, two.headers) == (one.what, one.status, one.headers)
        assert two.body == one.body, f"{two.what}: bodies differ"
    # every other request on each worker (give or take the first after a reconnection)
    assert set(answered) == set(replicas), answered
    assert min(answered.values()) > 0.45 * sum(answered.values()), answered
    # every upload session was finished or cancelled, on whichever worker
    assert not list((server.temporary_storage_dir / "uploads").iterdir())
