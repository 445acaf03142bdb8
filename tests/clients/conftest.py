"""Fixtures for end-to-end tests with real registry clients.

``registry`` is regproxy by default; ``RP_TEST_AGAINST=reference`` runs the very
same tests against Docker's Go registry instead, which is how the tests themselves are
validated: whatever passes against the reference is behaviour regproxy must match.
"""

from __future__ import annotations

import os
import re
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.clients.proxy_fixtures import (  # noqa: F401 (fixtures of the test_proxy_* modules)
    proxy_mirror_upstream,
    pull_through,
    refused_url,
    upstream_kind,
)
from tests.support.dockerd import DockerDaemon
from tests.support.processes import (
    ReferenceRegistry,
    RegistryServer,
    RegproxyProcess,
)

TARGETS = ("regproxy", "reference")


def registry_target() -> str:
    target = os.environ.get("RP_TEST_AGAINST", "regproxy").strip() or "regproxy"
    if target not in TARGETS:
        raise pytest.UsageError(f"RP_TEST_AGAINST must be one of {TARGETS}, not {target!r}")
    return target


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


@pytest.fixture(scope="session")
def dockerd() -> Iterator[DockerDaemon]:
    """One private dockerd (and its containerd) shared by the whole session: ~0.2 s to
    start, but docker and ctr tests would otherwise each pay for it."""
    daemon = DockerDaemon()
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


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
