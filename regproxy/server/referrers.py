"""The referrers API: manifests whose `subject` is a given digest, as an OCI index."""

from __future__ import annotations

import json

from aiohttp import web

from regproxy.digest import Digest
from regproxy.manifest import OCI_INDEX
from regproxy.server.keys import OFFLOAD, REGISTRY
from regproxy.server.names import local_name_for_read


async def list_referrers(request: web.Request) -> web.Response:
    name = local_name_for_read(request)
    subject = Digest.parse(request.match_info["digest"])
    artifact_type = request.query.get("artifactType") or None
    store = request.app[REGISTRY]
    found = await request.app[OFFLOAD].run(store.referrers, name, subject, artifact_type)
    body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
    headers = {"Content-Type": OCI_INDEX}
    if artifact_type is not None:
        headers["OCI-Filters-Applied"] = "artifactType"
    return web.Response(body=json.dumps(body).encode(), headers=headers)
