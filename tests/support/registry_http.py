"""Minimal registry HTTP reads with urllib, to check what clients left in a registry.

Client tests use these to look at the registry independently of the client that wrote to
it (e.g. "is the manifest really gone after skopeo delete?").
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass

from .images import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST

ACCEPT_MANIFESTS = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: dict[str, str]

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def request(url: str, *, method: str = "GET", accept: str | None = None) -> Response:
    """Send one request; HTTP errors are returned as responses, not raised."""
    headers = {"Accept": accept} if accept else {}
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return Response(
                int(resp.status), resp.read(), {k.lower(): v for k, v in resp.headers.items()}
            )
    except urllib.error.HTTPError as exc:
        return Response(int(exc.code), exc.read(), {k.lower(): v for k, v in exc.headers.items()})


def get_manifest(base_url: str, repo: str, reference: str, *, method: str = "GET") -> Response:
    """Fetch a manifest accepting every manifest media type, as a multi-arch client does."""
    return request(
        f"{base_url}/v2/{repo}/manifests/{reference}", method=method, accept=ACCEPT_MANIFESTS
    )
