"""Fixtures for the operator-command tests: a real regproxy as the upstream registry.

`upstream` is an in-process regproxy on 127.0.0.1:<ephemeral> that records every
request it answers (method and path), so tests can prove what a prefetch asked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from regproxy.config import Config
from regproxy.server.app import create_app
from tests.cli.helpers import load, write_config
from tests.support.inprocess import make_config, start_client


@dataclass
class Upstream:
    client: TestClient
    config: Config
    requests: list[tuple[str, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.client.port}"

    def asked(self, method: str | None = None, part: str = "") -> list[tuple[str, str]]:
        return [
            (m, p)
            for m, p in self.requests
            if (method is None or m == method) and part in p and p != "/v2/"
        ]


async def start_recording(config: Config) -> Upstream:
    app = create_app(config)
    upstream = Upstream(TestClient(TestServer(app, host="127.0.0.1", port=0)), config)

    async def record(request: web.Request, _response: web.StreamResponse) -> None:
        upstream.requests.append((request.method, request.path))

    app.on_response_prepare.append(record)
    await upstream.client.start_server()
    return upstream


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[Upstream]:
    up = await start_recording(make_config(tmp_path / "upstream"))
    try:
        yield up
    finally:
        await up.client.close()


@dataclass
class Registry:
    """A configuration file, the config it loads to, and a server running on it."""

    path: Path
    config: Config
    client: TestClient


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    """regproxy serving the stores of a configuration file the commands can be pointed at."""
    path = write_config(tmp_path / "site", extra='proxy_max_size = "10GiB"')
    config = load(path)
    client = await start_client(config)
    try:
        yield Registry(path, config, client)
    finally:
        await client.close()
