"""Several workers in the tests: in-process "workers" on one temp folder, a real `serve
--workers 2`, and clients pinned to one worker.

`start_workers(config, 2)` runs two apps built as workers 1 and 2 of one `serve` (same
configuration, same temp folder, `create_app(config, Worker(n, 2, folder))`) in the test's
event loop, each on its own port: a test says exactly which worker gets which request.
`WorkersProcess` is `regproxy serve` with `[server] workers`, for what only processes
show (the supervisor, signals, SO_REUSEPORT, a worker killed); `pinned` gives a client
whose one keep-alive connection is accepted by a chosen worker of it.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestClient, TestServer

from regproxy.config import Config
from regproxy.server.app import create_app
from regproxy.server.workers import REPLICA_HEADER, Worker, folder_of
from tests.support.processes import RegproxyProcess


async def start_workers(config: Config, count: int = 2) -> list[TestClient]:
    """`count` apps as the workers of one `serve` on `config`, each with a client."""
    folder = folder_of(config)
    (folder / "metrics").mkdir(parents=True, exist_ok=True)
    clients = []
    for number in range(1, count + 1):
        app = create_app(config, Worker(number, count, folder))
        client = TestClient(TestServer(app, host="127.0.0.1", port=0))
        await client.start_server()
        clients.append(client)
    return clients


class WorkersProcess(RegproxyProcess):
    """`regproxy serve` with `workers` processes; `pids()` are the workers'."""

    LISTENING = re.compile(r"listening on https?://127\.0\.0\.1:(\d+) \((\d+) workers\)")

    def __init__(self, workdir: Path, *, workers: int = 2, extra_config: str = "", **kw) -> None:
        server = f"[server]\nworkers = {workers}\n"
        if "[server]" in extra_config:
            extra_config = extra_config.replace("[server]\n", server, 1)
        else:
            extra_config = server + extra_config
        super().__init__(workdir, extra_config=extra_config, **kw)
        self.workers = workers

    @property
    def supervisor(self) -> int:
        assert self.process is not None and self.process.pid is not None
        return self.process.pid

    def pids(self) -> dict[int, int]:
        """{worker number: pid} of the supervisor's live children, from /proc."""
        found = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry.name}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            if int(fields[1]) == self.supervisor and comm.startswith("regproxy-w"):
                found[int(comm.removeprefix("regproxy-w"))] = int(entry.name)
        return found

    def kill_worker(self, number: int, sig: int = signal.SIGKILL) -> int:
        pid = self.pids()[number]
        os.kill(pid, sig)
        return pid

    def replica(self, number: int) -> str:
        return f"{self.hostname()}-{number}"

    def hostname(self) -> str:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=5) as resp:
                headers = resp.headers
        except urllib.error.HTTPError as exc:  # 401 with auth on: named all the same
            headers = exc.headers
        return str(headers[REPLICA_HEADER]).rsplit("-", 1)[0]


async def pinned(
    url: str, replica: str, *, attempts: int = 64, connector_ssl: ssl.SSLContext | None = None
) -> aiohttp.ClientSession:
    """A client session whose single keep-alive connection is served by `replica` (new
    connections are spread by the kernel: try until one lands there)."""
    for _ in range(attempts):
        session = aiohttp.ClientSession(
            base_url=url,
            connector=aiohttp.TCPConnector(limit=1, ssl=connector_ssl or True),
            timeout=aiohttp.ClientTimeout(total=60),
        )
        async with session.get("/v2/") as resp:
            await resp.read()
            if resp.headers.get(REPLICA_HEADER) == replica:
                return session
        await session.close()
    raise AssertionError(f"no connection to {replica} in {attempts} tries")


async def replicas_answering(url: str, requests: int = 40) -> set[str]:
    """The replicas that answer `requests` requests, each on a new connection."""
    seen = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for _ in range(requests):
            async with session.get(f"{url}/v2/") as resp:
                seen.add(resp.headers[REPLICA_HEADER])
    return seen


async def wait_until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `condition()` (sync or async) until it is true."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
