"""The causes of 500s that issue 11 lists, as fixed requests sent in every fuzz run.

Grouped by cause, each on every route it can reach; the case label (`issue/<cause>`)
names the group in a failure report.
"""

from __future__ import annotations

import gzip
import random
import zlib

from regproxy import manifest as mf
from tests.fuzz.cases import (
    BAD_BASIC,
    BAD_BEARER,
    BAD_DIGESTS,
    BAD_NAMES,
    BAD_TAGS,
    BAD_UPLOAD_IDS,
    CONTENT_RANGES,
    FORM,
    LASTS,
    NS_QUERIES,
    OTHER_AUTH,
    PAGE_NS,
    RANGES,
    UPSTREAM,
    WRONG_METHODS,
    FuzzRequest,
    World,
    deflate_bomb,
    gzip_bomb,
    manifest_body,
    manifest_variants,
    unended_deflate,
)
from tests.support.auth import PASSWORDS, basic
from tests.support.digests import sha256


def known_issue_requests(rng: random.Random, world: World) -> list[FuzzRequest]:
    """Every cause of a 500 that issue 11 lists, on every route it names, in every run.

    In the auth modes they are sent as alice (Basic: both modes take it) so they reach
    the handlers, and some anonymously; sessions come from `world.sessions` (alice's).
    """
    alice = [] if world.mode == "none" else [("Authorization", basic("alice"))]
    out: list[FuzzRequest] = []

    def add(
        case: str,
        method: str,
        target: str,
        *headers: tuple[str, str],
        body: bytes | None = None,
        who: list[tuple[str, str]] | None = None,
    ) -> None:
        auth = alice if who is None else who
        sent = [*auth, *headers]
        request = FuzzRequest(f"issue/{case}", method, target, sent, body)
        credentials = [value for name, value in sent if name == "Authorization"]
        if credentials:
            users = {basic(user): user for user in PASSWORDS}
            request.who = users.get(credentials[0], "garbage") if len(credentials) == 1 else "?"
        out.append(request)

    digest = world.protected_digests[0]
    blob = world.protected_blobs[0]
    token_query = "/auth/token?service=regproxy&scope=repository:fz/a:pull"
    # non-ASCII (and otherwise broken) credentials, on a route of every kind of check
    for header in BAD_BASIC + BAD_BEARER + OTHER_AUTH:
        for route in (
            "/v2/",
            "/v2/_catalog",
            "/v2/keep/img1/manifests/v1",
            "/v2/fz/a/blobs/uploads/",
            token_query,
        ):
            method = "POST" if route.endswith("uploads/") else "GET"
            add("auth-header", method, route, ("Authorization", header), who=[])
    # bodies under a Content-Encoding that does not decode (and some that do)
    manifest = manifest_body(rng, world, "fz/a", "valid")
    encoded = [
        ("gzip", b"not gzip at all"),
        ("gzip", b"\x1f\x8b\x08\x00garbage"),
        ("gzip", gzip.compress(manifest)[:-9]),
        ("deflate", b"not deflate"),
        ("deflate", b"\x78\x9c\xff\xff\xff"),
        ("deflate", zlib.compress(manifest)[:-4] + b"XXXX"),
        ("deflate", unended_deflate(manifest)),
        ("deflate", deflate_bomb()),
        ("gzip", gzip_bomb()),
        ("br", manifest),
        ("zstd", manifest),
        ("gzip, deflate", manifest),
        ("gzip", gzip.compress(manifest)),
        ("deflate", zlib.compress(manifest)),
    ]
    form = f"grant_type=password&username=alice&password={PASSWORDS['alice']}&service=regproxy"
    for coding, data in encoded:
        label = f"content-encoding-{coding}"
        if coding in ("gzip", "deflate"):
            inner = gzip.decompress if coding == "gzip" else zlib.decompress
            try:
                ok = inner(data) == manifest
            except (OSError, EOFError, zlib.error):
                ok = False
            label += (
                "-valid"
                if ok
                else ("-bomb" if len(data) < 20_000 and len(data) > 1000 else "-broken")
            )
        header = ("Content-Encoding", coding)
        ctype = ("Content-Type", mf.OCI_MANIFEST)
        add(label, "PUT", "/v2/fz/a/manifests/enc", header, ctype, body=data)
        add(label, "POST", f"/v2/fz/a/blobs/uploads/?digest={sha256(data)}", header, body=data)
        if world.sessions:
            session = world.sessions[len(out) % len(world.sessions)]
            add(label, "PATCH", session, header, body=data)
            add(label, "PUT", f"{session}?digest={sha256(data)}", header, body=data)
        posted = zlib.compress(form.encode()) if coding == "deflate" and "valid" in label else data
        add(label, "POST", "/auth/token", header, ("Content-Type", FORM), body=posted)
    # an empty or repeated `ns` on every route that reads it
    for index, query in enumerate(NS_QUERIES):
        who = alice if index % 2 == 0 else []
        for name in ("keep/img1", "library/alpine", "fz/a"):
            for route in (
                "manifests/v1",
                f"manifests/{digest}",
                f"blobs/{blob}",
                "tags/list",
                f"referrers/{digest}",
            ):
                add("ns-param", "GET", f"/v2/{name}/{route}?{query}", who=who)
                if not route.startswith(("tags", "referrers")):
                    add("ns-param", "HEAD", f"/v2/{name}/{route}?{query}", who=who)
    # an empty `ns` is no upstream: the repository's own rules must still apply
    bob = [("Authorization", basic("bob"))]
    for query in ("ns=", "ns", "ns=&ns=docker.io", "ns=docker.io&ns="):
        for route in ("manifests/v1", "tags/list", f"referrers/{digest}"):
            add("ns-param-access", "GET", f"/v2/alice/y/{route}?{query}", who=bob)
            add("ns-param-access", "GET", f"/v2/misc/z/{route}?{query}", who=[])
    # manifests: NaN, sizes past int64, absurd nesting and element counts
    for variant in manifest_variants():
        body = manifest_body(rng, world, "fz/a", variant)
        add(
            f"manifest-{variant}",
            "PUT",
            "/v2/fz/a/manifests/odd",
            ("Content-Type", mf.OCI_MANIFEST),
            body=body,
        )
        if variant in ("nested-array", "nested-object", "nan-size", "int64-size", "many-layers"):
            add(
                f"manifest-{variant}",
                "PUT",
                f"/v2/fz/a/manifests/{sha256(body)}",
                ("Content-Type", mf.OCI_INDEX),
                body=body,
            )
    # very long URLs and header values
    for size in (4000, 8190, 8191, 9000, 16_384, 70_000):
        add("long-url", "GET", "/v2/fz/a/tags/list?last=" + "a" * size)
        add("long-url", "GET", "/v2/" + "a/" * (size // 2) + "b/manifests/v1")
        add("long-url", "GET", f"/v2/fz/a/manifests/{'t' * size}")
    for size in (4000, 8190, 16_000, 16_384, 17_000, 65_536):
        for name in (
            "X-Fuzz",
            "Authorization",
            "Accept",
            "X-Request-ID",
            "User-Agent",
            "Content-Range",
        ):
            add(
                "long-header",
                "GET",
                "/v2/keep/img1/manifests/v1",
                (name, "a" * size),
                who=[] if name == "Authorization" else None,
            )
    # bad digests, names, tags
    for name in BAD_NAMES:
        add("bad-name", "GET", f"/v2/{name}/manifests/v1")
        add("bad-name", "GET", f"/v2/{name}/tags/list")
        add(
            "bad-name",
            "PUT",
            f"/v2/{name}/manifests/v1",
            ("Content-Type", mf.OCI_MANIFEST),
            body=manifest,
        )
        add("bad-name", "POST", f"/v2/{name}/blobs/uploads/")
        add("bad-name", "GET", f"/v2/{name}/referrers/{digest}")
    for tag in BAD_TAGS:
        add("bad-tag", "GET", f"/v2/keep/img1/manifests/{tag}")
        add(
            "bad-tag",
            "PUT",
            f"/v2/fz/a/manifests/{tag}",
            ("Content-Type", mf.OCI_MANIFEST),
            body=manifest,
        )
        add("bad-tag", "DELETE", f"/v2/fz/a/manifests/{tag}")
        add("bad-tag", "GET", f"/v2/p/{UPSTREAM}/library/alpine/manifests/{tag}")
    for bad in BAD_DIGESTS:
        add("bad-digest", "GET", f"/v2/keep/img1/blobs/{bad}")
        add("bad-digest", "HEAD", f"/v2/p/{UPSTREAM}/library/alpine/blobs/{bad}")
        add("bad-digest", "DELETE", f"/v2/fz/a/blobs/{bad}")
        add("bad-digest", "GET", f"/v2/keep/img1/manifests/{bad}")
        add("bad-digest", "GET", f"/v2/keep/img1/referrers/{bad}")
        add("bad-digest", "POST", f"/v2/fz/a/blobs/uploads/?digest={bad}", body=b"x")
        add("bad-digest", "POST", f"/v2/fz/a/blobs/uploads/?mount={bad}&from=keep/img1")
        if world.sessions:
            add("bad-digest", "PUT", f"{world.sessions[-1]}?digest={bad}", body=b"")
    # bad Content-Range on a live session
    for value in CONTENT_RANGES:
        if world.sessions:
            add(
                "content-range",
                "PATCH",
                world.sessions[0],
                ("Content-Range", value),
                body=b"0123456789",
            )
            add(
                "content-range",
                "PUT",
                f"{world.sessions[0]}?digest={sha256(b'x')}",
                ("Content-Range", value),
                body=b"x",
            )
    # bad pagination
    for route in (
        "/v2/_catalog",
        "/v2/keep/img1/tags/list",
        f"/v2/p/{UPSTREAM}/library/alpine/tags/list",
        "/v2/library/alpine/tags/list",
    ):
        for n in PAGE_NS:
            add("pagination-n", "GET", f"{route}?n={n}")
        for last in LASTS:
            add("pagination-last", "GET", f"{route}?n=1&last={last}")
    # unknown upload ids
    for upload_id in BAD_UPLOAD_IDS:
        for method in ("GET", "PATCH", "PUT", "DELETE"):
            query = f"?digest={sha256(b'x')}" if method == "PUT" else ""
            add(
                "upload-id",
                method,
                f"/v2/fz/a/blobs/uploads/{upload_id}{query}",
                body=b"x" if method in ("PATCH", "PUT") else None,
            )
    # methods on the wrong routes
    session = world.sessions[0] if world.sessions else "/v2/fz/a/blobs/uploads/" + "0" * 32
    for method in WRONG_METHODS:
        for route in (
            "/v2/",
            "/v2/_catalog",
            "/v2/keep/img1/tags/list",
            "/v2/keep/img1/manifests/v1",
            f"/v2/keep/img1/blobs/{blob}",
            "/v2/fz/a/blobs/uploads/",
            session,
            f"/v2/keep/img1/referrers/{digest}",
            "/auth/token",
        ):
            add(
                "wrong-method",
                method,
                route,
                body=b"x" if method in ("PUT", "POST", "PATCH") else None,
            )
    # the token endpoint with garbage scopes and forms
    scopes = [
        "repository",
        "repository::",
        "repository:fz/a",
        "repository:fz/a:",
        ":fz/a:pull",
        "repository:" + "a" * 5000 + ":pull",
        "repository:%C3%A9:pull",
        "repository:%ff:pull",
        "repository:fz/a:" + ",".join(["pull"] * 1000),
        "registry:catalog:*",
        "repository:p/docker.io/library/alpine:pull,push,delete",
        "repository:..:pull",
        "a:b:c:d:e",
        "repository:fz/a:pull%20" * 200,
    ]
    for scope in scopes:
        add("token-scope", "GET", f"/auth/token?service=regproxy&scope={scope}", who=[])
        add(
            "token-scope",
            "GET",
            f"/auth/token?service=regproxy&scope={scope}",
            ("Authorization", basic("alice")),
            who=[],
        )
        body = f"grant_type=password&username=alice&password={PASSWORDS['alice']}&scope={scope}"
        add("token-form", "POST", "/auth/token", ("Content-Type", FORM), body=body.encode(), who=[])
    for content_type, body in (
        (FORM, b"grant_type=password&username=%ff&password=%fe"),
        (FORM, b"\xff\xfe\xfd"),
        (FORM, b"a=%zz&&&=="),
        (f"{FORM}; charset=nope", b"grant_type=password"),
        (f"{FORM}; charset=utf-16", b"grant_type=password"),
        ("multipart/form-data", b"--x\r\n"),
        (
            "multipart/form-data; boundary=zz",
            b"--zz\r\nContent-Disposition: form-data\r\n\r\nx\r\n--zz--\r\n",
        ),
        ("multipart/form-data; boundary=zz", b"--zz\r\ngarbage"),
        ("application/json", b'{"grant_type":"password"}'),
        (FORM, b"grant_type=password&username=" + b"a" * 2_000_000),
        (FORM, b"grant_type=refresh_token&refresh_token=x"),
        (FORM, b"grant_type=\xff"),
        ("", b"grant_type=password"),
        ("\xe9", b"x"),
    ):
        headers = [("Content-Type", content_type)] if content_type else []
        add("token-form", "POST", "/auth/token", *headers, body=body, who=[])
    # odd Range headers on every kind of blob answer: local, cached, and a first fetch
    local = world.protected_blobs[-1]
    cached = world.upstream[0][3][-1] if world.upstream else local
    fresh = iter(world.fresh_blobs)
    for value in RANGES:
        for method in ("GET", "HEAD"):
            add("range", method, f"/v2/keep/img1/blobs/{local}", ("Range", value))
            add(
                "range", method, f"/v2/p/{UPSTREAM}/library/alpine/blobs/{cached}", ("Range", value)
            )
        for via in (f"p/{UPSTREAM}/", ""):
            repo, digest = next(fresh, ("", ""))
            if repo:  # un-prefixed: the mirror where it is on, `?ns=` where it is not
                query = "" if via or world.mode != "basic" else f"?ns={UPSTREAM}"
                add(
                    "range-first-fetch",
                    "GET",
                    f"/v2/{via}{repo}/blobs/{digest}{query}",
                    ("Range", value),
                )
    # requests aiohttp's parser refuses, as HEAD: the answer must have no body
    for target, headers in (
        ("/v2/?last=\u00e9", []),
        ("/v2/_catalog?n=\u0661", []),
        ("/v2/\u00e9/manifests/v1", []),
        ("/v2/keep/img1/tags/list?last=" + "a" * 9000, []),
        ("/v2/keep/img1/manifests/v1", [("X-Fuzz", "a" * 17_000)]),
        (f"/v2/keep/img1/blobs/{local}", [("Accept", "a" * 17_000)]),
    ):
        add("head-parser-error", "HEAD", target, *headers)
    # an Expect header on the routes that take a body (and one that does not)
    session = world.sessions[1] if len(world.sessions) > 1 else "/v2/fz/a/blobs/uploads/" + "0" * 32
    for expect in ("fuzz", "100-continue", "100-CONTINUE, x"):
        header = ("Expect", expect)
        add(
            "expect",
            "PUT",
            "/v2/fz/a/manifests/expect",
            header,
            ("Content-Type", mf.OCI_MANIFEST),
            body=manifest,
        )
        add("expect", "PATCH", session, header, body=b"abc")
        add("expect", "POST", "/v2/fz/a/blobs/uploads/", header)
        add("expect", "POST", "/auth/token", header, ("Content-Type", FORM), body=form.encode())
        add("expect", "GET", "/v2/", header)
    return out
