"""regproxy inside the test process: a configuration under a temp dir and a real server.

In-process servers start in milliseconds and let a test reach into the app, so most tests
use these; `processes.RegproxyProcess` is for what only a separate process shows (signals,
crashes, the command line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from regproxy import config as config_mod
from regproxy.config import Config
from regproxy.server.app import create_app


def make_config(tmp_path: Path, **extra: Any) -> Config:
    """A configuration with the seed's three storage keys under `tmp_path`."""
    raw: dict[str, Any] = {
        "registry_storage": "storage/registry",
        "temporary_registry_storage": "storage/_tmp",
        "proxy_storage": "storage/proxy",
        **extra,
    }
    return config_mod.from_mapping(raw, tmp_path, environ={})


async def start_client(config: Config) -> TestClient:
    """A real aiohttp server for `config` on 127.0.0.1:<ephemeral>, and a client for it."""
    client = TestClient(TestServer(create_app(config), host="127.0.0.1", port=0))
    await client.start_server()
    return client
