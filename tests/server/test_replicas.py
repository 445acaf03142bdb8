"""Replicas on one shared store, each with its own temporary folder (as on separate hosts).

Requests for an upload session or a blob being fetched that land on a replica other than
the one holding it are relayed to the holder (`server.forward`, `storage.replicas`). Real
servers on loopback ports, in this process; `tests/replicas/` runs separate processes
behind HAProxy with real clients.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from regproxy import config as config_mod
from regproxy.server.forward import FORWARDED_HEADER
from regproxy.server.keys import REPLICAS
from regproxy.server.workers import REPLICA_HEADER
from tests.support.auth import auth_config, auth_header
from tests.support.certs import TestCA
from tests.support.digests import sha256
from tests.support.fake_upstream import FakeUpstream
from tests.support.oci import envelope_codes
from tests.support.processes import free_port
from tests.support.served import ServedRegistry, serve_registry, upload_id

NAME = "team/app"


@pytest.fixture
async def start_replicas(tmp_path: Path) -> AsyncIterator[Any]:
    started: list[ServedRegistry] = []

    async def start(
        count: int = 2, client_ssl: ssl.SSLContext | None = None, **extra: Any
    ) -> list[ServedRegistry]:
        shared = tmp_path / "shared"
        server = extra.pop("server", {})
        for n in range(count):
            port = free_port()
            raw: dict[str, Any] = {
                "registry_storage": str(shared / "registry"),
                "proxy_storage": str(shared / "proxy"),
                "temporary_registry_storage": str(tmp_path / f"host{n}"),
                "server": {
                    "listen": f"127.0.0.1:{port}",
                    "replica_name": f"r{n}",
                    "advertise_url": f"{'https' if client_ssl else 'http'}://127.0.0.1:{port}",
                    **server,
                },
                **extra,
            }
            config = config_mod.from_mapping(raw, tmp_path, environ={})
            started.append(await serve_registry(config, port=port, client_ssl=client_ssl))
        return started[-count:]

    try:
        yield start
    finally:
        for served in started:
            await served.close()


async def test_a_chunked_upload_continues_on_whichever_replica_gets_each_request(
    start_replicas: Any,
) -> None:
    a, b = await start_replicas()
    assert a.app[REPLICAS].own.id != b.app[REPLICAS].own.id
    chunks = [os.urandom(3 * 1024 * 1024 + 17), os.urandom(70_000), os.urandom(1_000_000)]
    data = b"".join(chunks)

    resp = await a.http.post(f"/v2/{NAME}/blobs/uploads/")
    assert resp.status == 202
    location = resp.headers["Location"]
    assert upload_id(location).startswith(a.app[REPLICAS].own.id)

    offset = 0
    for served, chunk in ((b, chunks[0]), (a, chunks[1])):
        resp = await served.http.patch(
            location,
            data=chunk,
            headers={"Content-Range": f"{offset}-{offset + len(chunk) - 1}"},
        )
        assert resp.status == 202, await resp.text()
        offset += len(chunk)
        assert resp.headers["Range"] == f"0-{offset - 1}"
        assert resp.headers[REPLICA_HEADER] == served.config.server.replica_name
        assert resp.headers["Location"] == location

    resp = await b.http.get(location)  # the status, asked of the replica not holding it
    assert resp.status == 204
    assert resp.headers["Range"] == f"0-{offset - 1}"

    # the rest, streamed without a length, with the PUT
    async def last_chunk() -> AsyncIterator[bytes]:
        for start in range(0, len(chunks[2]), 100_000):
            yield chunks[2][start : start + 100_000]

    resp = await b.http.put(location, params={"digest": sha256(data)}, data=last_chunk())
    assert resp.status == 201, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == sha256(data)
    for served in (a, b):
        resp = await served.http.get(f"/v2/{NAME}/blobs/{sha256(data)}")
        assert resp.status == 200
        assert await resp.read() == data
    # the session is gone on its own host
    assert not (a.uploads_root / upload_id(location)).exists()
    resp = await b.http.get(location)
    assert resp.status == 404
    assert envelope_codes(await resp.read()) == ["BLOB_UPLOAD_UNKNOWN"]


async def test_replicas_serving_tls_relay_to_each_other_over_tls(
    start_replicas: Any, tmp_path: Path
) -> None:
    """Each replica trusts the certificate it serves itself (issued by a private CA here,
    the leaf alone in the file) when it relays to another."""
    ca = TestCA(tmp_path / "ca")
    cert = ca.issue(tmp_path / "cert")
    client_ssl = ssl.create_default_context(cafile=str(ca.ca_file))
    tls = {"tls_certificate": str(cert.certificate), "tls_key": str(cert.key)}
    a, b = await start_replicas(client_ssl=client_ssl, server=tls)
    resp = await a.http.post(f"/v2/{NAME}/blobs/uploads/")
    location = resp.headers["Location"]
    data = os.urandom(2 * 1024 * 1024)
    resp = await b.http.put(location, params={"digest": sha256(data)}, data=data)
    assert resp.status == 201, await resp.text()
    resp = await a.http.get(f"/v2/{NAME}/blobs/{sha256(data)}")
    assert await resp.read() == data


async def test_a_relayed_request_is_authenticated_by_the_holder(
    start_replicas: Any, tmp_path: Path
) -> None:
    a, b = await start_replicas(auth=auth_config(tmp_path, mode="basic"))
    resp = await a.http.post(f"/v2/{NAME}/blobs/uploads/", headers=auth_header("alice"))
    assert resp.status == 202, await resp.text()
    location = resp.headers["Location"]
    data = os.urandom(10_000)
    # without credentials the relaying replica refuses it itself
    resp = await b.http.patch(location, data=data)
    assert resp.status == 401
    resp = await b.http.put(
        location, params={"digest": sha256(data)}, data=data, headers=auth_header("alice")
    )
    assert resp.status == 201, await resp.text()
    resp = await a.http.get(f"/v2/{NAME}/blobs/{sha256(data)}", headers=auth_header("alice"))
    assert await resp.read() == data


async def test_a_session_whose_replica_is_gone_is_unknown_and_a_new_one_works(
    start_replicas: Any,
) -> None:
    a, b = await start_replicas()
    resp = await a.http.post(f"/v2/{NAME}/blobs/uploads/")
    location = resp.headers["Location"]
    await a.stop()
    started = time.monotonic()
    resp = await b.http.patch(location, data=b"x" * 1000)
    assert resp.status == 404
    body = await resp.read()
    assert envelope_codes(body) == ["BLOB_UPLOAD_UNKNOWN"]
    assert "r0" in json.loads(body)["errors"][0]["message"]
    assert time.monotonic() - started < 5
    # the client starts over (as docker does), on the replica still serving
    data = os.urandom(5000)
    resp = await b.http.post(
        f"/v2/{NAME}/blobs/uploads/", params={"digest": sha256(data)}, data=data
    )
    assert resp.status == 201


async def test_a_relayed_request_is_never_relayed_again(start_replicas: Any) -> None:
    a, b = await start_replicas()
    resp = await a.http.post(f"/v2/{NAME}/blobs/uploads/")
    location = resp.headers["Location"]
    resp = await b.http.patch(location, data=b"abc", headers={FORWARDED_HEADER: "someone"})
    assert resp.status == 404
    assert envelope_codes(await resp.read()) == ["BLOB_UPLOAD_UNKNOWN"]
    assert a.data_file(location).stat().st_size == 0


@pytest.mark.parametrize(
    "session",
    [
        "deadbeef" + "0" * 24,  # a replica nobody registered
        "..%2F..%2F" + "0" * 22,  # a path in the replica id's place
        "0" * 31,  # too short
        "ABCDEF12" + "0" * 24,  # not lowercase hex
    ],
)
async def test_made_up_session_ids_are_unknown_and_dial_nobody(
    start_replicas: Any, session: str
) -> None:
    a, _b = await start_replicas()
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        resp = await a.http.request(method, f"/v2/{NAME}/blobs/uploads/{session}", data=b"x")
        assert resp.status in (400, 404), (method, resp.status)
        assert envelope_codes(await resp.read())[0] in ("BLOB_UPLOAD_UNKNOWN", "NAME_INVALID")


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


def _proxy_table(fake: FakeUpstream) -> dict[str, Any]:
    return {"upstreams": {"up": {"url": fake.url}}}


async def test_concurrent_cold_pulls_through_two_replicas_fetch_upstream_once(
    start_replicas: Any, upstream: FakeUpstream
) -> None:
    data = os.urandom(6 * 1024 * 1024)
    digest = upstream.add_blob("lib/big", data)
    upstream.faults.chunk_delay = 0.01  # about a second upstream: the pulls overlap
    replicas = await start_replicas(proxy=_proxy_table(upstream))

    async def pull(served: ServedRegistry) -> bytes:
        resp = await served.http.get(f"/v2/p/up/lib/big/blobs/{digest}")
        assert resp.status == 200
        return await resp.read()

    bodies = await asyncio.gather(*(pull(replicas[n % 2]) for n in range(8)))
    assert all(body == data for body in bodies)
    assert upstream.count("GET", "blob") == 1
    assert upstream.bytes_sent("blob") == len(data)
    claims = Path(replicas[0].config.proxy_storage) / "claims"
    assert not [p for p in claims.rglob("*") if p.is_file()]  # released when done


async def test_a_claim_whose_holder_cannot_be_reached_is_fetched_here(
    start_replicas: Any, upstream: FakeUpstream
) -> None:
    data = os.urandom(100_000)
    digest = upstream.add_blob("lib/small", data)
    (a,) = await start_replicas(1, proxy=_proxy_table(upstream))
    registry, proxy = Path(a.config.registry_storage), Path(a.config.proxy_storage)
    (registry / "replicas").mkdir(exist_ok=True)
    dead = {"id": "0badf00d", "url": f"http://127.0.0.1:{free_port()}", "name": "gone"}
    (registry / "replicas" / "0badf00d").write_text(json.dumps(dead))
    claim = proxy / "claims" / "sha256" / digest.removeprefix("sha256:")
    claim.parent.mkdir(parents=True)
    claim.write_text(json.dumps({"replica": "0badf00d", "expires": time.time() + 600}))
    resp = await a.http.get(f"/v2/p/up/lib/small/blobs/{digest}")
    assert resp.status == 200
    assert await resp.read() == data
    assert upstream.count("GET", "blob") == 1
