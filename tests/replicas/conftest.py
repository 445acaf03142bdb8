"""Fixtures of the replica tests: regproxy processes on one shared store (a folder, or
a SeaweedFS bucket), each with its own temporary folder as on separate hosts, behind a
round-robin HAProxy with no stickiness (tests/support/replicas.py, haproxy.py)."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from tests.support.replicas import STORE_KINDS, Cluster, S3Store, cluster_store


@pytest.fixture(scope="module", params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture(scope="module")
def shared_store(store_kind: str, request: pytest.FixtureRequest) -> str | S3Store:
    """`"folder"`, or a fresh bucket of the session's SeaweedFS (started only for S3)."""
    engine = request.getfixturevalue("seaweed") if store_kind == "s3" else None
    return cluster_store(store_kind, engine)


@pytest.fixture(scope="module")
def cluster(
    shared_store: str | S3Store, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Three replicas r1, r2, r3 and HAProxy, for one test module and store kind; tests
    keep apart by repository name."""
    with Cluster(tmp_path_factory.mktemp("replicas"), count=3, store=shared_store) as running:
        yield running


@pytest.fixture
def fresh_store(store_kind: str, request: pytest.FixtureRequest) -> str | S3Store:
    """A store of the module's kind for a cluster of the test's own (a new bucket on S3;
    a cluster's shared folder is its own already)."""
    engine = request.getfixturevalue("seaweed") if store_kind == "s3" else None
    return cluster_store(store_kind, engine)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach every replica's and HAProxy's log tail: which replica took which
    request is the first question."""
    report: pytest.TestReport = yield
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Cluster):
                report.sections.append(("replica logs (last lines)", value.logs()))
    return report
