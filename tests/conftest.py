"""Fixtures shared by every test folder; what they build lives in `tests/support`."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from regproxy.config import Config
from tests.support.dockerd import DockerDaemon
from tests.support.fake_upstream import FakeUpstream
from tests.support.inprocess import make_config, start_client
from tests.support.podman import Podman
from tests.support.seaweed import SeaweedS3
from tests.support.skopeo import Skopeo

#: upstream traffic honours these as curl does, loopback included (regproxy/proxy/upstream.py)
PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")


@pytest.fixture(autouse=True, scope="session")
def no_forward_proxy_from_the_environment() -> Iterator[None]:
    """A machine that reaches the internet through a proxy (HTTPS_PROXY in its
    environment) must not send the suite's loopback upstreams through it; the tests of
    forward proxies set the variables themselves."""
    saved = {
        name: os.environ.pop(name)
        for base in PROXY_VARIABLES
        for name in (base, base.upper())
        if name in os.environ
    }
    try:
        yield
    finally:
        os.environ.update(saved)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


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


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    """A fault-injecting upstream on 127.0.0.1 (registry port + CDN port)."""
    upstream = FakeUpstream()
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()


@pytest.fixture(scope="session")
def dockerd() -> Iterator[DockerDaemon]:
    """One private dockerd (and its containerd) for the whole session: a few tenths of a
    second to start, but the docker and ctr tests of several folders would each pay it."""
    daemon = DockerDaemon()
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 engine for the whole session (~1 s to start, 2-4 s to stop,
    120-250 MiB); tests keep apart by bucket (`s3_bucket`)."""
    engine = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def s3_bucket(seaweed: SeaweedS3) -> str:
    """A fresh, empty bucket of the session's SeaweedFS for this test alone."""
    return seaweed.create_bucket()
