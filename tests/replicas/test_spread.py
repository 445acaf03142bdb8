"""HAProxy spreads requests over every replica, request by request: no stickiness, not
even to a client's keep-alive connection (what a load balancer in front of replicas does
unless told otherwise, and what the replicas must cope with)."""

from __future__ import annotations

import asyncio
import itertools

import aiohttp
import pytest

from tests.support.haproxy import Logged
from tests.support.proxy import wait_until
from tests.support.replicas import REPLICA_HEADER, Cluster
from tests.support.served import read_answer, request_head

pytestmark = pytest.mark.timeout(120)


async def test_new_connections_reach_every_replica(cluster: Cluster) -> None:
    seen = []
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(9):
            async with session.get(f"{cluster.url}/v2/") as resp:
                assert resp.status == 200
                seen.append(resp.headers[REPLICA_HEADER])
    assert set(seen) == set(cluster.names), seen
    assert sorted(seen) == sorted(cluster.names * 3), f"not round-robin: {seen}"


async def test_one_keep_alive_connection_is_balanced_per_request(cluster: Cluster) -> None:
    """Six requests written one after the other on one TCP connection to HAProxy: each
    goes to the next replica, and the connection stays open throughout."""
    reader, writer = await asyncio.open_connection("127.0.0.1", cluster.lb.port)
    client = "{}:{}".format(*writer.get_extra_info("sockname"))
    seen = []
    try:
        for _ in range(6):
            writer.write(request_head("GET", "/v2/"))
            await writer.drain()
            answer = await read_answer(reader)
            assert answer.status == 200, answer
            assert answer.headers.get("connection", "").lower() != "close"
            seen.append(answer.headers[REPLICA_HEADER.lower()])
    finally:
        writer.close()
    assert all(a != b for a, b in itertools.pairwise(seen)), seen
    assert set(seen) == set(cluster.names), seen
    # one client connection throughout, as HAProxy logged it (a line ends each request)
    await wait_until(lambda: len(logged_from(cluster, client)) == 6, what="6 log lines")
    assert [r.server for r in logged_from(cluster, client)] == seen


def logged_from(cluster: Cluster, client: str) -> list[Logged]:
    return [r for r in cluster.lb.requests() if r.client == client]


async def test_every_answer_names_its_replica_and_errors_too(cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(f"{cluster.url}/v2/nothing/manifests/latest") as resp:
                assert resp.status == 404
                assert resp.headers[REPLICA_HEADER] in cluster.names
