"""podman pulling through regproxy's cache, configured the way the README says.

``registries.conf`` rewrites references named after the upstream to the proxy path:
``prefix = "UPSTREAM"`` with ``location = "PROXY/p/ref"`` (the README's form), or the
upstream as a ``[[registry]]`` with the proxy path as its ``[[registry.mirror]]``. Only
``insecure = true`` in that file allows plain HTTP: podman is not given ``--tls-verify``.

Proof that the pull went through regproxy: its access log shows podman's requests under
``/v2/p/ref/``, the upstream's shows only regproxy's client, and with the upstream stopped
a pull into empty storage still succeeds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.images import make_image, make_index
from tests.support.podman import Podman
from tests.support.pull_through import UPSTREAM_NAME, PullThrough

PODMAN_AGENT = "containers/"


def prefix_rewrite(upstream: str, location: str) -> str:
    return f'[[registry]]\nprefix = "{upstream}"\nlocation = "{location}"\ninsecure = true\n'


def mirror(upstream: str, location: str) -> str:
    return (
        f'[[registry]]\nlocation = "{upstream}"\ninsecure = true\n\n'
        f'[[registry.mirror]]\nlocation = "{location}"\ninsecure = true\n'
    )


STYLES: dict[str, Callable[[str, str], str]] = {"prefix": prefix_rewrite, "mirror": mirror}


def configure(podman: Podman, pull_through: PullThrough, style: str) -> None:
    """Append the redirect of the upstream's names to the proxy path to registries.conf."""
    conf = Path(podman.env["CONTAINERS_REGISTRIES_CONF"])
    location = f"{pull_through.proxy.host}/p/{UPSTREAM_NAME}"
    conf.write_text(conf.read_text() + "\n" + STYLES[style](pull_through.upstream.host, location))


def pull(podman: Podman, ref: str, *flags: str) -> str:
    """``podman pull`` with TLS settings from registries.conf only; returns the image ID."""
    out = podman("pull", "--signature-policy", podman.config.policy, *flags, ref).stdout
    return out.strip().splitlines()[-1]


@pytest.mark.parametrize("style", sorted(STYLES))
def test_pull_named_after_upstream_goes_through_proxy(
    pull_through: PullThrough, podman: Podman, repo: str, style: str
) -> None:
    img = make_image(pull_through.seed(f"proxy-podman-{style}"), (200 * 1024, 50 * 1024))
    pull_through.push(img, repo)
    configure(podman, pull_through, style)
    ref = f"{pull_through.upstream.host}/{repo}:v1"
    upstream_since = pull_through.upstream_log.mark()
    proxy_since = pull_through.proxy_log.mark()

    assert pull(podman, ref) == img.image_id.removeprefix("sha256:")
    info = podman.image_inspect(ref)
    assert info["RootFS"]["Layers"] == img.diff_ids
    assert info["Digest"] == img.manifest_digest

    proxied = [
        e.path
        for e in pull_through.proxy_log.entries(proxy_since)
        if PODMAN_AGENT in e.agent and e.status == 200
    ]
    assert f"/v2/p/{UPSTREAM_NAME}/{repo}/manifests/v1" in proxied
    assert {f"/v2/p/{UPSTREAM_NAME}/{repo}/blobs/{d}" for d in img.blobs()} <= set(proxied)
    assert pull_through.client_requests_upstream(upstream_since) == []

    podman("rmi", "--all", "--force")
    with pull_through.upstream_down():
        assert pull(podman, ref) == img.image_id.removeprefix("sha256:")


def test_pull_platform_of_index_through_prefix(
    pull_through: PullThrough, podman: Podman, repo: str
) -> None:
    idx = make_index(pull_through.seed("proxy-podman-index"), (64 * 1024,))
    pull_through.push(idx, repo)
    configure(podman, pull_through, "prefix")
    ref = f"{pull_through.upstream.host}/{repo}:v1"
    since = pull_through.upstream_log.mark()

    for arch in ("arm64", "amd64"):
        child = idx.image_for(arch)
        image_id = pull(podman, ref, "--platform", f"linux/{arch}")
        assert image_id == child.image_id.removeprefix("sha256:")
        info = podman.image_inspect(image_id)
        assert info["Architecture"] == arch
        assert info["RootFS"]["Layers"] == child.diff_ids
    assert pull_through.client_requests_upstream(since) == []
