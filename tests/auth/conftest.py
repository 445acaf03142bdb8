"""Fixtures for the access-control tests: an upstream regproxy and an authenticating one.

`registry_factory(mode, **keys)` starts an in-process regproxy with the test users and
rules (`helpers.RULES`) whose proxy upstream `up` is a second, open regproxy holding
`lib/app:v1`; the authenticating one holds `public/app`, `alice/app` and `misc/app`,
each tagged `v1` (to pull) and `d` (to delete).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiohttp.test_utils import TestClient

from regproxy.config import Config
from tests.auth.helpers import PASSWORDS, auth_config
from tests.support.digests import sha256
from tests.support.inprocess import make_config, start_client
from tests.support.oci import Image, make_image

LOCAL_REPOS = ("public/app", "alice/app", "misc/app")
PROXY_REPO = "p/up/lib/app"
#: who may push each local repository in the setup
SEEDER = {"public/app": "alice", "alice/app": "alice", "misc/app": "bob"}


def auth_header(user: str) -> dict[str, str]:
    pair = f"{user}:{PASSWORDS[user]}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode()}


async def push_image(
    client: TestClient, name: str, image: Image, tags: tuple[str, ...], user: str | None
) -> None:
    """Push blobs and manifest with Basic credentials (accepted in both modes)."""
    headers = auth_header(user) if user else {}
    for blob in image.blobs:
        url = f"/v2/{name}/blobs/uploads/?digest={sha256(blob)}"
        async with client.post(url, data=blob, headers=headers) as resp:
            assert resp.status == 201, await resp.text()
    for tag in tags:
        async with client.put(
            f"/v2/{name}/manifests/{tag}",
            data=image.manifest,
            headers={**headers, "Content-Type": image.media_type},
        ) as resp:
            assert resp.status == 201, await resp.text()


@dataclass
class Registry:
    client: TestClient
    config: Config
    mode: str
    upstream: TestClient
    images: dict[str, Image]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client.port}"


class RegistryFactory(Protocol):
    def __call__(
        self,
        mode: str = "token",
        auth: dict[str, Any] | None = None,
        seed: bool = True,
        **top: Any,
    ) -> Awaitable[Registry]: ...


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[tuple[TestClient, Image]]:
    """An open regproxy with `lib/app:v1`, the upstream `up` of the registries under test."""
    client = await start_client(make_config(tmp_path / "upstream"))
    image = make_image((700, 900))
    try:
        await push_image(client, "lib/app", image, ("v1",), None)
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
                await push_image(client, name, images[name], ("v1", "d"), SEEDER[name])
        return Registry(client, config, mode, up_client, images)

    try:
        yield factory
    finally:
        for client in started:
            await client.close()
