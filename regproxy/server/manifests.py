"""Manifests: GET/HEAD/PUT/DELETE by tag or digest."""

from __future__ import annotations

from aiohttp import web

from regproxy import manifest as mf
from regproxy.digest import Digest, is_digest, of_bytes
from regproxy.errors import DigestInvalid, ManifestInvalid
from regproxy.reference import validate_tag
from regproxy.server import proxied
from regproxy.server.bodies import read_capped
from regproxy.server.keys import OFFLOAD, REGISTRY
from regproxy.server.names import local_name_for_write, read_target
from regproxy.server.responses import manifest_response


def _check_reference(reference: str) -> None:
    if is_digest(reference):
        Digest.parse(reference)
    else:
        validate_tag(reference)


async def get_manifest(request: web.Request) -> web.Response:
    target = await read_target(request)
    reference = request.match_info["reference"]
    _check_reference(reference)
    if not isinstance(target, str):
        return await proxied.get_manifest(request, target, reference)
    name = target
    store = request.app[REGISTRY]
    # small and cached: inline on disk
    stored = await request.app[OFFLOAD].metadata(
        store.backend.local, store.get_manifest, name, reference
    )
    return manifest_response(stored, request.method == "HEAD")


async def put_manifest(request: web.Request) -> web.Response:
    name = await local_name_for_write(request)
    reference = request.match_info["reference"]
    _check_reference(reference)
    async with read_capped(request, mf.MAX_MANIFEST_SIZE) as data:
        digest, parsed = await _store_manifest(request, name, reference, data)
    headers = {
        "Location": f"/v2/{name}/manifests/{digest}",
        "Docker-Content-Digest": str(digest),
    }
    if parsed.subject is not None:
        headers["OCI-Subject"] = str(parsed.subject.digest)
    return web.Response(status=201, headers=headers)


async def _store_manifest(
    request: web.Request, name: str, reference: str, data: bytes
) -> tuple[Digest, mf.Manifest]:
    """Check a pushed manifest (digest, parse, references) and store it, tagged or not."""
    if not data:
        raise ManifestInvalid("empty manifest")
    algorithm = reference.partition(":")[0] if is_digest(reference) else "sha256"
    offload = request.app[OFFLOAD]
    small = len(data) <= mf.INLINE_LIMIT
    digest = of_bytes(data, algorithm) if small else await offload.run(of_bytes, data, algorithm)
    if is_digest(reference) and str(digest) != reference:
        raise DigestInvalid(
            "manifest digest does not match the reference",
            detail={"expected": reference, "actual": str(digest)},
        )
    content_type = request.headers.get("Content-Type")
    parsed = (
        mf.parse(data, content_type) if small else await offload.run(mf.parse, data, content_type)
    )
    tag = None if is_digest(reference) else reference
    await offload.run(request.app[REGISTRY].put_manifest, name, data, parsed, digest, tag)
    return digest, parsed


async def delete_manifest(request: web.Request) -> web.Response:
    name = await local_name_for_write(request)
    reference = request.match_info["reference"]
    _check_reference(reference)
    store = request.app[REGISTRY]
    if is_digest(reference):
        await request.app[OFFLOAD].run(store.delete_manifest, name, Digest.parse(reference))
    else:
        await request.app[OFFLOAD].run(store.delete_tag, name, reference)
    return web.Response(status=202)
