"""Logs: JSON lines parse and carry the fields; text lines stay combined-format; request ids."""

from __future__ import annotations

import io
import json
import logging
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from regproxy.config import LogConfig
from regproxy.server import logs
from tests.support.access_log import AccessLog
from tests.support.auth import auth_config, basic
from tests.support.digests import sha256
from tests.support.fake_upstream import FakeUpstream
from tests.support.inprocess import make_config, start_client
from tests.support.oci import push_blob
from tests.support.processes import RegproxyProcess
from tests.support.proxy import fetch

pytestmark = pytest.mark.timeout(60)

ACCESS_FIELDS = {
    "time",
    "level",
    "logger",
    "message",
    "method",
    "path",
    "query",
    "route",
    "status",
    "bytes",
    "bytes_in",
    "duration",
    "user",
    "cache",
    "request_id",
    "remote",
    "user_agent",
}
ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
MANIFEST_ROUTE = "/v2/{name}/manifests/{reference}"


class Captured:
    """Records of the `regproxy` loggers, formatted the way `serve` formats them."""

    def __init__(self, formatter: logging.Formatter) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(formatter)

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def json(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]

    def access(self) -> list[dict[str, Any]]:
        return [entry for entry in self.json() if entry["logger"] == "regproxy.access"]


def _capture(formatter: logging.Formatter) -> Iterator[Captured]:
    captured = Captured(formatter)
    logger = logging.getLogger("regproxy")
    level = logger.level
    logger.addHandler(captured.handler)
    logger.setLevel(logging.INFO)
    try:
        yield captured
    finally:
        logger.removeHandler(captured.handler)
        logger.setLevel(level)


@pytest.fixture
def json_logs() -> Iterator[Captured]:
    yield from _capture(logs.JsonFormatter())


@pytest.fixture
def text_logs() -> Iterator[Captured]:
    yield from _capture(logs.TextFormatter())


async def test_json_access_lines_carry_every_field(
    tmp_path: Path, json_logs: Captured, fake: FakeUpstream
) -> None:
    image = fake.add_image("lib/app", "v1", layer_sizes=(1500,))
    client = await start_client(
        make_config(tmp_path, proxy={"upstreams": {"fake": {"url": fake.url, "tag_ttl": 0}}})
    )
    try:
        blob = b"pushed bytes" * 100
        await push_blob(client, "team/app", blob)
        miss = await fetch(
            client,
            "GET",
            "/v2/p/fake/lib/app/manifests/v1",
            {**ACCEPT, "X-Request-ID": "trace-42", "User-Agent": "tests/1"},
        )
        assert miss.status == 200 and miss.headers["X-Request-ID"] == "trace-42"
        layer_path = f"/v2/p/fake/lib/app/blobs/{sha256(image.layers[0])}"
        first = await fetch(client, "GET", layer_path)
        assert first.cache_status == "MISS"
        resp = await client.get("/v2/_catalog?n=5")
        assert resp.status == 200
        catalog_id = resp.headers["X-Request-ID"]
        fake.fail(503)
        stale = await fetch(client, "GET", "/v2/p/fake/lib/app/manifests/v1", ACCEPT)
        assert stale.cache_status == "STALE"
    finally:
        await client.close()

    entries = json_logs.access()
    assert len(entries) == 5
    for entry in entries:
        assert set(entry) >= ACCESS_FIELDS, entry
        assert entry["level"] == "info"
        assert isinstance(entry["duration"], float) and entry["duration"] >= 0
        assert entry["user"] is None  # no authentication configured
        assert re.fullmatch(r"[0-9a-f]{16}|trace-42", entry["request_id"])
        assert entry["remote"] == "127.0.0.1"
    push, manifest, layer, catalog, stale_entry = entries
    assert push["method"] == "POST" and push["status"] == 201
    assert push["bytes_in"] == len(blob) and push["route"] == "/v2/{name}/blobs/uploads/"
    assert manifest["request_id"] == "trace-42"
    assert manifest["cache"] == "MISS" and manifest["user_agent"] == "tests/1"
    assert manifest["path"] == "/v2/p/fake/lib/app/manifests/v1"
    assert manifest["route"] == MANIFEST_ROUTE
    assert manifest["bytes"] == len(image.manifest)
    assert layer["cache"] == "MISS" and layer["bytes"] == len(image.layers[0])
    assert catalog["query"] == "n=5" and catalog["cache"] is None
    assert catalog["request_id"] == catalog_id
    assert stale_entry["cache"] == "STALE"
    # the proxy's warning about the stale answer names the request it was logged in
    warnings = [e for e in json_logs.json() if e["logger"] == "regproxy.proxy"]
    assert any(
        "stale" in w["message"] and w["request_id"] == stale_entry["request_id"] for w in warnings
    ), warnings


async def test_the_authenticated_user_is_logged(tmp_path: Path, json_logs: Captured) -> None:
    client = await start_client(make_config(tmp_path, auth=auth_config(tmp_path, mode="basic")))
    try:
        resp = await client.get("/v2/", headers={"Authorization": basic("alice")})
        assert resp.status == 200
        resp = await client.get("/v2/")
        assert resp.status == 401
    finally:
        await client.close()
    alice, anonymous = json_logs.access()
    assert alice["user"] == "alice" and alice["status"] == 200
    assert anonymous["user"] is None and anonymous["status"] == 401


async def test_text_access_line_keeps_the_combined_format(
    tmp_path: Path, text_logs: Captured
) -> None:
    client = await start_client(make_config(tmp_path))
    try:
        resp = await client.get("/v2/nothing/tags/list?n=1", headers={"User-Agent": "ua/2"})
        assert resp.status == 404
        rid = resp.headers["X-Request-ID"]
    finally:
        await client.close()
    (line,) = [line for line in text_logs.lines() if "regproxy.access" in line]
    log_file = tmp_path / "access.log"
    log_file.write_text(line + "\n")
    (entry,) = AccessLog(log_file).entries()  # what the client tests read
    assert (entry.method, entry.target, entry.status, entry.agent) == (
        "GET",
        "/v2/nothing/tags/list?n=1",
        404,
        "ua/2",
    )
    assert line.endswith(f"user=- cache=- id={rid}"), line


async def test_request_ids(tmp_path: Path) -> None:
    client = await start_client(make_config(tmp_path))
    try:
        given = await client.get("/v2/", headers={"X-Request-ID": "abc.DEF-123_x:y"})
        assert given.headers["X-Request-ID"] == "abc.DEF-123_x:y"
        made = [(await client.get("/v2/")).headers["X-Request-ID"] for _ in range(3)]
        assert all(re.fullmatch(r"[0-9a-f]{16}", rid) for rid in made)
        assert len(set(made)) == 3
        for bad in ("has space", "x" * 200, 'quote"d'):
            resp = await client.get("/v2/", headers={"X-Request-ID": bad})
            assert re.fullmatch(r"[0-9a-f]{16}", resp.headers["X-Request-ID"]), bad
        # errors carry it too
        resp = await client.get("/v2/x/manifests/y", headers={"X-Request-ID": "err-1"})
        assert resp.status == 404 and resp.headers["X-Request-ID"] == "err-1"
    finally:
        await client.close()


def test_configure_logging_levels_and_switches() -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logs.access_log.disabled)
    try:
        logs.configure_logging(LogConfig(format="json", level="warning"))
        assert root.level == logging.WARNING
        assert isinstance(root.handlers[-1].formatter, logs.JsonFormatter)
        logs.configure_logging(LogConfig(level="warning"), "debug")  # --log-level wins
        assert root.level == logging.DEBUG
        assert isinstance(root.handlers[-1].formatter, logs.TextFormatter)
        assert len(root.handlers) == 1
        logs.configure_logging(LogConfig(access=False))
        assert not logs.access_log.isEnabledFor(logging.INFO)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        logs.access_log.disabled = saved[2]
        logging.getLogger("aiohttp.access").disabled = False


def test_serve_writes_json_lines(tmp_path: Path) -> None:
    """`regproxy serve` with `[log] format = "json"`: every line it writes is a JSON object."""
    server = RegproxyProcess(tmp_path, extra_config='[log]\nformat = "json"\n')
    server.start()
    assert server.process is not None
    try:
        request = urllib.request.Request(f"{server.url}/v2/", headers={"X-Request-ID": "sub-1"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
            assert answer.headers["X-Request-ID"] == "sub-1"
        server.process.wait_for_log(r'"request_id": "sub-1"', timeout=10)
    finally:
        server.stop()
    text = server.process.log_text(current_run_only=True)
    lines = [line for line in text.splitlines() if not line.startswith("=== ")]
    entries = [json.loads(line) for line in lines]  # each one parses
    messages = [e["message"] for e in entries]
    assert any("listening on http://127.0.0.1:" in m for m in messages), messages
    assert messages[-1] == "stopped"
    (access,) = [e for e in entries if e["logger"] == "regproxy.access"]
    assert set(access) >= ACCESS_FIELDS
    assert access["status"] == 200 and access["path"] == "/v2/" and access["bytes"] == 2
