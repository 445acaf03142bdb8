"""kill -9 of `regproxy serve` in the middle of a large push, with the stores on S3.

A blob becomes visible whole or not at all: a body cut off while it arrives never
reaches the bucket (it is in local temporary storage), and a commit cut off while its
multipart upload runs leaves no `blobs/` key, only an unfinished multipart upload and
the marker its writer kept rewriting while it ran (`S3Backend._marked`). While that
marker is fresh the upload may be the commit of a server that is still running
(aborting it would fail that push): gc leaves it alone, whatever its grace period.
Once the marker is stale, gc aborts it (tests/s3/test_upload_marks.py times that with a
shortened beat); verify reports it once older than `layout.TEMP_MAX_AGE`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from regproxy.storage import s3 as s3_mod
from regproxy.storage.layout import TEMP_MAX_AGE
from tests.cli.helpers import REPO_ROOT, Ran, arun_cli
from tests.support.digests import sha256
from tests.support.processes import RegproxyProcess
from tests.support.s3store import (
    blob_key,
    bucket_keys,
    multipart_uploads,
    s3_section,
    s3_store_env,
)
from tests.support.seaweed import SeaweedS3

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MiB = 1024 * 1024

#: `regproxy` with its clock moved ahead (argv: the seconds, then the command line): what a
#: command run that much later sees (botocore signs with `datetime`, not `time.time`)
_LATER = """
import runpy, sys, time
ahead = float(sys.argv[1])
real = time.time
time.time = lambda: real() + ahead
sys.argv = ["regproxy", *sys.argv[2:]]
runpy.run_module("regproxy", run_name="__main__", alter_sys=True)
"""


async def run_later(seconds: float, *args: str | Path) -> Ran:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _LATER,
        str(seconds),
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("REGPROXY_")},
            "PYTHONPATH": str(REPO_ROOT),
        },
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


@pytest.fixture
def server(seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path) -> RegproxyProcess:
    process = RegproxyProcess(
        tmp_path / "site",
        extra_config=s3_section(seaweed, tmp_path / "site"),
        env=s3_store_env(s3_bucket),
    )
    try:
        yield process  # type: ignore[misc]
    finally:
        process.stop()


def _config_file(server: RegproxyProcess, bucket: str) -> Path:
    """The server's configuration with the stores on S3 written into it (the offline
    commands get no environment overrides from `arun_cli`)."""
    text = server.config_path.read_text()
    for key, value in s3_store_env(bucket).items():
        name = key.removeprefix("REGPROXY_").lower()
        lines = [line for line in text.splitlines() if not line.startswith(f"{name} =")]
        text = f"{name} = {json.dumps(value)}\n" + "\n".join(lines) + "\n"
    path = server.workdir / "offline.toml"
    path.write_text(text)
    return path


def _head(engine: SeaweedS3, bucket: str, key: str) -> dict[str, Any] | None:
    from botocore.exceptions import ClientError

    try:
        return engine.client().head_object(Bucket=bucket, Key=key)
    except ClientError:
        return None


async def _slow_body(data: bytes, sent: list[int]) -> AsyncIterator[bytes]:
    for start in range(0, len(data), MiB):
        yield data[start : start + MiB]
        sent[0] += MiB
        await asyncio.sleep(0.05)


async def test_kill_mid_push_leaves_nothing_visible(
    server: RegproxyProcess, seaweed: SeaweedS3, s3_bucket: str
) -> None:
    data = os.urandom(s3_mod.SINGLE_PUT_MAX + 16 * MiB + 5)
    digest = sha256(data)
    key = blob_key("registry", digest)
    timeout = aiohttp.ClientTimeout(total=60)

    # 1. killed while the body arrives: nothing reaches the bucket
    server.start()
    async with aiohttp.ClientSession(server.url, timeout=timeout) as http:
        async with http.post("/v2/big/blobs/uploads/") as resp:
            assert resp.status == 202
            location = resp.headers["Location"]
        sent = [0]
        patch = asyncio.ensure_future(http.patch(location, data=_slow_body(data, sent)))
        while sent[0] < 20 * MiB:
            await asyncio.sleep(0.02)
            assert not patch.done(), patch
        server.kill()
        with pytest.raises((aiohttp.ClientError, ConnectionError)):
            await patch
    assert _head(seaweed, s3_bucket, key) is None
    assert not bucket_keys(seaweed, s3_bucket, "registry/blobs/")
    assert multipart_uploads(seaweed, s3_bucket) == []

    # 2. killed while the commit's multipart upload runs: no blobs/ key, an open upload
    server.start()
    async with aiohttp.ClientSession(server.url, timeout=timeout) as http:
        async with http.post("/v2/big/blobs/uploads/") as resp:
            location = resp.headers["Location"]
        async with http.patch(location, data=data) as resp:
            assert resp.status == 202, await resp.text()
        put = asyncio.ensure_future(http.put(f"{location}?digest={digest}"))
        deadline = time.monotonic() + 30
        while not [u for u in multipart_uploads(seaweed, s3_bucket) if u["Key"] == key]:
            assert not put.done(), "the commit finished before its multipart upload was seen"
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        server.kill()
        with pytest.raises((aiohttp.ClientError, ConnectionError)):
            await put
    assert _head(seaweed, s3_bucket, key) is None, "a killed commit left a visible blob"
    assert not bucket_keys(seaweed, s3_bucket, "registry/blobs/")
    (leftover,) = multipart_uploads(seaweed, s3_bucket)
    assert leftover["Key"] == key

    config = _config_file(server, s3_bucket)
    # right away, the upload may as well be a live server's commit (its marker is fresh):
    # gc leaves it alone
    ran = await arun_cli("gc", "-c", config, "--grace", "0", "--json")
    assert ran.code == 0, ran.stderr
    assert ran.json()["stores"][0]["temp_files_removed"] == 0
    assert [u["UploadId"] for u in multipart_uploads(seaweed, s3_bucket)] == [leftover["UploadId"]]
    ran = await arun_cli("verify", "-c", config, "--json")
    assert ran.code == 0, ran.stdout  # not a problem yet either

    # an hour later it is a crash's leftover: verify reports it, gc aborts it (and its
    # marker, stale after 2 minutes)
    later = TEMP_MAX_AGE + 60
    ran = await run_later(later, "verify", "-c", config, "--json")
    assert ran.code == 1, (ran.stdout, ran.stderr)
    (problem,) = json.loads(ran.stdout)["problems"]
    assert problem["kind"] == "stray-temp" and "multipart" in problem["message"]
    ran = await run_later(later, "gc", "-c", config, "--grace", "0", "--json")
    assert ran.code == 0, ran.stderr
    assert json.loads(ran.stdout)["stores"][0]["temp_files_removed"] == 1
    assert multipart_uploads(seaweed, s3_bucket) == []
    assert not bucket_keys(seaweed, s3_bucket, f"registry/{s3_mod.UPLOADING}/")
    assert _head(seaweed, s3_bucket, key) is None

    # 3. a restarted server knows nothing of the blob, and takes the push again
    server.start()
    async with aiohttp.ClientSession(server.url, timeout=timeout) as http:
        async with http.head(f"/v2/big/blobs/{digest}") as resp:
            assert resp.status == 404
        async with http.post(f"/v2/big/blobs/uploads/?digest={digest}", data=data) as resp:
            assert resp.status == 201, await resp.text()
        async with http.head(f"/v2/big/blobs/{digest}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(len(data))
        async with http.get(f"/v2/big/blobs/{digest}", headers={"Range": "bytes=-100"}) as resp:
            assert await resp.read() == data[-100:]
    assert multipart_uploads(seaweed, s3_bucket) == []
