"""The referrers API: manifests whose `subject` is a given digest, as an OCI index."""

from __future__ import annotations

import json

from aiohttp import web

from regproxy.digest import Digest
from regproxy.manifest import OCI_INDEX
from regproxy.proxy.cache import CACHE_STATUS
from regproxy.server.keys import OFFLOAD, PROXY, REGISTRY
from regproxy.server.names import read_target


async def list_referrers(request: web.Request) -> web.Response:
    target = await read_target(request)
    subject = Digest.parse(request.match_info["digest"])
    artifact_type = request.query.get("artifactType") or None
    headers = {"Content-Type": OCI_INDEX}
    if isinstance(target, str):
        store = request.app[REGISTRY]
        found = await request.app[OFFLOAD].run(store.referrers, target, subject, artifact_type)
    else:
        found, headers[CACHE_STATUS] = await request.app[PROXY].referrers(target, subject)
        if artifact_type is not None:
            found = [d for d in found if d.get("artifactType") == artifact_type]
    if artifact_type is not None:
        headers["OCI-Filters-Applied"] = "artifactType"
    body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
    return web.Response(body=json.dumps(body).encode(), headers=headers)
