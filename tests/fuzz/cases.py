"""The seeded request generator: valid-looking requests on every route, then mutated.

`World` is what the fuzzer knows about the server under test (repositories, digests,
upload sessions, tokens); it grows as answers come back, so later requests hit real
sessions and manifests. `known.py` holds the cases issue 11 names as causes
of 500s, sent in every run; `Generator.random_request` draws the rest from
`random.Random(seed)`, so a failing run is replayed with the same seed.

Every request carries a `case` label (family and mutation): failures are grouped by it.
"""

from __future__ import annotations

import base64
import gzip
import json
import random
import zlib
from dataclasses import dataclass, field
from functools import cache
from urllib.parse import unquote

from regproxy import manifest as mf
from tests.support.auth import PASSWORDS, basic
from tests.support.digests import sha256

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
FORM = "application/x-www-form-urlencoded"
PREFIX = "p"
#: the upstream's name: a registry host, so `?ns=docker.io` and the mirror both reach it
UPSTREAM = "docker.io"
#: the two images pushed before fuzzing and pulled back byte for byte afterwards
PROTECTED = ("keep/img1", "keep/img2")
FUZZ_REPOS = ("fz/a", "fz/b/c", "fz/d", "public/x", "alice/y", "misc/z")
#: names that are not local: with `mirror_upstream` their GETs go to the upstream
MIRROR_NAMES = ("library/alpine", "alpine", "org/tool")
PROXY_NAMES = (
    f"{PREFIX}/{UPSTREAM}/library/alpine",
    f"{PREFIX}/{UPSTREAM}/alpine",
    f"{PREFIX}/{UPSTREAM}/org/tool",
    f"{PREFIX}/{UPSTREAM}/nope/missing",
    f"{PREFIX}/nope/x",
    f"{PREFIX}/{UPSTREAM}",
    PREFIX,
)
BAD_NAMES = (
    "UPPER/case",
    "a//b",
    "a/b/",
    "..",
    "../etc",
    "%2e%2e/%2e%2e/x",
    "a%2fb",
    "_x",
    "a/_tags",
    ".x",
    "a..b",
    "a--",
    "-a",
    "a" * 256,
    "a/" * 128 + "b",
    "%00",
    "a%00b",
    "%C3%A9t%C3%A9",
    "%ff%fe",
    "a%20b",
    "a%0d%0ab",
    f"{PREFIX}/{UPSTREAM}/UPPER",
    f"{PREFIX}/{UPSTREAM}/" + "x" * 300,
    f"{PREFIX}/{'x' * 300}/a",
    f"{PREFIX}/{UPSTREAM}/..",
    "fz/a/..",
    "fz/./a",
    "é",
)
TAGS = ("v1", "latest", "3.20", "d", "x" * 128, "_under", "1.0-rc.1")
BAD_TAGS = (
    ".x",
    "-x",
    "x" * 129,
    "%00",
    "t%20t",
    "%C3%A9",
    "%ff",
    "a%2fb",
    "t%0d%0aX-Evil:1",
    "é",
    "sha256",
    "sha256:",
    "a:b",
    "%25",
    "*",
    "..",
    "x" * 5000,
)
BAD_DIGESTS = (
    "sha256:",
    "sha256:xyz",
    "sha256:" + "0" * 63,
    "sha256:" + "0" * 65,
    "SHA256:" + "0" * 64,
    "sha256:" + "A" * 64,
    "sha256:" + "g" * 64,
    "sha512:" + "0" * 64,
    "sha512:" + "0" * 128,
    "sha384:" + "0" * 96,
    "md5:" + "0" * 32,
    "blake3:" + "0" * 64,
    ":" + "0" * 64,
    "sha256",
    "sha256:" + "0" * 5000,
    "sha256:%00",
    "sha256:%C3%A9",
    "sha256:..%2f..%2fx",
    "%ff",
    "sha256:" + "0" * 32 + "%0d%0a" + "0" * 26,
    "sha256::" + "0" * 64,
    "+sha256:" + "0" * 64,
)
BAD_UPLOAD_IDS = (
    "0" * 32,
    "f" * 32,
    "0" * 31,
    "0" * 33,
    "..",
    "%2e%2e",
    "G" * 32,
    "0" * 31 + "%00",
    "x" * 5000,
    "%C3%A9" * 10,
    "00000000-0000-0000-0000-000000000000",
    # sessions another replica would hold: one registered in the store but unreachable
    # (the fuzz run registers it), one nobody registered (`storage.replicas`)
    "0badf00d" + "1" * 24,
    "deadbeef" + "2" * 24,
    "0badf00d/../../x",
)
#: the replica id the fuzz run registers with an address nobody listens on
GHOST_REPLICA = "0badf00d"
PAGE_NS = (
    "",
    "0",
    "1",
    "2",
    "-1",
    "1e9",
    "9" * 50,
    "9" * 5000,
    "0x10",
    "%C2%B2",
    "1.5",
    "%201",
    "%00",
    "nan",
    "+5",
    "١٢",
)
LASTS = ("", "a", "zzzz", "fz/a", "%C3%A9", "%ff", "a" * 5000, "%00", "v1", "\u00e9")
NS_QUERIES = (
    "ns=",
    "ns",
    "ns=&ns=docker.io",
    "ns=docker.io&ns=",
    f"ns={UPSTREAM}",
    "ns=nope.example",
    "ns=DOCKER.IO",
    "ns=%20",
    "ns=%00",
    "ns=" + "a" * 3000,
    "ns=%ff",
    "ns=docker.io:99999",
    "ns&ns",
    "ns=docker.io&ns=docker.io",
)
CONTENT_RANGES = (
    "0-0",
    "0-9",
    "5-1",
    "bytes=0-9",
    "0-" + "9" * 20,
    "-1-5",
    "abc",
    "0-",
    "0-9/10",
    "0-9/*",
    "9" * 5000,
    "é",
    "",
    " ",
    "0-9/abc",
    "1-1",
    "bytes 0-9/10",
    "0--1",
    "00000000000000000001-2",
)
RANGES = (
    "bytes=0-0",
    "bytes=-5",
    "bytes=5-1",
    "bytes=0-" + "9" * 30,
    "bytes=a-b",
    "items=0-1",
    "bytes=0-1,3-4",
    "bytes=",
    "é",
    "bytes=-0",
    "bytes=99999-",
    "bytes=" + "0-1," * 2000,
)
ACCEPTS = (
    mf.OCI_MANIFEST,
    mf.OCI_INDEX,
    mf.DOCKER_MANIFEST,
    mf.ACCEPT_ALL,
    "*/*",
    "",
    "text/html",
    "application/json;q=abc",
    ",,,,",
    "é",
    "x" * 8000,
    ", ".join([mf.OCI_MANIFEST] * 500),
)
CONTENT_TYPES = (
    mf.OCI_MANIFEST,
    mf.OCI_INDEX,
    mf.DOCKER_MANIFEST,
    mf.DOCKER_MANIFEST_LIST,
    "",
    "text/plain",
    "application/json",
    "application/vnd.oci.image.manifest.v1+json; charset=utf-8",
    "é",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "x" * 5000,
    ";;;",
)
WRONG_METHODS = ("OPTIONS", "TRACE", "PROPFIND", "FOO", "PATCH", "PUT", "POST", "DELETE", "get")
UNKNOWN_PATHS = (
    "/",
    "/v1/",
    "/v2/_catalog/x",
    "/v3/",
    "/auth",
    "/auth/token/x",
    "/v2/fz/a/unknown/x",
    "/v2/fz/a/blobs/uploads/" + "0" * 32 + "/extra",
    "/v2/fz/a/manifests/",
    "/v2/fz/a/blobs/",
    "/v2/fz/a/tags",
    "/v2/fz/a/tags/list/x",
    "/v2/_catalog/",
    "/v2//",
    "//v2/",
    "/v2/%2e%2e/",
    "/v2/fz/a/referrers/",
    "/favicon.ico",
    "/%ff",
    "/" + "a" * 9000,
    "/v2/.well-known/x",
)


@dataclass
class FuzzRequest:
    """One request as it goes on the wire; `target` is sent exactly as written."""

    case: str
    method: str
    target: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None
    chunked: bool = False
    #: whose credentials it carries: a user, "anonymous", or "garbage" (refused ones)
    who: str = "anonymous"

    def describe(self) -> str:
        """`METHOD target [headers] <body size>`: enough to replay it by hand."""
        target = self.target[:120] + ("…" if len(self.target) > 120 else "")
        shown = f"{self.method} {target}"
        if self.headers:
            shown += " [" + "; ".join(f"{k}: {v[:40]}" for k, v in self.headers) + "]"
        if self.body is not None:
            shown += f" <{len(self.body)} bytes{' chunked' if self.chunked else ''}>"
        return shown


@dataclass
class World:
    """What the fuzzer knows of the server; answers add sessions, blobs and manifests."""

    mode: str
    protected_digests: list[str] = field(default_factory=list)
    protected_blobs: list[str] = field(default_factory=list)
    #: repository → digests of blobs pushed there
    blobs: dict[str, list[str]] = field(default_factory=dict)
    #: repository → digests of manifests pushed there
    manifests: dict[str, list[str]] = field(default_factory=dict)
    #: upload session paths (`Location` of a 202)
    sessions: list[str] = field(default_factory=list)
    #: user → a bearer token (token mode)
    tokens: dict[str, str] = field(default_factory=dict)
    #: (repository at the upstream, tag, manifest digest, blob digests)
    upstream: list[tuple[str, str, str, list[str]]] = field(default_factory=list)
    #: blobs on the upstream that nothing fetched yet: (upstream repository, digest), so a
    #: fixed case can hit the first-fetch path (a blob flight) with each odd header
    fresh_blobs: list[tuple[str, str]] = field(default_factory=list)

    def learn(self, request: FuzzRequest, status: int, location: str | None) -> None:
        """Remember sessions, blobs and manifests the server just created."""
        if location is None or not location.startswith("/v2/"):
            return
        if status == 202 and "/blobs/uploads/" in location:
            self.sessions.append(location)
            del self.sessions[:-60]
        elif status == 201 and "/manifests/" in location:
            name, _, digest = location[4:].rpartition("/manifests/")
            self.manifests.setdefault(name, []).append(digest)
        elif status == 201 and "/blobs/" in location:
            name, _, digest = location[4:].rpartition("/blobs/")
            self.blobs.setdefault(name, []).append(digest)

    def all_manifest_digests(self) -> list[str]:
        found = [d for digests in self.manifests.values() for d in digests]
        return found + self.protected_digests + [entry[2] for entry in self.upstream]

    def all_blob_digests(self) -> list[str]:
        found = [d for digests in self.blobs.values() for d in digests]
        return found + self.protected_blobs + [d for entry in self.upstream for d in entry[3]]


# ---- bodies ------------------------------------------------------------------------------


@cache
def deflate_bomb() -> bytes:
    """16 MiB of zeros in about 16 KiB (zlib-wrapped, as HTTP `deflate` is)."""
    return zlib.compress(b"\0" * (16 << 20), 9)


@cache
def gzip_bomb() -> bytes:
    return gzip.compress(b"\0" * (16 << 20), 9)


def unended_deflate(data: bytes) -> bytes:
    """A deflate stream with no final block: a decoder waits for more, forever."""
    compressor = zlib.compressobj()
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


def descriptor(media_type: str, digest: str, size: int) -> dict:
    return {"mediaType": media_type, "digest": digest, "size": size}


def _manifest(config: dict, layers: list[dict], **extra: object) -> dict:
    return {
        "schemaVersion": 2,
        "mediaType": mf.OCI_MANIFEST,
        "config": config,
        "layers": layers,
        **extra,
    }


def manifest_variants() -> tuple[str, ...]:
    return (
        "valid",
        "valid",
        "valid",
        "index",
        "referrer",
        "nan-size",
        "inf-size",
        "int64-size",
        "negative-size",
        "bigint-size",
        "nan-schema",
        "nested-array",
        "nested-object",
        "many-layers",
        "wide-array",
        "many-annotations",
        "wrong-types",
        "not-json",
        "empty",
        "non-utf8",
        "long-strings",
        "bad-inner-digest",
        "docker-v2",
        "duplicate-keys",
        "float-size",
        "bool-size",
        "huge-platform",
        "deep-annotations",
    )


def manifest_body(rng: random.Random, world: World, repo: str, variant: str) -> bytes:
    """A manifest body of the given `variant` (see `manifest_variants`)."""
    blobs = world.blobs.get(repo) or world.protected_blobs or [sha256(b"missing")]
    config = descriptor(OCI_CONFIG, rng.choice(blobs), 2)
    layer = descriptor(OCI_LAYER, rng.choice(blobs), 3)
    base = _manifest(config, [layer])
    text = json.dumps(base)
    if variant == "valid":
        return json.dumps(_manifest(config, [layer], annotations={"n": str(rng.random())})).encode()
    if variant == "index":
        children = world.manifests.get(repo) or [rng.choice(world.all_manifest_digests())]
        doc = {
            "schemaVersion": 2,
            "mediaType": mf.OCI_INDEX,
            "manifests": [
                {**descriptor(mf.OCI_MANIFEST, d, 100), "platform": {"os": "linux"}}
                for d in children[:3]
            ],
        }
        return json.dumps(doc).encode()
    if variant == "referrer":
        subject = rng.choice(world.all_manifest_digests())
        doc = _manifest(
            config,
            [],
            artifactType=rng.choice(["application/x-fuzz", "", "é" * 10, "x" * 3000]),
            subject=descriptor(mf.OCI_MANIFEST, subject, 100),
        )
        return json.dumps(doc).encode()
    if variant == "nan-size":
        return text.replace('"size": 2', '"size": NaN').encode()
    if variant == "inf-size":
        token = rng.choice(["Infinity", "-Infinity", "1e400", "-1e400"])
        return text.replace('"size": 3', f'"size": {token}').encode()
    if variant == "int64-size":
        value = rng.choice([2**63, 2**64, 2**63 - 1, -(2**63) - 1, 2**128])
        return text.replace('"size": 3', f'"size": {value}').encode()
    if variant == "negative-size":
        return text.replace('"size": 2', '"size": -1').encode()
    if variant == "bigint-size":
        return text.replace('"size": 3', '"size": ' + "9" * rng.choice([30, 4000, 5000])).encode()
    if variant == "float-size":
        return text.replace('"size": 3', '"size": 3.0').encode()
    if variant == "bool-size":
        return text.replace('"size": 3', '"size": true').encode()
    if variant == "nan-schema":
        return text.replace('"schemaVersion": 2', '"schemaVersion": NaN').encode()
    if variant == "nested-array":
        depth = rng.choice([1000, 100_000, 1_000_000])
        return b'{"schemaVersion":2,"layers":' + b"[" * depth + b"]" * depth + b"}"
    if variant == "nested-object":
        depth = rng.choice([1000, 50_000, 300_000])
        return b'{"schemaVersion":2,"config":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"
    if variant == "deep-annotations":
        depth = 20_000
        return text.replace(
            '"layers"', '"annotations": ' + '{"a":' * depth + "1" + "}" * depth + ', "layers"'
        ).encode()
    if variant == "many-layers":
        count = rng.choice([10_000, 28_000])
        return json.dumps(_manifest(config, [layer] * count)).encode()
    if variant == "wide-array":
        return (
            b'{"schemaVersion":2,"mediaType":"'
            + mf.OCI_MANIFEST.encode()
            + b'","layers":['
            + b"0," * 1_500_000
            + b"0]}"
        )
    if variant == "many-annotations":
        doc = _manifest(config, [layer], annotations={str(i): "" for i in range(150_000)})
        return json.dumps(doc).encode()
    if variant == "wrong-types":
        doc = dict(base)
        key = rng.choice(["config", "layers", "mediaType", "schemaVersion", "subject", "manifests"])
        doc[key] = rng.choice([None, 1, "x", [], {}, [1, 2], {"digest": 5}, [None], [[{}]]])
        return json.dumps(doc).encode()
    if variant == "not-json":
        return rng.choice(
            [
                b"null",
                b"[]",
                b"1",
                b'"s"',
                b"{",
                text[:-7].encode(),
                b"\xef\xbb\xbf" + text.encode(),
                rng.randbytes(200),
                b"{}",
                b'{"schemaVersion":2}',
                b"true",
                b"-0",
                b"1e999",
            ]
        )
    if variant == "empty":
        return b""
    if variant == "non-utf8":
        return text.replace("linux", "").encode().replace(b"application", b"\xff\xfe\xc3(")
    if variant == "long-strings":
        doc = _manifest(
            config, [layer], annotations={"k" * 1000: "v" * rng.choice([10_000, 3_000_000])}
        )
        doc["mediaType"] = rng.choice([mf.OCI_MANIFEST, "x" * 100_000])
        return json.dumps(doc).encode()
    if variant == "bad-inner-digest":
        bad = rng.choice(BAD_DIGESTS)
        return json.dumps(_manifest(descriptor(OCI_CONFIG, bad, 2), [layer])).encode()
    if variant == "docker-v2":
        doc = {
            "schemaVersion": 2,
            "mediaType": mf.DOCKER_MANIFEST,
            "config": descriptor(
                "application/vnd.docker.container.image.v1+json", config["digest"], 2
            ),
            "layers": [
                descriptor("application/vnd.docker.image.rootfs.diff.tar.gzip", layer["digest"], 3)
            ],
        }
        return json.dumps(doc).encode()
    if variant == "duplicate-keys":
        return text.replace(
            '"schemaVersion": 2', '"schemaVersion": 2, "schemaVersion": 1, "layers": 5'
        ).encode()
    if variant == "huge-platform":
        doc = {
            "schemaVersion": 2,
            "mediaType": mf.OCI_INDEX,
            "manifests": [
                {
                    **descriptor(mf.OCI_MANIFEST, rng.choice(world.all_manifest_digests()), 10),
                    "platform": {"os": "linux", "features": ["f"] * 200_000},
                }
            ],
        }
        return json.dumps(doc).encode()
    raise AssertionError(variant)


def encode_body(rng: random.Random, body: bytes, coding: str) -> tuple[bytes, str]:
    """`body` under a `Content-Encoding`, valid or broken; returns (bytes, header value)."""
    if coding == "gzip":
        return gzip.compress(body), "gzip"
    if coding == "deflate":
        return zlib.compress(body), "deflate"
    if coding == "raw-deflate":  # RFC 1951 without the zlib wrapper: some clients send it
        compressor = zlib.compressobj(wbits=-15)
        return compressor.compress(body) + compressor.flush(), "deflate"
    if coding == "bad-gzip":
        return rng.choice(
            [b"not gzip at all", b"\x1f\x8b\x08\x00garbage", gzip.compress(body)[:-9]]
        ), "gzip"
    if coding == "bad-deflate":
        return rng.choice(
            [b"not deflate", b"\x78\x9c\xff\xff\xff", zlib.compress(body)[:-4] + b"XXXX"]
        ), "deflate"
    if coding == "unended-deflate":
        return unended_deflate(body), "deflate"
    if coding == "deflate-bomb":
        return deflate_bomb(), "deflate"
    if coding == "gzip-bomb":
        return gzip_bomb(), "gzip"
    if coding == "unknown":
        return body, rng.choice(
            ["br", "zstd", "compress", "x-fuzz", "gzip, deflate", "identity", "é", "gzip;q=1"]
        )
    raise AssertionError(coding)


CODINGS = (
    "gzip",
    "deflate",
    "raw-deflate",
    "bad-gzip",
    "bad-deflate",
    "unended-deflate",
    "deflate-bomb",
    "gzip-bomb",
    "unknown",
)


# ---- credentials -------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_BASIC = (
    "Basic éé",
    "Basic " + "é" * 100,
    "Basic " + b64(b"\xff\xfe:\xff"),
    "Basic " + b64(b"alice"),
    "Basic " + b64("alicé:pässword".encode()),
    "Basic " + b64("alice:é".encode("latin-1")),
    "Basic ",
    "Basic",
    "Basic ====",
    "Basic !!!",
    "Basic " + "A" * 12000,
    "basic " + b64(b":"),
    "Basic " + b64(b"alice:wrong"),
    "Basic " + b64(b"nobody:x"),
    "Basic\u00a0" + b64(b"alice:x"),
    "Basic " + b64(b"\x00:\x00"),
    "Basic " + b64(("a" * 5000 + ":b").encode()),
    "Basic " + b64(b"alice:alice-secret") + "é",
)
BAD_BEARER = (
    "Bearer é",
    "Bearer a.é.b",
    "Bearer " + "€" * 50,
    "Bearer ",
    "Bearer",
    "Bearer a.b.c",
    "Bearer " + "a." * 3000,
    "Bearer ...",
    "Bearer eyJ.eyJ.sig",
    "bearer x",
    "Bearer \u0000",
    "Bearer " + b64(b"\xff" * 30) + "." + b64(b"{}") + ".x",
)
OTHER_AUTH = ("Digest x=1", "Negotiate abc", "é", "x" * 12000, "Basic  " + b64(b"alice:x"), ",")


def credentials(rng: random.Random, world: World) -> tuple[str, list[tuple[str, str]]]:
    """(who, headers) for one request under the run's auth mode."""
    garbage = rng.choice(BAD_BASIC + BAD_BEARER + OTHER_AUTH)
    roll = rng.random()
    if world.mode == "none":
        if roll < 0.85:
            return "anonymous", []
        return "garbage", [("Authorization", garbage)]
    users = ("alice", "bob")
    if roll < 0.12:
        return "anonymous", []
    if roll < 0.30:
        return "garbage", [("Authorization", garbage)]
    user = "alice" if rng.random() < 0.75 else rng.choice(users)
    if world.mode == "token" and rng.random() < 0.8 and user in world.tokens:
        return user, [("Authorization", f"Bearer {world.tokens[user]}")]
    return user, [("Authorization", basic(user, PASSWORDS[user]))]


# ---- the generator -----------------------------------------------------------------------


class Generator:
    """Random requests over every route; `random_request` is deterministic per seed."""

    FAMILIES: tuple[tuple[str, int], ...] = (
        ("base", 3),
        ("catalog", 4),
        ("tags", 8),
        ("manifest-get", 14),
        ("manifest-put", 10),
        ("manifest-delete", 4),
        ("blob-get", 10),
        ("blob-delete", 3),
        ("upload-start", 8),
        ("upload-session", 12),
        ("referrers", 5),
        ("token", 6),
        ("unknown", 5),
    )

    def __init__(self, rng: random.Random, world: World) -> None:
        self.rng = rng
        self.world = world
        self._families = [name for name, weight in self.FAMILIES for _ in range(weight)]

    # -- pieces --

    def name(self, write: bool = False) -> str:
        roll = self.rng.random()
        if roll < 0.5:
            return self.rng.choice(FUZZ_REPOS)
        if roll < 0.6 and not write:
            return self.rng.choice(PROTECTED)
        if roll < 0.75:
            return self.rng.choice(PROXY_NAMES)
        if roll < 0.85:
            return self.rng.choice(MIRROR_NAMES)
        return self.rng.choice(BAD_NAMES)

    def digest(self, kind: str) -> str:
        roll = self.rng.random()
        known = (
            self.world.all_blob_digests() if kind == "blob" else self.world.all_manifest_digests()
        )
        if roll < 0.55 and known:
            return self.rng.choice(known)
        if roll < 0.75:
            return sha256(self.rng.randbytes(8))
        return self.rng.choice(BAD_DIGESTS)

    def reference(self) -> str:
        roll = self.rng.random()
        if roll < 0.45:
            return self.rng.choice(TAGS)
        if roll < 0.8:
            return self.digest("manifest")
        return self.rng.choice(BAD_TAGS)

    def query(self, *pairs: str) -> str:
        parts = [p for p in pairs if p]
        return ("?" + "&".join(parts)) if parts else ""

    def page_query(self) -> str:
        pairs = []
        if self.rng.random() < 0.6:
            pairs.append("n=" + self.rng.choice(PAGE_NS))
        if self.rng.random() < 0.5:
            pairs.append("last=" + self.rng.choice(LASTS))
        if self.rng.random() < 0.1:
            pairs.append("n=1&n=2&last=a&last=")
        return self.query(*pairs)

    # -- families --

    def random_request(self) -> FuzzRequest:
        family = self.rng.choice(self._families)
        request = getattr(self, "_" + family.replace("-", "_"))()
        request.who, auth = credentials(self.rng, self.world)
        request.headers = auth + request.headers
        request.case = f"{family}/{request.case}" if request.case else family
        self._mutate(request)
        return request

    def _base(self) -> FuzzRequest:
        method = self.rng.choice(["GET", "GET", "HEAD"])
        return FuzzRequest("", method, self.rng.choice(["/v2/", "/v2"]) + self.page_query())

    def _catalog(self) -> FuzzRequest:
        return FuzzRequest("", self.rng.choice(["GET", "HEAD"]), "/v2/_catalog" + self.page_query())

    def _tags(self) -> FuzzRequest:
        return FuzzRequest("", "GET", f"/v2/{self.name()}/tags/list" + self.page_query())

    def _manifest_get(self) -> FuzzRequest:
        method = self.rng.choice(["GET", "GET", "HEAD"])
        headers = []
        if self.rng.random() < 0.7:
            headers.append(("Accept", self.rng.choice(ACCEPTS)))
        return FuzzRequest("", method, f"/v2/{self.name()}/manifests/{self.reference()}", headers)

    def _manifest_put(self) -> FuzzRequest:
        repo = self.name(write=True)
        variant = self.rng.choice(manifest_variants())
        body = manifest_body(self.rng, self.world, repo, variant)
        headers = [("Content-Type", self.rng.choice(CONTENT_TYPES[:4]))]
        if self.rng.random() < 0.2:
            headers = [("Content-Type", self.rng.choice(CONTENT_TYPES))]
        reference = self.rng.choice(TAGS) if self.rng.random() < 0.6 else self.reference()
        if self.rng.random() < 0.15:
            reference = sha256(body)
        case = variant
        if self.rng.random() < 0.12:
            coding = self.rng.choice(CODINGS)
            body, value = encode_body(self.rng, body, coding)
            headers.append(("Content-Encoding", value))
            case += f"+{coding}"
        request = FuzzRequest(case, "PUT", f"/v2/{repo}/manifests/{reference}", headers, body)
        request.chunked = self.rng.random() < 0.1
        return request

    def _manifest_delete(self) -> FuzzRequest:
        return FuzzRequest(
            "", "DELETE", f"/v2/{self.name(write=True)}/manifests/{self.reference()}"
        )

    def _blob_get(self) -> FuzzRequest:
        headers = []
        if self.rng.random() < 0.3:
            headers.append(("Range", self.rng.choice(RANGES)))
        method = self.rng.choice(["GET", "GET", "HEAD"])
        return FuzzRequest("", method, f"/v2/{self.name()}/blobs/{self.digest('blob')}", headers)

    def _blob_delete(self) -> FuzzRequest:
        return FuzzRequest("", "DELETE", f"/v2/{self.name(write=True)}/blobs/{self.digest('blob')}")

    def _upload_start(self) -> FuzzRequest:
        repo = self.name(write=True)
        roll = self.rng.random()
        if roll < 0.35:
            return FuzzRequest("session", "POST", f"/v2/{repo}/blobs/uploads/")
        if roll < 0.7:
            data = self.rng.randbytes(self.rng.choice([0, 1, 100, 5000]))
            digest = sha256(data) if self.rng.random() < 0.7 else self.digest("blob")
            request = FuzzRequest(
                "monolithic", "POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", [], data
            )
            if self.rng.random() < 0.15:
                coding = self.rng.choice(CODINGS)
                request.body, value = encode_body(self.rng, data, coding)
                request.headers.append(("Content-Encoding", value))
                request.case += f"+{coding}"
            return request
        source = self.rng.choice([*FUZZ_REPOS, *PROTECTED, *BAD_NAMES, "", PROXY_NAMES[0]])
        query = self.rng.choice(
            [
                f"mount={self.digest('blob')}&from={source}",
                f"mount={self.digest('blob')}",
                f"from={source}",
                "mount=&from=",
                f"mount={self.digest('blob')}&from={source}&digest=x",
            ]
        )
        return FuzzRequest("mount", "POST", f"/v2/{repo}/blobs/uploads/?{query}")

    def session_path(self) -> str:
        if self.world.sessions and self.rng.random() < 0.75:
            return self.rng.choice(self.world.sessions)
        return f"/v2/{self.name(write=True)}/blobs/uploads/{self.rng.choice(BAD_UPLOAD_IDS)}"

    def _upload_session(self) -> FuzzRequest:
        path = self.session_path()
        method = self.rng.choice(["PATCH", "PATCH", "PUT", "GET", "DELETE"])
        headers: list[tuple[str, str]] = []
        body = None
        case = ""
        if method in ("PATCH", "PUT"):
            body = self.rng.randbytes(self.rng.choice([0, 1, 10, 1000]))
            if self.rng.random() < 0.4:
                headers.append(("Content-Range", self.rng.choice(CONTENT_RANGES)))
            if self.rng.random() < 0.12:
                coding = self.rng.choice(CODINGS)
                body, value = encode_body(self.rng, body, coding)
                headers.append(("Content-Encoding", value))
                case = coding
        if method == "PUT":
            digest = sha256(body or b"") if self.rng.random() < 0.4 else self.digest("blob")
            path += self.rng.choice(
                [f"?digest={digest}", "", "?digest=", f"?digest={digest}&digest=x"]
            )
        return FuzzRequest(case, method, path, headers, body)

    def _referrers(self) -> FuzzRequest:
        query = self.rng.choice(
            [
                "",
                "?artifactType=application/x-fuzz",
                "?artifactType=",
                "?artifactType=%ff",
                "?artifactType=" + "a" * 5000,
            ]
        )
        return FuzzRequest(
            "", "GET", f"/v2/{self.name()}/referrers/{self.digest('manifest')}{query}"
        )

    def scope(self) -> str:
        name = self.rng.choice([*FUZZ_REPOS, *PROTECTED, *PROXY_NAMES, *BAD_NAMES])
        return self.rng.choice(
            [
                f"repository:{name}:pull",
                f"repository:{name}:pull,push",
                f"repository:{name}:*",
                f"repository:{name}:delete",
                "repository",
                "repository::",
                "registry:catalog:*",
                f"repository:{name}:" + ",".join(["pull"] * 500),
                "repository:" + "a" * 5000 + ":pull",
                "%C3%A9",
                "%ff",
                "repository:fz/a:pull%20repository:fz/b/c:push",
                "",
                ":::::",
            ]
        )

    def _token(self) -> FuzzRequest:
        scopes = [f"scope={self.scope()}" for _ in range(self.rng.choice([0, 1, 2, 3, 300]))]
        service = self.rng.choice(
            ["service=regproxy", "service=other", "", "service=", "service=%ff"]
        )
        extra = self.rng.choice(
            ["", "account=alice", "offline_token=true", "client_id=x", "account=" + "é" * 100]
        )
        target = "/auth/token" + self.query(service, *scopes, extra)
        if self.rng.random() < 0.6:
            return FuzzRequest("get", "GET", target)
        form = self.rng.choice(
            [
                f"grant_type=password&username=alice&password={PASSWORDS['alice']}&service=regproxy&scope=repository:fz/a:pull",
                "grant_type=password&username=alice&password=wrong",
                "grant_type=refresh_token&refresh_token=x",
                "grant_type=password&username=%ff&password=%fe",
                "grant_type=&scope=" + self.scope(),
                "a=%zz&&&==",
                "grant_type=password&username=" + "a" * 100_000,
                "",
                "\xff\xfe",
                "grant_type=password&username=alice&password=alice-secret&scope="
                + "&scope=".join([self.scope()] * 50),
            ]
        )
        content_type = self.rng.choice(
            [
                FORM,
                FORM,
                "multipart/form-data",
                "multipart/form-data; boundary=zz",
                f"{FORM}; charset=nope",
                "application/json",
                "",
                f"{FORM}; charset=utf-16",
                "text/plain",
            ]
        )
        body = (
            form.encode("utf-8", "surrogateescape")
            if self.rng.random() < 0.9
            else self.rng.randbytes(300)
        )
        headers = [("Content-Type", content_type)] if content_type else []
        case = "post"
        if self.rng.random() < 0.2:
            coding = self.rng.choice(CODINGS)
            body, value = encode_body(self.rng, body, coding)
            headers.append(("Content-Encoding", value))
            case += f"+{coding}"
        return FuzzRequest(case, "POST", target, headers, body)

    def _unknown(self) -> FuzzRequest:
        if self.rng.random() < 0.5:
            return FuzzRequest(
                "path", self.rng.choice(["GET", "POST", "DELETE"]), self.rng.choice(UNKNOWN_PATHS)
            )
        route = self.rng.choice(
            [
                "/v2/",
                "/v2/_catalog",
                "/v2/fz/a/tags/list",
                f"/v2/fz/a/manifests/{self.reference()}",
                f"/v2/fz/a/blobs/{self.digest('blob')}",
                "/v2/fz/a/blobs/uploads/",
                self.session_path(),
                f"/v2/fz/a/referrers/{self.digest('manifest')}",
                "/auth/token",
            ]
        )
        return FuzzRequest(
            "method",
            self.rng.choice(WRONG_METHODS),
            route,
            [],
            b"x" if self.rng.random() < 0.3 else None,
        )

    # -- mutations --

    def _mutate(self, request: FuzzRequest) -> None:
        rng = self.rng
        labels = []
        if rng.random() < 0.12 and request.target.startswith("/v2/"):
            joiner = "&" if "?" in request.target else "?"
            request.target += joiner + rng.choice(NS_QUERIES)
            labels.append("ns")
        if rng.random() < 0.04:
            request.target += (
                ("&" if "?" in request.target else "?")
                + "q="
                + "x" * rng.choice([3000, 9000, 70_000])
            )
            labels.append("long-url")
        if rng.random() < 0.04:
            request.target = request.target.replace(
                "/v2/", "/v2/" + rng.choice(["%ff/", "%00", "é/", "./", "../", "//", "%2F"]), 1
            )
            labels.append("path-garbage")
        if rng.random() < 0.05:
            name = rng.choice(
                [
                    "X-Fuzz",
                    "X-Request-ID",
                    "User-Agent",
                    "Referer",
                    "Accept",
                    "Content-Type",
                    "Host",
                    "X-Forwarded-Host",
                ]
            )
            value = rng.choice(
                [
                    "x" * rng.choice([3000, 8000, 16000, 20000]),
                    "é" * 500,
                    "\t",
                    "a\u2028b",
                    "%00",
                    "",
                ]
            )
            request.headers.append((name, value))
            labels.append("long-header")
        if rng.random() < 0.04:
            value = rng.choice(["1", "", "0badf00d", "x" * 300, "é"])
            request.headers.append(("X-Regproxy-Forwarded", value))
            labels.append("forwarded")
        if rng.random() < 0.03 and request.method != "GET":
            request.headers.append(("Expect", rng.choice(["100-continue", "fuzz"])))
            labels.append("expect")
        if labels:
            request.case += "+" + "+".join(labels)


def protect(request: FuzzRequest) -> FuzzRequest:
    """In the open mode nothing stops a write to the protected images: point writes
    elsewhere (with auth the rules refuse them, so there they are sent unchanged)."""
    if request.method in ("GET", "HEAD"):
        return request
    path, sep, query = request.target.partition("?")
    if "keep" in unquote(path).lower():
        path = path.replace("keep", "fz")
        if "keep" in unquote(path).lower():
            path = "/v2/fz/a/manifests/v1"
        request.target = path + sep + query
    return request
