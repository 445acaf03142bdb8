"""Issue 11: a seeded fuzz run over every route and mode must never make the server fail.

For each mode (no auth, Basic, token; a proxy upstream always configured, the mirror
in two of them) two images are pushed, then a few thousand requests are sent through
an aiohttp client (the cases issue 11 names, `known.py`, then seeded random ones,
`cases.py`) and a few hundred as raw bytes on sockets (`raw.py`). Checked:

- no answer is 5xx, and every answer parses (a HEAD answer carries no body);
- every 4xx the application gives on `/v2/` is the OCI error envelope (aiohttp's own
  400s for requests it cannot parse, before any route, are counted, not failed);
- raw garbage gets a 4xx or a closed connection, never a 5xx and never a hang;
- nothing is logged with a traceback, and no log line is longer than 2 KiB;
- with auth, no read of a repository the rules keep from the caller succeeds;
- afterwards the server answers, the two images pull back byte for byte, and the stores
  hold nothing off their layout and no blob whose bytes differ from its digest.

The seed is fixed so CI runs are comparable; `FUZZ_SEED=<n>` replays the seed a failure
prints, `FUZZ_SEED=random` draws a new one, `FUZZ_REQUESTS=<n>` changes how many random
requests each mode sends (1500).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from regproxy.config import Config
from regproxy.server import runner as runner_mod
from tests.fuzz import raw
from tests.fuzz.cases import (
    FUZZ_REPOS,
    GHOST_REPLICA,
    PROTECTED,
    RANGES,
    UPSTREAM,
    FuzzRequest,
    Generator,
    World,
    protect,
)
from tests.fuzz.harness import Findings, check_records, cut, exception_gist, is_envelope
from tests.fuzz.known import known_issue_requests
from tests.support.auth import RULES as AUTH_RULES
from tests.support.auth import auth_config, auth_header, basic, push_image_as
from tests.support.digests import sha256
from tests.support.fake_upstream import FakeUpstream
from tests.support.inprocess import make_config
from tests.support.oci import Image, make_image
from tests.support.processes import free_port
from tests.support.served import ServedRegistry, serve_registry
from tests.support.tree import all_files, bad_blobs, unexpected_paths

MODES = ("none", "basic", "token")
DEFAULT_SEED = 11
#: seeded random requests per mode, on top of the fixed cases of the issue
RANDOM_REQUESTS = int(os.environ.get("FUZZ_REQUESTS", "1500"))
#: generated requests that are also sent byte-mutated on raw sockets, per mode
RAW_MUTATIONS = 60
REQUEST_TIMEOUT = 15.0
RAW_DEADLINE = 5.0
RAW_SLOW_DEADLINE = 8.0
#: the fuzz users lack push and delete on `keep/*`; root (who pushed them) is never used
RULES: list[dict[str, Any]] = [
    {"repository": "keep/*", "pull": ["anonymous"], "push": ["@admins"], "delete": ["@admins"]},
    {
        "repository": "fz/*",
        "pull": ["anonymous"],
        "push": ["@authenticated"],
        "delete": ["@authenticated"],
    },
    *AUTH_RULES,
]


def fuzz_seed() -> int:
    """`FUZZ_SEED` (a number, or `random`), else the fixed default."""
    raw_seed = os.environ.get("FUZZ_SEED", "")
    if raw_seed == "random":
        return random.SystemRandom().randrange(1 << 31)
    return int(raw_seed) if raw_seed else DEFAULT_SEED


def fill_upstream(fake: FakeUpstream, world: World) -> None:
    """A few images on the fake upstream, so proxied and mirrored pulls can succeed."""
    alpine = fake.add_image("library/alpine", "3.20", (300, 500))
    fake.set_tag("library/alpine", "latest", alpine.digest)
    fake.set_tag("library/alpine", "v1", alpine.digest)
    tool = fake.add_image("org/tool", "v1", (400,))
    fake.add_index("library/alpine", "multi", [alpine])
    fake.add_referrer("library/alpine", alpine, "application/x-fuzz")
    for image in (alpine, tool):
        world.upstream.append((image.repo, "v1", image.digest, [sha256(b) for b in image.blobs]))
    fresh = fake.add_image("fuzz/fresh", "v1", [200] * 2 * len(RANGES))
    world.fresh_blobs = [(fresh.repo, sha256(layer)) for layer in fresh.layers]


def server_config(tmp_path: Path, mode: str, upstream_url: str) -> Config:
    proxy: dict[str, Any] = {"upstreams": {UPSTREAM: {"url": upstream_url, "tag_ttl": "1s"}}}
    if mode != "basic":  # the mirror in two modes, plain prefix and `ns` routing in all
        proxy["mirror_upstream"] = UPSTREAM
    keys: dict[str, Any] = {
        "proxy": proxy,
        "server": {"body_timeout": "1s", "max_uploads_per_client": 100_000},
    }
    if mode != "none":
        keys["auth"] = auth_config(tmp_path, mode, rules=RULES)
    config = make_config(tmp_path, **keys)
    # a replica that holds sessions but cannot be reached: requests for them are refused
    ghost = {"id": GHOST_REPLICA, "url": f"http://127.0.0.1:{free_port()}", "name": "ghost"}
    record = Path(config.registry_storage) / "replicas" / GHOST_REPLICA
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(ghost))
    return config


async def prepare(session: aiohttp.ClientSession, world: World) -> None:
    """Blobs, a manifest and upload sessions of the fuzz user, and its tokens."""
    alice = {} if world.mode == "none" else auth_header("alice")
    for repo in FUZZ_REPOS:
        for data in (b"{}", os.urandom(64)):
            url = f"/v2/{repo}/blobs/uploads/?digest={sha256(data)}"
            async with session.post(url, data=data, headers=alice) as resp:
                world.learn(
                    FuzzRequest("prep", "POST", url), resp.status, resp.headers.get("Location")
                )
        blobs = world.blobs.get(repo)
        if blobs:
            image = make_image((10,))
            for blob in image.blobs:
                url = f"/v2/{repo}/blobs/uploads/?digest={sha256(blob)}"
                async with session.post(url, data=blob, headers=alice) as resp:
                    world.learn(
                        FuzzRequest("prep", "POST", url), resp.status, resp.headers.get("Location")
                    )
            url = f"/v2/{repo}/manifests/v1"
            headers = {**alice, "Content-Type": image.media_type}
            async with session.put(url, data=image.manifest, headers=headers) as resp:
                world.learn(
                    FuzzRequest("prep", "PUT", url), resp.status, resp.headers.get("Location")
                )
    for _ in range(6):
        async with session.post("/v2/fz/a/blobs/uploads/", headers=alice) as resp:
            assert resp.status == 202, await resp.text()
            world.learn(FuzzRequest("prep", "POST", ""), 202, resp.headers["Location"])
    if world.mode == "token":
        scopes = [("service", "regproxy")] + [
            ("scope", f"repository:{name}:pull,push,delete")
            for name in (*FUZZ_REPOS, *PROTECTED, f"p/{UPSTREAM}/library/alpine", "library/alpine")
        ]
        for user in ("alice", "bob"):
            headers = {"Authorization": basic(user)}
            async with session.get("/auth/token", params=scopes, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                world.tokens[user] = (await resp.json())["token"]


async def send_one(
    registry: ServedRegistry,
    request: FuzzRequest,
    world: World,
    findings: Findings,
) -> None:
    """Send one generated request through the client and check its answer."""
    described = request.describe()
    try:
        url = URL(f"http://127.0.0.1:{registry.port}{request.target}", encoded=True)
        context = registry.http.request(
            request.method,
            url,
            headers=CIMultiDict(request.headers),
            data=request.body,
            chunked=True if request.chunked and request.body else None,
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            allow_redirects=False,
        )
        async with context as resp:
            body = await resp.read()
            status, headers = resp.status, resp.headers
    except asyncio.TimeoutError:
        findings.add("hang", request.case, described, f"no answer within {REQUEST_TIMEOUT} s")
        return
    except (
        aiohttp.ServerDisconnectedError,
        aiohttp.ClientOSError,
        aiohttp.ClientPayloadError,
    ) as exc:
        findings.drop(request.case, described, type(exc).__name__)
        return
    except aiohttp.ClientResponseError as exc:
        # the answer itself is broken (e.g. a body after a HEAD answer): a client chokes
        gist = f"{type(exc).__name__}: {exception_gist(Exception(exc.message))}"
        findings.add("bad-response", request.case, described, cut(exc.message, 160), gist)
        return
    except (ValueError, TypeError, UnicodeError, aiohttp.InvalidURL):
        findings.unsendable += 1  # the client library refused it: raw.py covers such bytes
        return
    findings.count(status)
    world.learn(request, status, headers.get("Location"))
    leak = authz_leak(world, request, status, body)
    if leak is not None:
        findings.add("access-rule-bypassed", request.case, described, leak)
    if status >= 500:
        findings.add("5xx", request.case, described, f"{status} {cut(body, 160)}")
    elif status >= 400 and "Docker-Distribution-API-Version" not in headers:
        findings.parser_4xx += 1  # aiohttp's parser refused it before any route ran
    elif (
        status >= 400
        and request.method != "HEAD"
        and request.target.startswith("/v2")
        and not is_envelope(body)
    ):
        answer = f"{status} {cut(body, 160)}"
        findings.add("not-envelope", request.case, described, answer, cut(answer, 60))


#: who may read each private namespace under `RULES` (root too, but the fuzzer never is)
READERS = {"alice/": ("alice",), "misc/": ("alice", "bob")}


def authz_leak(world: World, request: FuzzRequest, status: int, body: bytes) -> str | None:
    """What a 2xx showed that the rules keep from this caller, or None.

    A read of `alice/*` by anyone but alice, or of `misc/*` anonymously, must fail, and
    the catalog must not list them; `?ns=<upstream>` reads go upstream (which holds
    neither), so they are not local reads. Writes are checked by the stores: the
    protected images pull back intact.
    """
    if world.mode == "none" or not 200 <= status < 300 or request.method not in ("GET", "HEAD"):
        return None
    path, _, query = request.target.partition("?")
    if path in ("/v2/_catalog", "/v2/_catalog/") and request.method == "GET":
        try:
            listed = json.loads(body).get("repositories", [])
        except (ValueError, AttributeError):
            return None
        hidden = [
            name
            for name in listed
            for prefix, readers in READERS.items()
            if name.startswith(prefix) and request.who not in readers
        ]
        return f"catalog lists {hidden} to {request.who}" if hidden else None
    if any(key == "ns" and value for key, value in parse_qsl(query, keep_blank_values=True)):
        return None
    for prefix, readers in READERS.items():
        if path.startswith("/v2/" + prefix) and request.who not in readers:
            return f"{status} for {request.who} on {prefix}*"
    return None


async def send_raw_cases(
    registry: ServedRegistry,
    cases: list[raw.RawCase],
    findings: Findings,
    caplog: pytest.LogCaptureFixture,
    slowest: list[tuple[float, str, str]],
) -> None:
    """Fast cases one by one (their log lines are attributed), slow ones all at once."""

    def judge(case: raw.RawCase, result: raw.RawResult) -> None:
        if result.statuses:
            findings.count(result.statuses[0])
        else:
            findings.drop(case.case, case.describe(), "raw: closed")
        for status in result.statuses:
            if status >= 500:
                findings.add(
                    "raw-5xx", case.case, case.describe(), f"{status} {cut(result.received, 160)}"
                )
        if result.error:
            findings.add("raw-error", case.case, case.describe(), result.error)
        elif not result.closed and not result.statuses:
            findings.add("raw-hang", case.case, case.describe(), "open and silent at the deadline")

    for case in (c for c in cases if not c.slow):
        mark, sent_at = len(caplog.records), time.monotonic()
        judge(case, await raw.send(registry.port, case, RAW_DEADLINE))
        slowest.append((time.monotonic() - sent_at, case.case, case.describe()[:100]))
        check_records(caplog.records[mark:], findings, case.case, case.describe())
    slow = [c for c in cases if c.slow]
    mark = len(caplog.records)
    results = await asyncio.gather(*(raw.send(registry.port, c, RAW_SLOW_DEADLINE) for c in slow))
    for case, result in zip(slow, results, strict=True):
        judge(case, result)
        slowest.append((result.elapsed, case.case + " (slow)", case.describe()[:100]))
    check_records(caplog.records[mark:], findings, "raw/slow-cases (concurrent)", "-")


async def pull_back(
    session: aiohttp.ClientSession, images: dict[str, Image], headers: dict[str, str]
) -> list[str]:
    """Differences between what was pushed and what the server now serves."""
    wrong = []
    accept = {**headers, "Accept": "application/vnd.oci.image.manifest.v1+json"}
    for name, image in images.items():
        for reference in ("v1", image.digest):
            async with session.get(f"/v2/{name}/manifests/{reference}", headers=accept) as resp:
                body = await resp.read()
                if resp.status != 200 or body != image.manifest:
                    wrong.append(f"{name} manifest {reference}: {resp.status} {cut(body, 100)}")
        for blob in image.blobs:
            async with session.get(f"/v2/{name}/blobs/{sha256(blob)}", headers=headers) as resp:
                body = await resp.read()
                if resp.status != 200 or body != blob:
                    wrong.append(f"{name} blob {sha256(blob)}: {resp.status} {cut(body, 100)}")
    return wrong


@pytest.mark.parametrize("mode", MODES)
async def test_fuzz_never_fails_and_keeps_pushed_images(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    seed = fuzz_seed()
    rng = random.Random(f"{seed}/{mode}")
    monkeypatch.setattr(runner_mod, "HEADER_TIMEOUT", 2.0)
    for logger in ("regproxy", "aiohttp"):
        caplog.set_level(logging.INFO, logger=logger)
    world = World(mode)
    findings = Findings(seed, mode)
    fake = FakeUpstream()
    await fake.start()
    started = time.monotonic()
    registry: ServedRegistry | None = None
    try:
        config = server_config(tmp_path, mode, fake.url)
        fill_upstream(fake, world)
        registry = await serve_registry(config, shutdown_timeout=1.0)
        session = registry.http
        owner = None if mode == "none" else "root"
        images = {name: make_image((200, 300)) for name in PROTECTED}
        for name, image in images.items():
            await push_image_as(session, name, image, ("v1",), owner)  # type: ignore[arg-type]
            world.protected_digests.append(image.digest)
            world.protected_blobs.extend(sha256(blob) for blob in image.blobs)
        await prepare(session, world)
        before = frozenset(all_files(tmp_path))

        slowest: list[tuple[float, str, str]] = []
        phase = {"prepared": time.monotonic() - started}
        generator = Generator(rng, world)
        fixed = known_issue_requests(rng, world)
        for index in range(len(fixed) + RANDOM_REQUESTS):
            request = fixed[index] if index < len(fixed) else generator.random_request()
            request = protect(request) if mode == "none" else request
            mark, sent_at = len(caplog.records), time.monotonic()
            await send_one(registry, request, world, findings)
            slowest.append((time.monotonic() - sent_at, request.case, request.describe()[:100]))
            check_records(caplog.records[mark:], findings, request.case, request.describe())

        phase["client"] = time.monotonic() - started
        mutations = [generator.random_request() for _ in range(RAW_MUTATIONS)]
        if mode == "none":
            mutations = [protect(request) for request in mutations]
        cases = raw.raw_cases(rng, world, mutations)
        await send_raw_cases(registry, cases, findings, caplog, slowest)

        phase["raw"] = time.monotonic() - started
        root = {} if mode == "none" else auth_header("root")
        async with session.get("/v2/", headers=root) as resp:
            if resp.status != 200:
                findings.add("dead", "after", "GET /v2/", f"{resp.status} after fuzzing")
        for wrong in await pull_back(session, images, root):
            findings.add("pushed-image-changed", "after", "pull back", wrong)
        await registry.close()
        for path in bad_blobs(config.registry_storage) + unexpected_paths(config, tmp_path, before):
            findings.add("store-off-layout", "after", "walk the stores", path)
    finally:
        if registry is not None:
            await registry.close()
        await fake.close()
    elapsed = time.monotonic() - started
    print(f"fuzz mode={mode} seed={seed}: {findings.sent} answers in {elapsed:.1f} s {phase}")
    for duration, case, described in sorted(slowest, reverse=True)[:12]:
        print(f"  {duration:.3f}s {case} {described}")
    assert findings.problems == [], findings.report()
