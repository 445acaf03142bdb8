"""Crash safety: SIGKILL during concurrent uploads, restart, and check what survived.

Every object acknowledged with 201 must be readable with the right bytes after a
restart, and no partial blob may ever be served. Also: `temporary_registry_storage`
on another filesystem (a tmpfs) than the stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from regproxy.config import Config
from regproxy.server.keys import CONFIG
from tests.support.digests import sha256
from tests.support.inprocess import make_config, start_client
from tests.support.oci import (
    Image,
    blob_files,
    make_image,
    push_blob_chunked,
    push_image,
)
from tests.support.processes import RegproxyProcess
from tests.support.tools import skip_or_fail

ROUNDS = 3
WORKERS = 8
TIMEOUT = aiohttp.ClientTimeout(total=30)


@dataclass
class Ledger:
    """What the clients sent, and what the server acknowledged with a 201."""

    rng: random.Random
    attempted: dict[tuple[str, str], bytes] = field(default_factory=dict)
    acked_blobs: dict[tuple[str, str], bytes] = field(default_factory=dict)
    acked_manifests: list[tuple[str, str, Image]] = field(default_factory=list)
    #: sessions that were mid-upload: (name, location, data)
    open_sessions: list[tuple[str, str, bytes]] = field(default_factory=list)
    counter: int = 0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RegproxyProcess]:
    srv = RegproxyProcess(tmp_path / "srv")
    try:
        yield srv
    finally:
        srv.stop()


def _blob(rng: random.Random) -> bytes:
    size = rng.choice([0, 1, 1000, 65_536, 300_000, 1024 * 1024 + 5, 3 * 1024 * 1024])
    return rng.randbytes(size)


async def _push_blob(s: aiohttp.ClientSession, ledger: Ledger, name: str, data: bytes) -> None:
    """Push one blob in a random style; record it as acknowledged on 201."""
    digest = sha256(data)
    ledger.attempted[(name, digest)] = data
    style = ledger.rng.choice(["monolithic", "chunked", "streamed"])
    if style == "monolithic":
        async with s.post(f"/v2/{name}/blobs/uploads/?digest={digest}", data=data) as r:
            status = r.status
    else:
        async with s.post(f"/v2/{name}/blobs/uploads/") as r:
            assert r.status == 202
            location = r.headers["Location"]
        entry = (name, location, data)
        ledger.open_sessions.append(entry)
        if style == "chunked":
            step = 128 * 1024
            for start in range(0, len(data), step):
                piece = data[start : start + step]
                headers = {"Content-Range": f"{start}-{start + len(piece) - 1}"}
                async with s.patch(location, data=piece, headers=headers) as r:
                    assert r.status == 202, await r.text()
                    location = r.headers["Location"]
            async with s.put(f"{location}?digest={digest}") as r:
                status = r.status
        else:

            async def body() -> AsyncIterator[bytes]:
                for start in range(0, len(data), 64 * 1024):
                    yield data[start : start + 64 * 1024]
                    await asyncio.sleep(0)

            async with s.patch(location, data=body()) as r:
                assert r.status == 202, await r.text()
            async with s.put(f"{location}?digest={digest}") as r:
                status = r.status
        ledger.open_sessions.remove(entry)
    assert status == 201, status
    ledger.acked_blobs[(name, digest)] = data


async def _worker(s: aiohttp.ClientSession, ledger: Ledger, wid: int) -> None:
    """Push blobs and images until the server dies under us."""
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
        while True:
            ledger.counter += 1
            number = ledger.counter
            name = f"crash/w{wid % 3}"
            if ledger.rng.random() < 0.3:
                image = make_image(layer_sizes=(ledger.rng.choice([100, 200_000]),))
                for blob in image.blobs:
                    await _push_blob(s, ledger, name, blob)
                tag = f"t{number}"
                headers = {"Content-Type": image.media_type}
                url = f"/v2/{name}/manifests/{tag}"
                async with s.put(url, data=image.manifest, headers=headers) as r:
                    assert r.status == 201, await r.text()
                ledger.acked_manifests.append((name, tag, image))
            else:
                await _push_blob(s, ledger, name, _blob(ledger.rng))


async def _round(server: RegproxyProcess, ledger: Ledger) -> None:
    """Run the workers, then SIGKILL the server at a random moment."""
    async with aiohttp.ClientSession(base_url=server.url, timeout=TIMEOUT) as s:
        tasks = [asyncio.create_task(_worker(s, ledger, w)) for w in range(WORKERS)]
        acked_before = len(ledger.acked_blobs)
        deadline = time.monotonic() + 20
        while len(ledger.acked_blobs) < acked_before + 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(ledger.rng.uniform(0.0, 0.6))
        server.kill()
        done, pending = await asyncio.wait(tasks, timeout=30)
        assert not pending, "workers did not notice the dead server"
        for task in done:
            task.result()  # an assertion error in a worker is a real failure


async def _verify(server: RegproxyProcess, ledger: Ledger, seed: int) -> None:
    """Everything acknowledged is intact; nothing partial is visible."""
    info = f"(seed {seed}; log {server.log_path})"
    async with aiohttp.ClientSession(base_url=server.url, timeout=TIMEOUT) as s:
        for (name, digest), data in ledger.acked_blobs.items():
            async with s.get(f"/v2/{name}/blobs/{digest}") as r:
                assert r.status == 200, f"acknowledged blob {name}@{digest} lost {info}"
                assert await r.read() == data, f"acknowledged blob {digest} corrupt {info}"
                assert r.headers["Docker-Content-Digest"] == digest
        for name, tag, image in ledger.acked_manifests:
            for ref in (tag, image.digest):
                async with s.get(f"/v2/{name}/manifests/{ref}") as r:
                    assert r.status == 200, f"acknowledged manifest {name}:{ref} lost {info}"
                    assert await r.read() == image.manifest
                    assert r.headers["Docker-Content-Digest"] == image.digest
        for (name, digest), data in ledger.attempted.items():
            if (name, digest) in ledger.acked_blobs:
                continue
            async with s.get(f"/v2/{name}/blobs/{digest}") as r:
                if r.status == 200:
                    assert await r.read() == data, f"partial blob {digest} served {info}"
                else:
                    assert r.status == 404, info
        # every tag that exists at all points at a complete, correct manifest
        async with s.get("/v2/_catalog") as r:
            repositories = (await r.json())["repositories"]
        for name in repositories:
            async with s.get(f"/v2/{name}/tags/list") as r:
                tags = (await r.json())["tags"]
            for tag in tags:
                async with s.get(f"/v2/{name}/manifests/{tag}") as r:
                    assert r.status == 200, f"dangling tag {name}:{tag} {info}"
                    body = await r.read()
                    assert sha256(body) == r.headers["Docker-Content-Digest"], info
    # on disk: every file under blobs/ has the content its name promises
    for digest, path in blob_files(server.storage_dir).items():
        if path.name.startswith("."):
            continue  # an interrupted atomic write: never visible, never served
        algorithm, hex_ = digest.split(":")
        actual = hashlib.new(algorithm, path.read_bytes()).hexdigest()
        assert actual == hex_, f"blob file {path} does not match its name {info}"


async def _resume_open_sessions(server: RegproxyProcess, ledger: Ledger) -> int:
    """Upload sessions cut by the crash resume from the offset the server reports."""
    resumed = 0
    async with aiohttp.ClientSession(base_url=server.url, timeout=TIMEOUT) as s:
        for name, location, data in ledger.open_sessions:
            async with s.get(location) as r:
                if r.status == 404:
                    continue
                assert r.status == 204, await r.text()
                end = int(r.headers["Range"].split("-")[1])
            if end == 0:
                continue  # "0-0" cannot tell 0 bytes from 1 byte apart
            offset = end + 1
            assert offset <= len(data)
            rest = data[offset:]
            headers = {"Content-Range": f"{offset}-{len(data) - 1}"} if rest else {}
            async with s.put(f"{location}?digest={sha256(data)}", data=rest, headers=headers) as r:
                assert r.status == 201, await r.text()
            ledger.acked_blobs[(name, sha256(data))] = data
            resumed += 1
        ledger.open_sessions.clear()
    return resumed


async def test_sigkill_during_uploads(server: RegproxyProcess) -> None:
    seed = int(os.environ.get("REGPROXY_CRASH_SEED", time.time_ns() % 2**32))
    ledger = Ledger(random.Random(seed))
    server.start()
    resumed = 0
    interrupted: set[tuple[str, str]] = set()
    for _ in range(ROUNDS):
        await _round(server, ledger)
        interrupted |= ledger.attempted.keys() - ledger.acked_blobs.keys()
        server.restart()
        await _verify(server, ledger, seed)
        resumed += await _resume_open_sessions(server, ledger)
    print(
        f"seed {seed}: {len(ledger.acked_blobs)} blobs and {len(ledger.acked_manifests)} "
        f"manifests acknowledged, {len(interrupted)} pushes interrupted, {resumed} resumed"
    )
    assert ledger.acked_blobs and ledger.acked_manifests, f"too little acknowledged (seed {seed})"
    assert interrupted, f"no kill landed during an upload (seed {seed})"
    await _verify(server, ledger, seed)
    assert server.process is not None
    assert server.process.stop() == 0, "a graceful stop (SIGTERM) should exit 0"


# ---- temporary_registry_storage on another filesystem -----------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A freshly mounted tmpfs (another filesystem than tmp_path); unmounted afterwards."""
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "regproxy-test", str(mountpoint)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        error = result.stderr.strip() if result.returncode else ""
    except FileNotFoundError:
        error = "the mount command is missing"
    if error:
        skip_or_fail(f"cannot mount a tmpfs for temporary_registry_storage: {error}")
    try:
        assert os.stat(mountpoint).st_dev != os.stat(tmp_path).st_dev
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=30)


@pytest.fixture
async def cross_fs_client(tmp_path: Path, tmpfs: Path) -> AsyncIterator[TestClient]:
    config = make_config(tmp_path, temporary_registry_storage=str(tmpfs / "tmp"))
    client = await start_client(config)
    try:
        yield client
    finally:
        await client.close()


def _config_of(client: TestClient) -> Config:
    return client.app[CONFIG]


async def test_temporary_storage_on_another_filesystem(cross_fs_client: TestClient) -> None:
    """Commits copy into the store's own temp folder, then rename; nothing is left over."""
    client = cross_fs_client
    config = _config_of(client)
    assert (
        os.stat(config.temporary_registry_storage).st_dev != os.stat(config.registry_storage).st_dev
    )
    big = os.urandom(5 * 1024 * 1024 + 1)
    digest = await push_blob_chunked(client, "xfs/repo", big, 2 * 1024 * 1024)
    image = make_image(layer_sizes=(70_000, 1))
    await push_image(client, "xfs/repo", image, "v1")
    # the same blob again: the existing one is kept, the new temp file dropped
    await push_blob_chunked(client, "xfs/other", big, 4 * 1024 * 1024)
    resp = await client.get(f"/v2/xfs/repo/blobs/{digest}")
    assert await resp.read() == big
    resp = await client.get("/v2/xfs/repo/manifests/v1")
    assert json.loads(await resp.read()) == json.loads(image.manifest)
    for layer in image.layers:
        resp = await client.get(f"/v2/xfs/repo/blobs/{sha256(layer)}")
        assert await resp.read() == layer
    assert list((config.temporary_registry_storage / "uploads").iterdir()) == []
    assert [p for p in (config.registry_storage / "tmp").iterdir()] == []
    for found, path in blob_files(config.registry_storage).items():
        assert sha256(path.read_bytes()) == found
