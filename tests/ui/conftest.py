"""Fixtures of the web page's in-process tests: regproxy with images pushed, open or with auth."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from regproxy import manifest as mf
from tests.support.auth import auth_config, auth_header
from tests.support.inprocess import make_config, start_client
from tests.support.oci import Image, make_artifact, make_image, make_index, push_image

#: `team/*` for signed-in users, everything else for everybody (issue 15's example)
RULES: list[dict[str, Any]] = [
    {"repository": "team/*", "pull": ["@authenticated"], "push": ["alice"], "delete": []},
    {"repository": "*", "pull": ["anonymous"], "push": ["alice"], "delete": []},
]
SIGNATURE_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"


@dataclass
class Pushed:
    client: TestClient
    app_image: Image
    signature: Image
    index_digest: str
    children: list[Image]


async def push_examples(client: TestClient, headers: dict[str, str] | None = None) -> Pushed:
    """`team/app:v1,latest` (+ a signature), `team/multi:v2` (an index of two platforms),
    `tools/cli:1.0`, `web/frontend:latest`."""
    image = make_image()
    await push_image(client, "team/app", image, "v1", "latest", headers=headers)
    signature = make_artifact(SIGNATURE_TYPE, subject=image)
    await push_image(client, "team/app", signature, signature.digest, headers=headers)
    children = [make_image(), make_image()]
    for child in children:
        await push_image(client, "team/multi", child, child.digest, headers=headers)
    data, digest = make_index(children)
    resp = await client.put(
        "/v2/team/multi/manifests/v2",
        data=data,
        headers={"Content-Type": mf.OCI_INDEX, **(headers or {})},
    )
    assert resp.status == 201, await resp.text()
    await push_image(client, "tools/cli", make_image(), "1.0", headers=headers)
    await push_image(client, "web/frontend", make_image(), "latest", headers=headers)
    return Pushed(client, image, signature, digest, children)


@pytest.fixture
async def open_ui(tmp_path: Path) -> AsyncIterator[Pushed]:
    """regproxy without auth, the examples pushed, the overview always fresh."""
    config = make_config(tmp_path, ui={"refresh_interval": 0})
    client = await start_client(config)
    try:
        yield await push_examples(client)
    finally:
        await client.close()


@pytest.fixture
async def auth_ui(tmp_path: Path) -> AsyncIterator[Pushed]:
    """regproxy with `[auth]` (token mode, RULES), the examples pushed by alice."""
    config = make_config(
        tmp_path, ui={"refresh_interval": 0}, auth=auth_config(tmp_path, rules=RULES)
    )
    client = await start_client(config)
    try:
        yield await push_examples(client, auth_header("alice"))
    finally:
        await client.close()


_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    match = _CSRF.search(html)
    assert match, html
    return match.group(1)


def repo_names(html: str) -> list[str]:
    """Repositories listed on the overview (hidden rows included)."""
    return re.findall(r'<tr data-name="([^"]+)"', html)


def shown_names(html: str) -> list[str]:
    return re.findall(r'<tr data-name="([^"]+)">', html)
