"""Memory has a bound one client cannot push past (issue 11, item 6).

Measured on a real server process (its RSS from /proc), not by timing the test:
- many connections each sending most of a 4 MiB manifest and then stalling once
  took the server from 125 to 884 MiB; now manifest bodies held at once are
  bounded by `server.body_memory`, and the rest wait, then get 429;
- 4 MiB manifests of dense JSON (`[{},{},…]`) peaked at 807 MiB and never came
  back down; now they are refused by counting before any object is built.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from regproxy import manifest as mf
from tests.support.processes import RegproxyProcess

MiB = 1024 * 1024
BODY = 4 * MiB


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RegproxyProcess]:
    srv = RegproxyProcess(
        tmp_path,
        extra_config='[server]\nbody_memory = "16MiB"\nbody_timeout = "20s"\n',
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


async def _send_head_and_most(
    port: int, path: str, filler: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: {mf.OCI_MANIFEST}\r\nContent-Length: {BODY}\r\n\r\n"
    )
    writer.write(head.encode())
    writer.write(filler[: BODY - 1])  # all but the last byte: the body stays incomplete
    return reader, writer


async def test_stalled_manifest_bodies_are_bounded(server: RegproxyProcess) -> None:
    pid = server.process.pid if server.process else None
    assert pid is not None
    before = rss_bytes(pid)
    filler = b" " * BODY
    connections = [
        await _send_head_and_most(server.port, f"/v2/mem/app{i}/manifests/v1", filler)
        for i in range(60)
    ]
    peak = before
    refused = 0
    deadline = time.monotonic() + 15
    pending = {
        i: asyncio.ensure_future(reader.readline()) for i, (reader, _) in enumerate(connections)
    }
    while time.monotonic() < deadline and pending:
        peak = max(peak, rss_bytes(pid))
        done, _ = await asyncio.wait(pending.values(), timeout=0.2)
        for i, task in list(pending.items()):
            if task in done:
                if b"429" in task.result():
                    refused += 1
                del pending[i]
    peak = max(peak, rss_bytes(pid))
    for task in pending.values():
        task.cancel()
    for _, writer in connections:
        writer.close()
    # 60 × 4 MiB would be 240 MiB held; the budget is 16 MiB, the waiting ones ~nothing
    assert peak - before < 100 * MiB, (before // MiB, peak // MiB)
    assert refused >= 40, refused  # beyond the budget: told to retry, not held


async def test_dense_json_manifests_are_refused_before_parsing(server: RegproxyProcess) -> None:
    pid = server.process.pid if server.process else None
    assert pid is not None
    before = rss_bytes(pid)
    dense = b"[" + b"{}," * (BODY // 3 - 2) + b"{}]"
    flat = b"[" + b"1," * (BODY // 2 - 2) + b"1]"
    nested = b"[" * 200_000 + b"]" * 200_000

    async def put(body: bytes, i: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        head = (
            f"PUT /v2/mem/dense{i}/manifests/v1 HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: {mf.OCI_MANIFEST}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        return answer

    peak = before
    for round_ in range(2):
        answers = await asyncio.gather(
            *(put((dense, flat, nested)[i % 3], round_ * 16 + i) for i in range(16))
        )
        peak = max(peak, rss_bytes(pid))
        for answer in answers:
            status = answer.split(b"\r\n", 1)[0]
            assert b" 400 " in status or b" 429 " in status, answer[:300]
            if b" 400 " in status:
                body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
                assert body["errors"][0]["code"] == "MANIFEST_INVALID"
    after = rss_bytes(pid)
    assert peak - before < 150 * MiB, (before // MiB, peak // MiB)
    assert after - before < 100 * MiB, (before // MiB, after // MiB)
