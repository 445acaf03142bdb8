"""Small bad requests write small log lines (issue 11, item 11).

A 112-byte malformed request once wrote a 4.9 KB traceback (aiohttp logs every request
it cannot parse with one), and an 8 KB URL wrote 8 KB. Ordinary 4xx are one short
line, never a traceback; long fields are cut.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from regproxy.server.logs import MAX_FIELD, MAX_PATH
from tests.support.inprocess import make_config, start_client

MALFORMED = [
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /v2/\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nBad Header\r\n\r\n",
    b"GET /v2/ HTTP/9.9\r\n\r\n",
    b"PUT /v2/a/manifests/v HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
]


async def _exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(200), 5)
    finally:
        writer.close()


async def test_malformed_requests_log_one_short_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start_client(make_config(tmp_path))
    assert client.port is not None
    caplog.set_level(logging.DEBUG)
    try:
        for raw in MALFORMED:
            caplog.clear()
            answer = await _exchange(client.port, raw)
            assert answer.startswith(b"HTTP/1."), answer
            assert b" 400 " in answer.split(b"\r\n", 1)[0]
            await asyncio.sleep(0.05)
            records = [r for r in caplog.records if r.name != "aiohttp.access"]
            for record in records:
                assert record.exc_info is None, (raw, record.getMessage())
                assert record.levelno < logging.ERROR, (raw, record.getMessage())
                assert len(record.getMessage()) < 400, (raw, record.getMessage())
    finally:
        await client.close()


async def test_long_fields_are_cut_in_the_access_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start_client(make_config(tmp_path))
    caplog.set_level(logging.INFO, logger="regproxy.access")
    try:
        path = "/v2/" + "a" * 4000 + "/tags/list?" + "q" * 3000  # within aiohttp's 8 KiB line
        headers = {"User-Agent": "u" * 6000, "Referer": "r" * 6000}
        async with client.get(path, headers=headers) as resp:
            assert resp.status in (400, 404)
        lines = [r for r in caplog.records if r.name == "regproxy.access"]
        assert len(lines) == 1
        message = lines[0].getMessage()
        assert len(message) < MAX_PATH + 2 * MAX_FIELD + 200, len(message)
        fields = lines[0].access  # type: ignore[attr-defined]
        assert len(fields["path"]) <= MAX_PATH
        assert len(fields["query"]) <= MAX_PATH
        assert len(fields["user_agent"]) <= MAX_FIELD
    finally:
        await client.close()
