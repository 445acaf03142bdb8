"""Fixtures for end-to-end tests with real registry clients.

``registry`` is regproxy by default; ``RP_TEST_AGAINST=reference`` runs the very
same tests against Docker's Go registry instead, which is how the tests themselves are
validated: whatever passes against the reference is behaviour regproxy must match.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.support.dockerd import DockerDaemon
from tests.support.processes import (
    ReferenceRegistry,
    RegistryServer,
    RegproxyProcess,
    registry_target,
)
from tests.support.pull_through import (
    UPSTREAM_KINDS,
    PullThrough,
    refusing_port,
    running_pull_through,
)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A running registry for one test module; tests keep apart by repository name.

    Module scope keeps start-up cost off every test while a crash in one module cannot
    leak into the next.
    """
    workdir = tmp_path_factory.mktemp("registry")
    server: RegistryServer
    if registry_target() == "reference":
        server = ReferenceRegistry(workdir)
    else:
        server = RegproxyProcess(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def docker(dockerd: DockerDaemon) -> Iterator[DockerDaemon]:
    """The session's dockerd, emptied after each test so the next one's pulls download."""
    try:
        yield dockerd
    finally:
        dockerd.remove_all_images()


@pytest.fixture(scope="module")
def refused_url() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` that refuses connections, for one module."""
    with refusing_port() as url:
        yield url


@pytest.fixture(scope="module", params=UPSTREAM_KINDS)
def upstream_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture(scope="module")
def proxy_mirror_upstream() -> str | None:
    """``proxy.mirror_upstream`` of the proxy; a module overrides this fixture to set it."""
    return None


@pytest.fixture(scope="module")
def pull_through(
    upstream_kind: str,
    proxy_mirror_upstream: str | None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PullThrough]:
    """An upstream of ``upstream_kind`` and a regproxy caching it, for one test module."""
    if registry_target() != "regproxy":
        pytest.skip("pull-through tests exercise regproxy's cache; no reference to run them on")
    workdir = tmp_path_factory.mktemp(f"pull-through-{upstream_kind}")
    with running_pull_through(upstream_kind, workdir, proxy_mirror_upstream) as setup:
        yield setup


@pytest.fixture
def repo(request: pytest.FixtureRequest) -> str:
    """A repository name unique to the test (registries are shared per module)."""
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    return f"clients/{module}/{name}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach the tail of the server logs: the client's error alone rarely
    says what the registry did wrong."""
    report: pytest.TestReport = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        for name in ("registry", "dockerd", "pull_through"):
            server = funcargs.get(name)
            if server is not None and hasattr(server, "log_tail"):
                report.sections.append((f"{name} log (last lines)", server.log_tail()))
    return report


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by `-m`
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test here `clients`: the slowest group, which the inner loop can leave
    out with `-m "not clients"` (CI runs everything)."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.clients)
