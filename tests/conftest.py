"""Shared fixtures: configurations in temp dirs and an in-process server on an ephemeral port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from regproxy import config as config_mod
from regproxy.config import Config
from regproxy.server.app import create_app
from tests.support.podman import Podman
from tests.support.skopeo import Skopeo


def make_config(tmp_path: Path, **extra: Any) -> Config:
    """A configuration with the seed's three storage keys under `tmp_path`."""
    raw: dict[str, Any] = {
        "registry_storage": "storage/registry",
        "temporary_registry_storage": "storage/_tmp",
        "proxy_storage": "storage/proxy",
        **extra,
    }
    return config_mod.from_mapping(raw, tmp_path, environ={})


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


async def start_client(config: Config) -> TestClient:
    client = TestClient(TestServer(create_app(config), host="127.0.0.1", port=0))
    await client.start_server()
    return client


@pytest.fixture
async def client(config: Config) -> AsyncIterator[TestClient]:
    """A real aiohttp server on 127.0.0.1:<ephemeral> and a client session for it."""
    client = await start_client(config)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def skopeo(tmp_path: Path) -> Skopeo:
    """skopeo with its own state folder (auth files, policy) per test."""
    return Skopeo(tmp_path / "skopeo")


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Podman]:
    """Fresh podman storage per test, so every pull really downloads."""
    instance = Podman(tmp_path / "podman")
    try:
        yield instance
    finally:
        instance.close()
