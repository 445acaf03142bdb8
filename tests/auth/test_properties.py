"""Property-based tests (hypothesis) over every endpoint: never a 5xx, never a stray write.

One example is a short sequence of requests (a later one may reuse the upload
session an earlier one started) with generated names, references, digests, queries,
headers and bodies, sent byte for byte on raw sockets to a regproxy with auth on (token
mode), whose proxy upstream is a second, open regproxy. After every example:
- no response was a 5xx, and every request got a response;
- every file below the test's folder is in a store's expected tree (`tree.py`);
- every blob file hashes to its name.

Both servers run on their own event loop in a background thread, so hypothesis drives
plain synchronous test functions. Examples are bounded (the module stays well under
60 s).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regproxy.config import Config
from regproxy.server.app import create_app
from regproxy.server.runner import GuardedRunner
from tests.support.auth import PASSWORDS, auth_config
from tests.support.digests import sha256
from tests.support.inprocess import make_config
from tests.support.tree import all_files, bad_blobs, unexpected_paths

#: examples per property; `RP_PROPERTY_EXAMPLES=5000` for a longer hunt
EXAMPLES = int(os.environ.get("RP_PROPERTY_EXAMPLES", "250"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ---- servers in a background thread ------------------------------------------------------


class BackgroundServers:
    """aiohttp apps on one event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def start(self, config: Config) -> int:
        return asyncio.run_coroutine_threadsafe(self._start(config), self.loop).result(30)

    async def _start(self, config: Config) -> int:
        runner = GuardedRunner(create_app(config), handle_signals=False)
        await runner.setup()
        self.runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    def close(self) -> None:
        async def cleanup() -> None:
            for runner in reversed(self.runners):
                await runner.cleanup()

        try:
            asyncio.run_coroutine_threadsafe(cleanup(), self.loop).result(60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def send(
    port: int, method: str, target: str, headers: list[tuple[str, str]], body: bytes
) -> Answer:
    """One request, written byte for byte; the whole answer (the server closes)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, payload = raw.partition(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")):
        raise AssertionError(f"no HTTP answer to {method} {target[:200]}: {raw[:200]!r}")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        parsed[key.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), parsed, payload)


@dataclass
class World:
    port: int
    config: Config
    top: Path
    initial: frozenset[Path]
    tokens: list[str]  # root's (for public/app), anonymous


LAYER = b"layer bytes" * 50
IMAGE_CONFIG = b'{"architecture":"amd64","os":"linux"}'
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(IMAGE_CONFIG),
            "size": len(IMAGE_CONFIG),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha256(LAYER),
                "size": len(LAYER),
            }
        ],
    }
).encode()
BLOBS = [LAYER, IMAGE_CONFIG, b"", b"x"]

RULES: list[dict[str, Any]] = [
    {"repository": "public/*", "pull": ["anonymous"], "push": ["@authenticated"],
     "delete": ["@admins"]},
    {"repository": "*", "pull": ["@authenticated"], "push": ["@authenticated"],
     "delete": ["@authenticated"]},
]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    top = tmp_path_factory.mktemp("properties")
    servers = BackgroundServers()
    try:
        upstream_config = make_config(top / "upstream")
        upstream_port = servers.start(upstream_config)
        config = make_config(
            top / "registry",
            auth=auth_config(top / "registry", "token", rules=RULES, proxy_pull=["anonymous"]),
            proxy={"upstreams": {"up": {"url": f"http://127.0.0.1:{upstream_port}"}}},
            server={"body_timeout": "5s", "max_uploads_per_client": 10_000},
        )
        port = servers.start(config)
        # content to aim at: an image upstream and one in the registry
        layer, image_config, manifest = LAYER, IMAGE_CONFIG, MANIFEST
        admin = [("Authorization", basic("root", PASSWORDS["root"]))]
        media = [("Content-Type", "application/vnd.oci.image.manifest.v1+json")]
        seeds = ((upstream_port, "lib/app", []), (port, "public/app", admin))
        for target_port, name, auth in seeds:
            for blob in (layer, image_config):
                url = f"/v2/{name}/blobs/uploads/?digest={sha256(blob)}"
                assert send(target_port, "POST", url, auth, blob).status == 201
            answer = send(target_port, "PUT", f"/v2/{name}/manifests/v1", auth + media, manifest)
            assert answer.status == 201
        tokens = []
        for user, scope in (("root", "repository:public/app:pull,push,delete"), (None, "")):
            auth = [("Authorization", basic(user, PASSWORDS[user]))] if user else []
            answer = send(port, "GET", f"/auth/token?service=regproxy&scope={scope}", auth, b"")
            assert answer.status == 200
            tokens.append(json.loads(answer.body)["token"])
        # the whole folder is watched: the upstream's store next door must not change either
        yield World(port, config, top, frozenset(all_files(top)), tokens)
    finally:
        servers.close()


# ---- strategies ----------------------------------------------------------------------------

SPECIAL_PARTS = [
    "..", ".", "_tags", "_manifests", "_layers", "%2e%2e", "%2E%2e%2f", "%2f", "%00", "",
    "A", "a..b", "a__b", "a-b", "a.b", "p", "up", "%0d%0a", "%22", "%5c", "~", "%ff", "%20",
    "blobs", "uploads", "manifests", "tags", "x" * 300,
]  # fmt: skip
KNOWN_NAMES = ["public/app", "public/new", "p/up/lib/app", "p/up/lib/nothing", "p/nope/x", "a"]


LOWER = "abcdefghijklmnopqrstuvwxyz0123456789"
TAG_FIRST = LOWER + "ABCDEFGHIJKLMNOPQRSTUVWXYZ_"
tags = st.builds(str.__add__, st.sampled_from(TAG_FIRST), st.text(TAG_FIRST + ".-", max_size=20))


def encoded_text(max_size: int = 12) -> st.SearchStrategy[str]:
    return st.text(max_size=max_size).map(lambda t: quote(t, safe=""))


name_part = st.one_of(
    st.builds(
        lambda head, sep, tail: head + (sep + tail if tail else ""),
        st.text(LOWER, min_size=1, max_size=6),
        st.sampled_from([".", "_", "__", "-", "--"]),
        st.text(LOWER, max_size=4),
    ),
    st.sampled_from(SPECIAL_PARTS),
    encoded_text(8),
)
names = st.one_of(
    st.sampled_from(KNOWN_NAMES),
    st.lists(name_part, min_size=1, max_size=4).map("/".join),
)


digests = st.one_of(
        st.sampled_from([sha256(b) for b in BLOBS]),
        st.binary(min_size=32, max_size=32).map(lambda b: f"sha256:{b.hex()}"),
        st.binary(min_size=64, max_size=64).map(lambda b: f"sha512:{b.hex()}"),
        st.sampled_from(["sha256:", "sha256:abc", "md5:" + "0" * 32, "sha256:" + "A" * 64,
                         "sha256:..%2f..%2fx", "SHA256:" + "0" * 64, ":", "sha256:%00"]),
        encoded_text(),
)  # fmt: skip


references = st.one_of(
    tags,
    st.sampled_from(["v1", "latest", "..", ".x", "x" * 129, "%2e%2e", "a%2fb", "-x"]),
    encoded_text(),
)
query_values = st.one_of(
    st.integers(0, 999_999).map(str),
    st.sampled_from(["-1", "9" * 50, "", "public/app", "p/up/lib/app", "up", "nope", "1e3"]),
    encoded_text(),
)
QUERY_KEYS = ["n", "last", "artifactType", "ns", "digest", "mount", "from", "scope", "service",
              "account", "grant_type"]  # fmt: skip


@st.composite
def queries(draw: st.DrawFn) -> str:
    pairs = []
    for key in draw(st.lists(st.sampled_from(QUERY_KEYS), max_size=3)):
        if key in ("digest", "mount"):
            value = draw(digests)
        elif key == "scope":
            value = quote(
                f"repository:{draw(names)}:{draw(st.sampled_from(['pull', 'pull,push', '*']))}",
                safe="",
            )
        else:
            value = draw(query_values)
        pairs.append(f"{key}={value}")
    return "&".join(pairs)


@st.composite
def header_sets(draw: st.DrawFn) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    auth = draw(
        st.sampled_from(["root", "root", "root", "alice", "bad", "token", "anon", "junk", None])
    )
    if auth in ("root", "alice"):
        headers.append(("Authorization", basic(auth, PASSWORDS[auth])))
    elif auth == "bad":
        headers.append(("Authorization", basic("root", "wrong")))
    elif auth == "token":
        headers.append(("Authorization", "Bearer {token0}"))  # filled in when sent
    elif auth == "anon":
        headers.append(("Authorization", "Bearer {token1}"))
    elif auth == "junk":
        junk = draw(st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40))
        headers.append(("Authorization", junk))
    printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
    optional = {
        "Content-Type": st.one_of(
            st.sampled_from([
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.v2+json",
                "application/octet-stream", "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x", "multipart/form-data",
                "application/x-www-form-urlencoded; charset=nope",
                "application/x-www-form-urlencoded; charset=utf-16",
            ]),
            printable,
        ),
        "Content-Range": st.one_of(
            st.tuples(st.integers(0, 9999), st.integers(0, 9999)).map("{0[0]}-{0[1]}".format),
            printable,
        ),
        "Range": st.one_of(
            st.tuples(st.integers(0, 999), st.integers(0, 999)).map("bytes={0[0]}-{0[1]}".format),
            printable,
        ),
        "Accept": printable,
        "X-Forwarded-Proto": printable,
        "X-Forwarded-Host": printable,
        "If-None-Match": printable,
    }  # fmt: skip
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=3, unique=True)):
        headers.append((key, draw(optional[key]).strip()))
    return headers


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(
        st.sampled_from(["empty", "bytes", "blob", "manifest", "json", "form", "multipart"])
    )
    if kind == "empty":
        return b""
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "blob":
        return draw(st.sampled_from(BLOBS))
    if kind == "manifest":
        return MANIFEST
    if kind == "form":
        return b"grant_type=password&username=root&password=" + PASSWORDS["root"].encode()
    if kind == "multipart":
        field = draw(st.sampled_from([b"scope", b"grant_type", b"username", b"x"]))
        value = draw(st.binary(max_size=40))
        return (
            b'--x\r\nContent-Disposition: form-data; name="'
            + field
            + b'"\r\n\r\n'
            + value
            + b"\r\n--x--\r\n"
        )
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                     max_size=3),
        max_leaves=8,
    )  # fmt: skip
    doc = draw(st.fixed_dictionaries({
        "schemaVersion": st.sampled_from([2, 1, "2", None]),
        "mediaType": st.sampled_from(["application/vnd.oci.image.manifest.v1+json",
                                      "application/vnd.oci.image.index.v1+json", "x"]),
        "config": json_values, "layers": json_values, "manifests": json_values,
        "subject": json_values,
    }))  # fmt: skip
    return json.dumps(doc).encode()


ENDPOINTS = [
    ("GET", "/v2/"),
    ("GET", "/v2/_catalog?{q}"),
    ("GET", "/v2/{name}/tags/list?{q}"),
    ("HEAD", "/v2/{name}/tags/list"),
    ("GET", "/v2/{name}/manifests/{ref}?{q}"),
    ("HEAD", "/v2/{name}/manifests/{ref}"),
    ("PUT", "/v2/{name}/manifests/{ref}"),
    ("DELETE", "/v2/{name}/manifests/{ref}"),
    ("GET", "/v2/{name}/blobs/{digest}?{q}"),
    ("HEAD", "/v2/{name}/blobs/{digest}"),
    ("DELETE", "/v2/{name}/blobs/{digest}"),
    ("POST", "/v2/{name}/blobs/uploads/?{q}"),
    ("GET", "/v2/{name}/blobs/uploads/{upload}"),
    ("PATCH", "/v2/{name}/blobs/uploads/{upload}"),
    ("PUT", "/v2/{name}/blobs/uploads/{upload}?{q}"),
    ("DELETE", "/v2/{name}/blobs/uploads/{upload}"),
    ("GET", "/v2/{name}/referrers/{digest}?{q}"),
    ("GET", "/auth/token?{q}"),
    ("POST", "/auth/token?{q}"),
    ("OPTIONS", "/v2/{name}/manifests/{ref}"),
]


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, list[tuple[str, str]], bytes]:
    method, template = draw(st.sampled_from(ENDPOINTS))
    upload = draw(
        st.one_of(st.just("{last}"), st.binary(min_size=16, max_size=16).map(bytes.hex),
                  encoded_text())
    )  # fmt: skip
    target = template.format(
        name=draw(names),
        ref=draw(st.one_of(references, digests)),
        digest=draw(digests),
        upload=upload,
        q=draw(queries()),
        last="{last}",
    )
    return method, target, draw(header_sets()), draw(bodies())


# ---- the properties ------------------------------------------------------------------------


def check_world(world: World) -> None:
    assert unexpected_paths(world.config, world.top, allowed=world.initial) == []
    for root in (world.config.registry_storage, world.config.proxy_storage):
        assert bad_blobs(Path(root)) == []


@SETTINGS
@given(sequence=st.lists(requests(), min_size=1, max_size=3))
def test_no_request_gets_a_5xx_or_writes_outside_the_stores(
    world: World, sequence: list[tuple[str, str, list[tuple[str, str]], bytes]]
) -> None:
    last_upload = "0" * 32
    tokens = {"{token0}": world.tokens[0], "{token1}": world.tokens[1]}
    for method, target, headers, body in sequence:
        target = target.replace("{last}", last_upload)
        headers = [(k, tokens.get(v.removeprefix("Bearer "), v)) for k, v in headers]
        headers = [(k, f"Bearer {v}" if v in world.tokens else v) for k, v in headers]
        answer = send(world.port, method, target, headers, body)
        assert answer.status < 500, (method, target, headers, answer.status, answer.body[:300])
        location = answer.headers.get("location", "")
        if "/blobs/uploads/" in location:
            last_upload = location.rsplit("/", 1)[-1]
    check_world(world)


@SETTINGS
@given(
    name=names,
    tag=tags,
    chunks=st.lists(st.binary(min_size=1, max_size=2000), min_size=1, max_size=4),
    lie=st.booleans(),
)
def test_pushed_content_is_stored_exactly(
    world: World, name: str, tag: str, chunks: list[bytes], lie: bool
) -> None:
    """A chunked push of random bytes (sometimes with a wrong digest) stores exactly those
    bytes under their digest, or nothing."""
    admin = [("Authorization", basic("root", PASSWORDS["root"]))]
    data = b"".join(chunks)
    digest = sha256(data + b"!" if lie else data)
    start = send(world.port, "POST", f"/v2/{name}/blobs/uploads/", admin, b"")
    assert start.status < 500
    if start.status != 202:
        return
    location = start.headers["location"]
    offset = 0
    for chunk in chunks:
        range_header = [("Content-Range", f"{offset}-{offset + len(chunk) - 1}")]
        answer = send(world.port, "PATCH", location, admin + range_header, chunk)
        assert answer.status == 202, answer
        offset += len(chunk)
        location = answer.headers["location"]
    done = send(world.port, "PUT", f"{location}?digest={digest}", admin, b"")
    assert done.status == (400 if lie else 201), done
    blob = send(world.port, "GET", f"/v2/{name}/blobs/{digest}", admin, b"")
    if lie:
        assert blob.status == 404
    else:
        assert blob.status == 200
        assert blob.body == data
    check_world(world)
