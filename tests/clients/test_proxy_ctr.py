"""containerd's ``ctr`` pulling through regproxy's cache with ``hosts.toml`` (``--hosts-dir``).

Two forms, as in the README:

- per registry: ``certs.d/<upstream host>/hosts.toml`` with a ``[host."http://PROXY/v2/p/ref"]``
  and ``override_path = true`` (the path already holds ``/v2``);
- catch-all: ``certs.d/_default/hosts.toml`` with ``[host."http://PROXY"]``; containerd then
  asks for the un-prefixed name and adds ``?ns=<registry of the reference>``, which regproxy
  routes to the upstream of that name.

containerd adds ``?ns=`` in the first form too (regproxy ignores it under the prefix). It
keeps content byte for byte, so every digest must be the upstream's. Images are removed
with ``--sync`` after each test (content is shared between namespaces).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.access_log import AccessLog
from tests.support.ctr import Ctr
from tests.support.dockerd import DockerDaemon
from tests.support.images import ImageIndex, make_image, make_index
from tests.support.processes import ProcessError, RegproxyProcess
from tests.support.pull_through import HUB_NAME, UPSTREAM_NAME, PullThrough
from tests.support.registry_http import get_manifest, request
from tests.support.tools import run

CONTAINERD_AGENT = "containerd/"
_namespaces = itertools.count()


@pytest.fixture
def ctr(dockerd: DockerDaemon) -> Iterator[Ctr]:
    client = Ctr(dockerd, f"regproxy-proxy-test-{next(_namespaces)}")
    try:
        yield client
    finally:
        client.remove_all_images()


def write_hosts(hosts_dir: Path, registry: str, text: str) -> Path:
    """``hosts_dir/<registry>/hosts.toml`` (``registry`` may be ``_default``)."""
    path = hosts_dir / registry / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return hosts_dir


def mirror_host(url: str, *, override_path: bool = False) -> str:
    lines = [f'[host."{url}"]', '  capabilities = ["pull", "resolve"]']
    if override_path:
        lines.append("  override_path = true")
    return "\n".join(lines) + "\n"


def assert_pulled(ctr: Ctr, ref: str, idx: ImageIndex) -> None:
    """``ref`` names the index, and every manifest and blob of it is there, byte for byte."""
    assert ctr.image_digest(ref) == idx.digest
    expected = {**idx.blobs(), **idx.manifests()}
    assert ctr.content_digests() == set(expected)
    for digest, data in expected.items():
        assert ctr.content(digest) == data, f"{digest} differs after the pull through the proxy"


def test_hosts_toml_override_path_all_platforms(
    pull_through: PullThrough, ctr: Ctr, repo: str, tmp_path: Path
) -> None:
    idx = make_index(pull_through.seed("proxy-ctr-override"), (150 * 1024, 40 * 1024))
    pull_through.push(idx, repo)
    upstream = pull_through.upstream.host
    hosts = write_hosts(
        tmp_path / "certs.d",
        upstream,
        f'server = "http://{upstream}"\n\n'
        + mirror_host(f"http://{pull_through.proxy.host}/v2/p/{UPSTREAM_NAME}", override_path=True),
    )
    upstream_since = pull_through.upstream_log.mark()
    proxy_since = pull_through.proxy_log.mark()

    ref = f"{upstream}/{repo}:v1"
    ctr.pull(hosts, ref, "--all-platforms")
    assert_pulled(ctr, ref, idx)

    asked = [e for e in pull_through.proxy_log.entries(proxy_since) if CONTAINERD_AGENT in e.agent]
    paths = {e.path for e in asked if e.status == 200}
    assert f"/v2/p/{UPSTREAM_NAME}/{repo}/manifests/v1" in paths
    assert {f"/v2/p/{UPSTREAM_NAME}/{repo}/blobs/{d}" for d in idx.blobs()} <= paths
    # containerd names the registry of the reference even with override_path
    assert {e.query.get("ns", [""])[0] for e in asked} == {upstream}
    # the fallback (server = the upstream itself) was never needed
    assert pull_through.client_requests_upstream(upstream_since) == []


def test_default_hosts_toml_routes_by_ns(
    pull_through: PullThrough, ctr: Ctr, refused_url: str, tmp_path: Path
) -> None:
    """``docker.io/library/<name>`` through a catch-all mirror: containerd sends
    ``/v2/library/<name>/…?ns=docker.io``, regproxy asks its upstream named docker.io."""
    idx = make_index(pull_through.seed("proxy-ctr-ns"), (90 * 1024,))
    name = "library/ctr-ns"
    pull_through.push(idx, name)
    # the fallback server refuses: a failed mirror must not send containerd to Docker Hub
    hosts = write_hosts(
        tmp_path / "certs.d",
        "_default",
        f'server = "{refused_url}"\n\n' + mirror_host(f"http://{pull_through.proxy.host}"),
    )
    upstream_since = pull_through.upstream_log.mark()
    proxy_since = pull_through.proxy_log.mark()

    ref = f"docker.io/{name}:v1"
    ctr.pull(hosts, ref, "--all-platforms")
    assert_pulled(ctr, ref, idx)

    asked = [e for e in pull_through.proxy_log.entries(proxy_since) if CONTAINERD_AGENT in e.agent]
    assert {e.query.get("ns", [""])[0] for e in asked} == {HUB_NAME}
    assert f"/v2/{name}/manifests/v1" in {e.path for e in asked}
    assert all(e.status == 200 for e in asked), asked
    fetched = {e.path for e in pull_through.upstream_log.entries(upstream_since)}
    assert {f"/v2/{name}/blobs/{d}" for d in idx.blobs()} <= fetched
    assert pull_through.client_requests_upstream(upstream_since) == []


def test_default_hosts_toml_ns_with_host_port_upstream(
    pull_through: PullThrough, ctr: Ctr, refused_url: str, repo: str, tmp_path: Path
) -> None:
    """For a registry with a port, containerd sends ``?ns=HOST:PORT``, so the upstream has
    to be configured under that name. regproxy either refuses such an upstream name when
    it starts (a config error naming the key), or routes ``?ns=HOST:PORT`` to it; it must
    not accept the configuration and then answer every pull with NAME_INVALID."""
    img = make_image(pull_through.seed("proxy-ctr-ns-port"), (30 * 1024,))
    pull_through.push(img, repo)
    upstream = pull_through.upstream.host
    server = RegproxyProcess(
        tmp_path / "regproxy",
        extra_config=f'[proxy.upstreams."{upstream}"]\nurl = "{pull_through.upstream.url}"\n',
    )
    try:
        server.start()
    except ProcessError:
        assert server.process is not None
        assert f"proxy.upstreams.{upstream}" in server.process.log_text()
        return
    try:
        hosts = write_hosts(
            tmp_path / "certs.d",
            "_default",
            f'server = "{refused_url}"\n\n' + mirror_host(f"http://{server.host}"),
        )
        ref = f"{upstream}/{repo}:v1"
        result = run([*ctr.argv, "images", "pull", "--hosts-dir", hosts, ref], check=False)
        answers = [
            (e.method, e.target, e.status)
            for e in AccessLog(server.log_path).entries()
            if e.path.startswith(f"/v2/{repo}/")
        ]
        assert result.returncode == 0, f"{result.stderr}\nregproxy answered: {answers}"
        assert ctr.image_digest(ref) == img.manifest_digest
    finally:
        server.stop()


def test_ns_query_routes_plain_http(pull_through: PullThrough, repo: str) -> None:
    """``?ns=`` on un-prefixed paths, without a client's retries and fallbacks in the way."""
    img = make_image(pull_through.seed("proxy-ctr-ns-http"), (20 * 1024,))
    pull_through.push(img, repo)
    base = pull_through.proxy.url

    resp = get_manifest(base, repo, f"v1?ns={UPSTREAM_NAME}")
    assert resp.status == 200
    assert resp.body == img.manifest
    assert resp.header("X-Cache-Status") == "MISS"
    assert resp.header("Docker-Content-Digest") == img.manifest_digest
    for digest, data in img.blobs().items():
        blob = request(f"{base}/v2/{repo}/blobs/{digest}?ns={UPSTREAM_NAME}")
        assert (blob.status, blob.body) == (200, data)
    tags = request(f"{base}/v2/{repo}/tags/list?ns={UPSTREAM_NAME}")
    assert tags.status == 200
    assert b'"v1"' in tags.body
    # the same cache entry as the proxy path
    cached = get_manifest(base, f"p/{UPSTREAM_NAME}/{repo}", img.manifest_digest)
    assert cached.header("X-Cache-Status") == "HIT"

    unknown = get_manifest(base, repo, "v1?ns=registry.invalid")
    assert unknown.status == 404
    assert b"NAME_UNKNOWN" in unknown.body
    # without ?ns= the name is local, and nothing local has that name
    assert get_manifest(base, repo, "v1").status == 404
