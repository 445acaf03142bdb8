"""Access control across replicas: with one `[auth] signing_key_file` for all of them, a
token that one replica issued is accepted by every other, so a client whose token
request and next request land on different replicas is never turned away.

The token realm a replica names is the address the client used (HAProxy's, passed on in
`Host`), so the token request goes through the balancer too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.auth import PASSWORDS, basic, challenge_params, write_htpasswd
from tests.support.images import layout_blob, make_image, read_oci_layout, write_oci_layout
from tests.support.replicas import REPLICA_HEADER, Cluster
from tests.support.skopeo import Skopeo

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("replicas-auth")
    htpasswd = write_htpasswd(workdir / "htpasswd")
    key = workdir / "shared" / "signing.key"  # the one Cluster writes for all replicas
    auth = (
        "[auth]\n"
        f"htpasswd = {json.dumps(str(htpasswd))}\n"
        'mode = "token"\n'
        f"signing_key_file = {json.dumps(str(key))}\n"
    )
    with Cluster(workdir, count=3, extra_config=auth) as running:
        yield running


async def token_through(cluster: Cluster, user: str, scope: str) -> tuple[str, str]:
    """A token for `scope` from the realm the balancer's challenge names; (token, the
    replica that issued it)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{cluster.url}/v2/") as resp:
            assert resp.status == 401
            scheme, params = challenge_params(resp.headers["WWW-Authenticate"])
        assert scheme == "bearer"
        assert params["realm"] == f"{cluster.url}/auth/token", params
        query = {"service": params["service"], "scope": scope}
        headers = {"Authorization": basic(user)}
        async with session.get(params["realm"], params=query, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            return (await resp.json())["token"], resp.headers[REPLICA_HEADER]


async def test_a_token_from_one_replica_is_good_on_every_other(cluster: Cluster) -> None:
    token, issuer = await token_through(cluster, "alice", "repository:team/app:pull,push")
    bearer = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        for replica in cluster.replicas:
            async with session.get(f"{replica.url}/v2/", headers=bearer) as resp:
                assert resp.status == 200, (issuer, replica.replica_name, await resp.text())
            url = f"{replica.url}/v2/team/app/tags/list"
            async with session.get(url, headers=bearer) as resp:
                assert resp.status == 404, (issuer, replica.replica_name, await resp.text())


@pytest.mark.clients
def test_skopeo_with_credentials(cluster: Cluster, skopeo: Skopeo, tmp_path: Path) -> None:
    img = make_image("replicas-auth-skopeo", (80 * 1024, 2 * 1024 * 1024))
    layout = write_oci_layout(tmp_path / "image", img, "v1")
    ref = f"docker://{cluster.host}/team/skopeo:v1"
    creds = f"alice:{PASSWORDS['alice']}"
    skopeo.copy(f"oci:{layout}:v1", ref, "--preserve-digests", "--dest-creds", creds)
    skopeo.copy(ref, f"oci:{tmp_path / 'out'}:v1", "--preserve-digests", "--src-creds", creds)
    assert read_oci_layout(tmp_path / "out", "v1")["digest"] == img.manifest_digest
    for digest, data in img.blobs().items():
        assert layout_blob(tmp_path / "out", digest) == data
    tokens = {r.server for r in cluster.lb.requests() if r.request.startswith("GET /auth/token")}
    used = {r.server for r in cluster.lb.requests() if "/v2/team/skopeo/" in r.request}
    assert used == set(cluster.names), used
    assert tokens, "skopeo never asked for a token"
