"""Fixtures for the access-control tests: an upstream regproxy and an authenticating one.

`registry_factory(mode, **keys)` starts an in-process regproxy with the test users and
rules (`tests.support.auth.RULES`) whose proxy upstream `up` is a second, open regproxy
holding `lib/app:v1`; the authenticating one holds `public/app`, `alice/app` and `misc/app`,
each tagged `v1` (to pull) and `d` (to delete).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.support.auth import (
    LOCAL_REPOS,
    PROXY_REPO,
    SEEDER,
    Registry,
    RegistryFactory,
    auth_config,
    push_image_as,
)
from tests.support.inprocess import make_config, start_client
from tests.support.oci import Image, make_image


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[tuple[TestClient, Image]]:
    """An open regproxy with `lib/app:v1`, the upstream `up` of the registries under test."""
    client = await start_client(make_config(tmp_path / "upstream"))
    image = make_image((700, 900))
    try:
        await push_image_as(client, "lib/app", image, ("v1",), None)
        yield client, image
    finally:
        await client.close()


@pytest.fixture
async def registry_factory(
    tmp_path: Path, upstream: tuple[TestClient, Image]
) -> AsyncIterator[RegistryFactory]:
    started: list[TestClient] = []
    up_client, up_image = upstream

    async def factory(
        mode: str = "token", auth: dict[str, Any] | None = None, seed: bool = True, **top: Any
    ) -> Registry:
        base = tmp_path / f"registry{len(started)}"
        base.mkdir()
        proxy = {"upstreams": {"up": {"url": f"http://127.0.0.1:{up_client.port}"}}}
        config = make_config(base, auth=auth_config(base, mode, **(auth or {})), proxy=proxy, **top)
        client = await start_client(config)
        started.append(client)
        images = {PROXY_REPO: up_image}
        if seed:
            for name in LOCAL_REPOS:
                images[name] = make_image((300, 500))
                await push_image_as(client, name, images[name], ("v1", "d"), SEEDER[name])
        return Registry(client, config, mode, up_client, images)

    try:
        yield factory
    finally:
        for client in started:
            await client.close()
