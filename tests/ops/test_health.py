"""`/healthz` and `/readyz`: read-only and full stores fail readiness, upstreams never do.

Root ignores permission bits, so a `chmod` cannot make a folder read-only for
this test process. The store is made read-only for real instead: a read-only
bind mount over it, or the immutable attribute (`chattr +i`), both of which
stop root too. A subprocess without CAP_DAC_OVERRIDE checks the `chmod` case,
which is what the dedicated service user of the systemd unit meets.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from regproxy.server.keys import PROXY
from tests.support.fake_upstream import FakeUpstream
from tests.support.inprocess import make_config, start_client
from tests.support.proxy import fetch, wait_until
from tests.support.tools import skip_or_fail

pytestmark = pytest.mark.timeout(60)
REPO_ROOT = Path(__file__).resolve().parents[2]


async def readyz(client: TestClient) -> tuple[int, dict[str, Any]]:
    resp = await client.get("/readyz")
    return resp.status, await resp.json()


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    client = await start_client(make_config(tmp_path))
    try:
        yield client
    finally:
        await client.close()


async def test_healthz(client: TestClient) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}
    assert resp.headers["X-Request-ID"]


async def test_ready_when_every_store_is_writable(client: TestClient, tmp_path: Path) -> None:
    status, body = await readyz(client)
    assert status == 200, body
    assert body["status"] == "ready"
    assert set(body["storage"]) == {"registry", "proxy", "temporary"}
    for check in body["storage"].values():
        assert check["ok"] is True and check["free_bytes"] > 0
    assert body["storage"]["registry"]["path"] == str(tmp_path / "storage" / "registry")
    assert body["upstreams"] == {}
    # the write probes leave nothing behind
    leftovers = [p for p in tmp_path.rglob(".tmp-readyz-*")]
    assert leftovers == []


@contextlib.contextmanager
def read_only_bind_mount(folder: Path) -> Iterator[None]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        skip_or_fail("a read-only bind mount needs root and mount(8)")
    done = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if done.returncode != 0:
        skip_or_fail(f"cannot bind-mount here: {done.stderr.decode().strip()}")
    try:
        done = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True)
        if done.returncode != 0:
            skip_or_fail(f"cannot remount read-only: {done.stderr.decode().strip()}")
        yield
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True, check=True)


@contextlib.contextmanager
def immutable(folder: Path) -> Iterator[None]:
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        skip_or_fail("chattr +i needs root and chattr(1)")
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if done.returncode != 0:
        skip_or_fail(f"this filesystem has no immutable flag: {done.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True, check=True)


async def test_read_only_store_is_not_ready(client: TestClient, tmp_path: Path) -> None:
    registry = tmp_path / "storage" / "registry"
    with read_only_bind_mount(registry):
        status, body = await readyz(client)
        assert status == 503, body
        assert body["status"] == "not ready"
        check = body["storage"]["registry"]
        assert check["ok"] is False
        assert "read-only" in check["error"]
        assert body["storage"]["proxy"]["ok"] is True
        assert body["storage"]["temporary"]["ok"] is True
        assert (await client.get("/healthz")).status == 200  # alive all the same
    status, body = await readyz(client)
    assert status == 200, body


async def test_immutable_blob_folder_is_not_ready(client: TestClient, tmp_path: Path) -> None:
    """Only the folder commits rename into is blocked: the probe file alone would pass."""
    blobs = tmp_path / "storage" / "proxy" / "blobs"
    with immutable(blobs):
        status, body = await readyz(client)
        assert status == 503, body
        assert body["storage"]["proxy"]["ok"] is False
        assert str(blobs) in body["storage"]["proxy"]["error"]
        assert body["storage"]["registry"]["ok"] is True
    assert (await readyz(client))[0] == 200


async def test_too_little_free_space_is_not_ready(tmp_path: Path) -> None:
    client = await start_client(make_config(tmp_path, health={"min_free_space": "1000PiB"}))
    try:
        status, body = await readyz(client)
        assert status == 503
        for check in body["storage"].values():
            assert check["ok"] is False
            assert "health.min_free_space" in check["error"]
    finally:
        await client.close()


def test_permission_bits_count_for_a_user_without_dac_override(tmp_path: Path) -> None:
    """What the systemd unit's own user meets after a `chmod a-w` on its storage."""
    folder = tmp_path / "store"
    folder.mkdir()
    folder.chmod(0o555)
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from regproxy.server.health import check_folder\n"
        "print(json.dumps(check_folder(Path(sys.argv[1]), (), 0)))\n"
    )
    argv = [sys.executable, "-c", code, str(folder)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            skip_or_fail("running as root without setpriv: cannot drop CAP_DAC_OVERRIDE")
        argv = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *argv]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
    finally:
        folder.chmod(0o755)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] is False
    assert "not writable" in result["error"]


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_upstream_reachability_is_reported_not_required(tmp_path: Path) -> None:
    upstream = await start_client(make_config(tmp_path / "upstream"))
    client = None
    try:
        url = str(upstream.make_url("")).rstrip("/")
        dead = f"http://127.0.0.1:{_dead_port()}"
        client = await start_client(
            make_config(
                tmp_path / "proxy",
                proxy={"upstreams": {"up": {"url": url}, "down": {"url": dead}}},
            )
        )
        status, body = await readyz(client)
        assert status == 200
        assert set(body["upstreams"]) == {"up", "down"}  # not probed yet: reachable null

        async def probed() -> bool:
            _, body = await readyz(client)
            return all(u["reachable"] is not None for u in body["upstreams"].values())

        await wait_until(probed, what="the background upstream probe")
        status, body = await readyz(client)
        assert status == 200, body  # an unreachable upstream never fails readiness
        assert body["status"] == "ready"
        assert body["upstreams"]["up"]["reachable"] is True
        assert body["upstreams"]["up"]["url"] == url
        assert body["upstreams"]["down"]["reachable"] is False
        assert body["upstreams"]["down"]["error"]
    finally:
        if client is not None:
            await client.close()
        await upstream.close()


async def test_readyz_reads_what_the_last_upstream_request_saw(tmp_path: Path) -> None:
    """Between probes, a failed and then a successful pull move the upstream's state."""
    fake = FakeUpstream()
    await fake.start()
    fake.add_image("lib/app", "v1")
    client = await start_client(
        make_config(tmp_path, proxy={"upstreams": {"fake": {"url": fake.url}}})
    )
    try:

        async def probed() -> bool:
            return (await readyz(client))[1]["upstreams"]["fake"]["reachable"] is not None

        await wait_until(probed, what="the background upstream probe")
        assert (await readyz(client))[1]["upstreams"]["fake"]["reachable"] is True

        fake.fail(503, kinds={"manifest"})
        pulled = await fetch(client, "GET", "/v2/p/fake/lib/app/manifests/v1")
        assert pulled.status >= 500
        state = client.app[PROXY].upstreams["fake"].state  # what /readyz reports
        assert state.reachable is False and state.last_error == "HTTP 503"
        status, body = await readyz(client)
        assert status == 200  # an upstream never fails readiness
        assert body["upstreams"]["fake"]["reachable"] is False
        assert body["upstreams"]["fake"]["error"] == "HTTP 503"

        fake.clear_faults()
        assert (await fetch(client, "GET", "/v2/p/fake/lib/app/manifests/v1")).status == 200
        entry = (await readyz(client))[1]["upstreams"]["fake"]
        assert entry["reachable"] is True and "error" not in entry
        assert entry["checked_at"] == state.last_ok
    finally:
        await client.close()
        await fake.close()
