"""regproxy served the way `regproxy serve` serves it, and raw-socket helpers to drive it.

`serve_registry` runs the app on a `GuardedRunner` and a TCP site on 127.0.0.1 (TLS when the
configuration says so): the path large request bodies take past aiohttp only exists there,
not under aiohttp's `TestServer`. The raw helpers write request heads byte for byte and
read answers off the socket, for clients that stall, vanish or lie about their length.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from regproxy.config import Config
from regproxy.server import runner as runner_mod
from regproxy.server.app import create_app
from regproxy.server.uploads import SESSION_LOCKS

from .digests import sha256
from .oci import envelope_codes


@dataclass
class ServedRegistry:
    """A regproxy app on a `GuardedRunner` (as `regproxy serve` runs it) on 127.0.0.1."""

    config: Config
    app: web.Application
    runner: web.AppRunner
    port: int
    http: aiohttp.ClientSession
    stopped: bool = False
    sockets: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def uploads_root(self) -> Path:
        return Path(self.config.temporary_registry_storage) / "uploads"

    def data_file(self, location: str) -> Path:
        return self.uploads_root / upload_id(location) / "data"

    def busy(self, location: str) -> bool:
        """A request holds the session's lock (it is receiving a body)."""
        lock = self.app[SESSION_LOCKS].get(upload_id(location))
        return lock is not None and lock.locked()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.sockets.append(writer)
        return reader, writer

    async def stop(self) -> None:
        """Shut the server down (as SIGTERM would); the client session stays open."""
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()

    async def close(self) -> None:
        """Close the raw sockets and the client session, then stop the server."""
        for writer in self.sockets:
            writer.close()
        await self.http.close()
        await self.stop()


async def serve_registry(
    config: Config,
    *,
    shutdown_timeout: float = 60.0,
    client_ssl: ssl.SSLContext | None = None,
    port: int = 0,
) -> ServedRegistry:
    """Start `config` on a `GuardedRunner` on 127.0.0.1:`port` (0: ephemeral), with a client
    session (`client_ssl`: how that session checks the server's certificate)."""
    app = create_app(config)
    runner = runner_mod.GuardedRunner(
        app, handle_signals=False, shutdown_timeout=shutdown_timeout, keepalive_timeout=75
    )
    await runner.setup()
    server_ssl = runner_mod.tls_context(config)
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_ssl)
    await site.start()
    port = int(runner.addresses[0][1])
    scheme = "https" if server_ssl is not None else "http"
    http = aiohttp.ClientSession(
        base_url=f"{scheme}://127.0.0.1:{port}",
        timeout=aiohttp.ClientTimeout(total=30),
        connector=aiohttp.TCPConnector(ssl=client_ssl) if client_ssl else None,
    )
    return ServedRegistry(config, app, runner, port, http)


def upload_id(location: str) -> str:
    """The session id in an upload Location (its last path segment)."""
    return location.rstrip("/").rsplit("/", 1)[1].split("?")[0]


def request_head(method: str, target: str, *headers: str, length: int | None = None) -> bytes:
    """A request head for a raw socket; keep-alive unless a header says otherwise."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class Answer:
    """A response read off a raw socket."""

    status: int
    headers: dict[str, str]
    body: bytes

    def codes(self) -> list[str]:
        return envelope_codes(self.body)


async def read_answer(reader: asyncio.StreamReader, timeout: float = 10.0) -> Answer:
    """One response from a raw socket (Content-Length framed, as regproxy answers)."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = {}
        for line in lines:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(int(status_line.split()[1]), headers, body)


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """The server closed the connection (EOF or reset) within `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            return await reader.read() == b""
    except ConnectionError:
        return True


async def start_session(http: aiohttp.ClientSession | TestClient, name: str) -> str:
    """POST a new upload session; its Location."""
    resp = await http.post(f"/v2/{name}/blobs/uploads/")
    assert resp.status == 202, await resp.text()
    return resp.headers["Location"]


async def get_blob(http: aiohttp.ClientSession | TestClient, name: str, digest: str) -> bytes:
    """A stored blob's bytes (the blob must exist)."""
    resp = await http.get(f"/v2/{name}/blobs/{digest}")
    assert resp.status == 200, await resp.text()
    return await resp.read()


async def blob_status(http: aiohttp.ClientSession | TestClient, name: str, digest: str) -> int:
    """The status of a HEAD of the blob: 200 stored, 404 not."""
    resp = await http.head(f"/v2/{name}/blobs/{digest}")
    return resp.status


async def upload_offset(http: aiohttp.ClientSession | TestClient, location: str) -> int:
    """The session's offset as the server reports it (`Range: 0-<offset-1>`)."""
    resp = await http.get(location)
    assert resp.status == 204, await resp.text()
    end = int(resp.headers["Range"].split("-")[1])
    # `Range: 0-0` is both "nothing" and "one byte"; no test here stores a single byte
    return 0 if end == 0 else end + 1


def closes(resp: aiohttp.ClientResponse) -> bool:
    """The server ends the connection after this answer (as after a body read past aiohttp)."""
    return resp.headers.get("Connection", "").lower() == "close"


async def finish_upload(
    http: aiohttp.ClientSession | TestClient, location: str, data: bytes, offset: int
) -> None:
    """Send `data[offset:]` (a PATCH with Content-Range), then PUT ?digest=."""
    if offset < len(data):
        resp = await http.patch(
            location,
            data=data[offset:],
            headers={"Content-Range": f"{offset}-{len(data) - 1}"},
        )
        assert resp.status == 202, await resp.text()
        location = resp.headers["Location"]
    resp = await http.put(f"{location}?digest={sha256(data)}")
    assert resp.status == 201, await resp.text()
