"""`regproxy serve` with `[server] workers = 2`: one address served by two processes that a
supervisor keeps running, stops, reloads and reports on as one server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.cli.helpers import assert_one_line_error, run_cli, write_config
from tests.support.auth import basic, write_htpasswd
from tests.support.certs import TestCA
from tests.support.digests import sha256
from tests.support.processes import RegproxyProcess
from tests.workers.helpers import WorkersProcess, pinned, replicas_answering, wait_until

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
REQUESTS = re.compile(r'^regproxy_http_requests_total\{method="GET",route="/v2/",status="200"\}')


@pytest.fixture
def server(tmp_path: Path) -> Iterator[WorkersProcess]:
    srv = WorkersProcess(tmp_path / "srv", extra_config='[server]\nshutdown_timeout = "10s"\n')
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


async def push_blob(url: str, data: bytes, name: str = "app") -> str:
    digest = sha256(data)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{url}/v2/{name}/blobs/uploads/?digest={digest}", data=data)
        assert resp.status == 201, await resp.text()
    return digest


def samples(text: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


async def scrape(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        return samples(await resp.text())


def v2_requests(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if REQUESTS.match(k))


async def test_two_workers_serve_one_address_and_name_themselves(
    server: WorkersProcess,
) -> None:
    assert sorted(server.pids()) == [1, 2]
    assert "(2 workers)" in server.log_tail()
    seen = await replicas_answering(server.url)
    assert seen == {server.replica(1), server.replica(2)}
    # every answer carries it: errors too
    async with aiohttp.ClientSession() as session:
        resp = await session.get(f"{server.url}/v2/nothing/manifests/latest")
        assert resp.status == 404
        assert resp.headers["X-Regproxy-Replica"] in seen


async def test_metrics_add_up_the_workers(server: WorkersProcess) -> None:
    total = 60
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        spread: dict[str, int] = {}
        for _ in range(total):
            async with session.get(f"{server.url}/v2/") as resp:
                name = resp.headers["X-Regproxy-Replica"]
                spread[name] = spread.get(name, 0) + 1
    assert len(spread) == 2, spread

    async def counted() -> bool:
        return v2_requests(await scrape(server.url)) == total

    await wait_until(counted, timeout=5, what="the workers' snapshots")
    metrics = await scrape(server.url)
    assert metrics["regproxy_workers"] == 2
    per_worker = {n: metrics[f'regproxy_worker_requests_total{{worker="{n}"}}'] for n in ("1", "2")}
    assert all(v > 0 for v in per_worker.values()), per_worker
    # the scrapes are requests too; every one of them was answered by one of the two
    assert sum(per_worker.values()) >= total
    assert metrics['regproxy_worker_cpu_seconds_total{worker="1"}'] > 0

    # a worker killed: its counts stay in the totals (its last snapshot is kept)
    old = server.kill_worker(2)
    await wait_until(lambda: server.pids().get(2) not in (None, old), what="a new worker 2")
    after = await scrape(server.url)
    assert v2_requests(after) >= total - 5  # at most its last second may be lost
    assert after['regproxy_worker_restarts_total{worker="2"}'] == 1
    assert after['regproxy_worker_restarts_total{worker="1"}'] == 0


async def test_a_killed_worker_is_replaced_and_other_clients_see_nothing(
    server: WorkersProcess,
) -> None:
    data = os.urandom(24 * MiB)
    digest = await push_blob(server.url, data)
    survivor = await pinned(server.url, server.replica(2))
    upload = await pinned(server.url, server.replica(2))
    try:
        # a pull read slowly, and a chunked push, both in flight on worker 2
        resp = await survivor.get(f"/v2/app/blobs/{digest}")
        assert resp.status == 200
        received = bytearray(await resp.content.readexactly(MiB))
        post = await upload.post("/v2/app/blobs/uploads/")
        location = post.headers["Location"]
        chunk = os.urandom(3 * MiB)
        gate = asyncio.Event()

        async def body():  # type: ignore[no-untyped-def]
            yield chunk[:MiB]
            await gate.wait()
            yield chunk[MiB:]

        patch = asyncio.ensure_future(upload.patch(location, data=body()))
        old = server.kill_worker(1)
        await wait_until(lambda: server.pids().get(1) not in (None, old), what="worker 1 replaced")
        gate.set()
        while piece := await resp.content.read(256 * 1024):
            received += piece
            await asyncio.sleep(0.001)
        assert bytes(received) == data
        patched = await patch
        assert patched.status == 202, await patched.text()
        assert patched.headers["X-Regproxy-Replica"] == server.replica(2)
        put = await upload.put(f"{patched.headers['Location']}?digest={sha256(chunk)}")
        assert put.status == 201, await put.text()
    finally:
        await survivor.close()
        await upload.close()
    assert re.search(rf"worker 1 \(pid {old}\) was killed by SIGKILL", server.log_tail())
    assert await replicas_answering(server.url) == {server.replica(1), server.replica(2)}


async def test_sigterm_drains_every_worker_then_exits_0(server: WorkersProcess) -> None:
    data = os.urandom(16 * MiB)
    digest = await push_blob(server.url, data)
    sessions = [await pinned(server.url, server.replica(n)) for n in (1, 2)]
    try:
        responses = [await s.get(f"/v2/app/blobs/{digest}") for s in sessions]
        first = [await r.content.readexactly(MiB) for r in responses]
        assert server.process is not None and server.process.proc is not None
        os.kill(server.supervisor, signal.SIGTERM)
        await asyncio.sleep(0.5)  # both workers are draining now
        for head, resp in zip(first, responses, strict=True):
            assert head + await resp.content.read() == data  # finished, not cut
        code = await asyncio.to_thread(server.process.proc.wait, 20)
    finally:
        for s in sessions:
            await s.close()
    assert code == 0
    log = server.log_tail()
    assert "shutting down" in log and log.rstrip().endswith("stopped"), log
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


async def test_sighup_reloads_the_certificate_of_every_worker(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    first = ca.issue(tmp_path / "first")
    live = tmp_path / "live"
    live.mkdir()
    (live / "server.crt").write_bytes(first.certificate.read_bytes())
    (live / "server.key").write_bytes(first.key.read_bytes())
    srv, trust, url = _workers_over_tls(tmp_path, live / "server.crt", live / "server.key", ca)
    try:
        host = await _replica_over_tls(url, trust)
        assert await _certificates_seen(url, trust, host) == {first.der}
        second = ca.issue(tmp_path / "second")
        (live / "server.crt").write_bytes(second.certificate.read_bytes())
        (live / "server.key").write_bytes(second.key.read_bytes())
        os.kill(srv.supervisor, signal.SIGHUP)
        await wait_until(
            lambda: srv.log_tail().count("TLS certificate reloaded") == 2, what="two reloads"
        )
        assert await _certificates_seen(url, trust, host) == {second.der}
        assert sorted(srv.pids()) == [1, 2]  # reloaded, not restarted
    finally:
        srv.stop()


async def test_tls_pulls_from_each_worker_and_across_a_reload(tmp_path: Path) -> None:
    """Blob bodies over TLS go by each worker's sender threads (`tls_sender`): pulls that
    reach both workers arrive byte-identical, those started just before SIGHUP reloads
    the certificate of every worker included."""
    ca = TestCA(tmp_path / "ca")
    cert = ca.issue(tmp_path / "cert")
    srv, trust, url = _workers_over_tls(tmp_path, cert.certificate, cert.key, ca)
    try:
        data = os.urandom(24 * MiB)
        digest = sha256(data)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{url}/v2/tls/workers/blobs/uploads/?digest={digest}", data=data, ssl=trust
            ) as resp,
        ):
            assert resp.status == 201, await resp.text()

        async def pull() -> tuple[str, bytes]:
            # a connection of its own, so the kernel may hand it to either worker
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as one,
                one.get(f"{url}/v2/tls/workers/blobs/{digest}", ssl=trust) as resp,
            ):
                assert resp.status == 200
                return resp.headers["X-Regproxy-Replica"], await resp.read()

        replicas: set[str] = set()
        for batch in range(8):
            pulls = [asyncio.create_task(pull()) for _ in range(4)]
            if batch == 0:
                await asyncio.sleep(0.05)  # under way
                os.kill(srv.supervisor, signal.SIGHUP)
            for replica, body in await asyncio.gather(*pulls):
                assert body == data
                replicas.add(replica)
            if len(replicas) == 2:
                break
        assert len(replicas) == 2, replicas
        await wait_until(
            lambda: srv.log_tail().count("TLS certificate reloaded") == 2, what="two reloads"
        )
    finally:
        srv.stop()


def _workers_over_tls(
    tmp_path: Path, certificate: Path, key: Path, ca: TestCA
) -> tuple[WorkersProcess, ssl.SSLContext, str]:
    """Two workers serving TLS with `certificate` and `key`, started; a client context
    trusting `ca`, and the server's URL."""
    tls = f"tls_certificate = {json.dumps(str(certificate))}\ntls_key = {json.dumps(str(key))}\n"
    srv = WorkersProcess(tmp_path / "srv", extra_config=f"[server]\n{tls}")
    srv.start()
    return srv, ssl.create_default_context(cafile=str(ca.ca_file)), f"https://127.0.0.1:{srv.port}"


async def _replica_over_tls(url: str, trust: ssl.SSLContext) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/v2/", ssl=trust) as resp:
        return resp.headers["X-Regproxy-Replica"].rsplit("-", 1)[0]


async def _certificates_seen(url: str, trust: ssl.SSLContext, host: str) -> set[bytes]:
    """The server certificates that worker 1 and worker 2 present to new connections."""
    port = int(url.rsplit(":", 1)[1])

    def handshake() -> tuple[str, bytes]:
        request = b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            trust.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            tls.sendall(request)
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
        replica = re.search(rb"X-Regproxy-Replica: (\S+)", answer, re.IGNORECASE)
        assert replica is not None and der is not None
        return replica.group(1).decode(), der

    by_worker: dict[str, set[bytes]] = {}
    for _ in range(64):
        replica, der = await asyncio.to_thread(handshake)
        by_worker.setdefault(replica, set()).add(der)
        if len(by_worker) == 2 and all(len(v) for v in by_worker.values()):
            break
    assert sorted(by_worker) == [f"{host}-1", f"{host}-2"]
    return set().union(*by_worker.values())


async def test_a_token_from_one_worker_is_good_on_the_other(tmp_path: Path) -> None:
    htpasswd = write_htpasswd(tmp_path / "htpasswd")
    auth = f'[auth]\nhtpasswd = {json.dumps(str(htpasswd))}\nmode = "token"\n'
    srv = WorkersProcess(tmp_path / "srv", extra_config=auth)
    srv.start()
    try:
        assert "the 2 workers share a key made at start-up" in srv.log_tail()
        one = await pinned(srv.url, srv.replica(1))
        two = await pinned(srv.url, srv.replica(2))
        try:
            resp = await one.get(
                "/auth/token",
                params={"service": "regproxy", "scope": "repository:team/app:push,pull"},
                headers={"Authorization": basic("alice")},
            )
            assert resp.status == 200, await resp.text()
            token = (await resp.json())["token"]
            bearer = {"Authorization": f"Bearer {token}"}
            for session in (one, two):
                resp = await session.post("/v2/team/app/blobs/uploads/", headers=bearer)
                assert resp.status == 202, await resp.text()
                assert resp.headers["X-Regproxy-Replica"] in (srv.replica(1), srv.replica(2))
            resp = await two.get("/v2/", headers={"Authorization": "Bearer forged.x.y"})
            assert resp.status == 401
        finally:
            await one.close()
            await two.close()
    finally:
        srv.stop()


def test_a_store_that_cannot_open_stops_serve_with_one_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, extra="[server]\nworkers = 2")
    (tmp_path / "registry").mkdir()
    stray = tmp_path / "registry" / "blobs"
    stray.write_text("not a folder")
    ran = run_cli("serve", "-c", path, "--listen", "127.0.0.1:0")
    assert_one_line_error(ran, 2, "cannot start", "File exists", str(stray))


def test_an_address_in_use_stops_serve_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        ran = run_cli("serve", "-c", write_config(tmp_path), "--workers", "2", "--listen", address)
    assert_one_line_error(ran, 2, f"cannot listen on {address}", "address already in use")


def test_a_second_serve_cannot_join_the_workers_port(
    server: WorkersProcess, tmp_path: Path
) -> None:
    """SO_REUSEPORT would let a second `serve` of the same user share the port silently."""
    address = f"127.0.0.1:{server.port}"
    ran = run_cli(
        "serve", "-c", write_config(tmp_path / "other"), "--workers", "2", "--listen", address
    )
    assert_one_line_error(ran, 2, f"cannot listen on {address}", "address already in use")


def test_bad_workers_values_are_refused(tmp_path: Path) -> None:
    ran = run_cli("serve", "-c", write_config(tmp_path), "--workers", "0")
    assert_one_line_error(ran, 2, "--workers", "expected 1 to 256 workers")
    path = write_config(tmp_path, extra='[server]\nworkers = "many"')
    ran = run_cli("serve", "-c", path)
    assert_one_line_error(ran, 2, "configuration error: server.workers")


async def test_one_worker_is_todays_single_process(tmp_path: Path) -> None:
    srv = RegproxyProcess(tmp_path / "srv", extra_config="[server]\nworkers = 1\n")
    srv.start()
    try:
        assert srv.process is not None and srv.process.pid is not None
        children = Path(f"/proc/{srv.process.pid}/task/{srv.process.pid}/children")
        assert children.read_text().strip() == ""
        assert "workers)" not in srv.log_tail()
        async with aiohttp.ClientSession() as session, session.get(f"{srv.url}/v2/") as resp:
            assert resp.headers["X-Regproxy-Replica"] == socket.gethostname()
    finally:
        srv.stop()


async def test_the_metrics_listener_is_served_by_every_worker(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    srv = WorkersProcess(tmp_path / "srv", extra_config=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    srv.start()
    try:
        assert f"metrics listening on http://127.0.0.1:{port}/metrics" in srv.log_tail()
        ops = f"http://127.0.0.1:{port}"
        names = {srv.replica(1), srv.replica(2)}  # two registry requests
        assert await replicas_answering(ops) == names
        assert await replicas_answering(srv.url, 30) == names  # 30 more

        async def counted() -> bool:
            return v2_requests(await scrape(ops)) == 32

        await wait_until(counted, timeout=5, what="the workers' snapshots")
        async with aiohttp.ClientSession() as session, session.get(f"{ops}/readyz") as resp:
            assert resp.status == 200
    finally:
        srv.stop()
