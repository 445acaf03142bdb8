"""Real clients pulling through regproxy's cache from a real upstream: the setup.

Per test module and per upstream kind (the fixtures of tests/clients), one upstream
registry is started — Debian's
``docker-registry`` ("distribution") or a second regproxy ("regproxy") — and one regproxy
in front of it whose configuration names it twice: as ``ref`` (pulled as
``/v2/p/ref/<name>``) and as ``docker.io`` (what containerd's ``?ns=docker.io`` and dockerd's
``registry-mirrors`` ask for). Tests push their own images into the upstream with skopeo
(from offline OCI layouts, digests preserved) and then pull them through the proxy.

Both servers' access logs are read with :class:`AccessLog`: the upstream's proves what
regproxy fetched (and that the clients themselves never reached the upstream), regproxy's
proves what the clients asked for.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .access_log import AIOHTTP_AGENT, AccessEntry, AccessLog
from .images import Image, ImageIndex, write_oci_layout
from .processes import ReferenceRegistry, RegproxyProcess
from .skopeo import Skopeo

UPSTREAM_KINDS = ("distribution", "regproxy")
#: the name under which the proxy knows the upstream: pulls go to /v2/p/ref/<name>
UPSTREAM_NAME = "ref"
#: a second name for the same upstream, for the Docker Hub dialects (?ns=, registry-mirrors)
HUB_NAME = "docker.io"
TAG_TTL = 2.0

_STRUCTURED_INFO = re.compile(r'^time="[^"]*" level=info ')

Upstream = ReferenceRegistry | RegproxyProcess


@dataclass
class PullThrough:
    """A running upstream, the regproxy in front of it, and helpers to use them."""

    kind: str
    upstream: Upstream
    proxy: RegproxyProcess
    seeder: Skopeo
    workdir: Path

    @property
    def upstream_log(self) -> AccessLog:
        return AccessLog(self.upstream.log_path)

    @property
    def proxy_log(self) -> AccessLog:
        return AccessLog(self.proxy.log_path)

    def proxied(self, repo: str) -> str:
        """``HOST/p/ref/<repo>``: the proxy's name for the upstream's ``repo``."""
        return f"{self.proxy.host}/p/{UPSTREAM_NAME}/{repo}"

    def seed(self, seed: str) -> str:
        """A seed unique to this upstream kind, so that content never repeats across the
        two runs of a module (the session's containerd and dockerd share content)."""
        return f"{seed}-{self.kind}"

    def push(self, content: Image | ImageIndex, repo: str, tag: str = "v1") -> str:
        """Push ``content`` to the upstream as ``repo:tag``, byte for byte; its top digest."""
        layout = self.workdir / "layouts" / re.sub(r"[^a-z0-9]+", "-", f"{repo}-{tag}")
        write_oci_layout(layout, content, tag)
        flags = ["--preserve-digests"]
        if isinstance(content, ImageIndex):
            flags.append("--all")
        since = self.upstream_log.mark()
        self.seeder.copy(
            f"oci:{layout}:{tag}", f"docker://{self.upstream.host}/{repo}:{tag}", *flags
        )
        # the server logs a request just after answering it: wait for the last one, so
        # that a test's log mark after push() sees none of the push
        put = ("PUT", f"/v2/{repo}/manifests/{tag}")
        self.upstream_log.wait_for(
            lambda entries: put in {(e.method, e.path) for e in entries}, since=since
        )
        return content.top_digest

    @contextlib.contextmanager
    def upstream_down(self) -> Iterator[None]:
        """Stop the upstream for the block, then start it again on the same port."""
        port = self.upstream.port
        assert port is not None
        self.upstream.stop()
        try:
            yield
        finally:
            self.upstream.start(port)

    def log_tail(self, lines: int = 60) -> str:
        """Both servers' log tails, for failure reports."""
        upstream = ""
        if self.upstream.process is not None:
            # docker-registry logs every request twice: keep the access line, drop the
            # (very long) structured info line
            upstream = self.upstream.process.log_tail(lines, exclude=_STRUCTURED_INFO)
        return (
            f"--- proxy ({self.proxy.log_path}) ---\n{self.proxy.log_tail(lines)}\n"
            f"--- upstream, {self.kind} ({self.upstream.log_path}) ---\n{upstream}"
        )

    def client_requests_upstream(self, since: int) -> list[AccessEntry]:
        """Upstream requests since ``since`` that did not come from regproxy."""
        return [e for e in self.upstream_log.entries(since) if not AIOHTTP_AGENT.search(e.agent)]


def wait_past_ttl(since: float) -> None:
    """Sleep until a tag cached at monotonic time ``since`` is stale."""
    remaining = since + TAG_TTL + 0.2 - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)


def proxy_config(upstream_url: str, mirror_upstream: str | None) -> str:
    """The ``[proxy]`` part of the regproxy configuration for one upstream."""
    lines = ["[proxy]"]
    if mirror_upstream is not None:
        lines.append(f"mirror_upstream = {json.dumps(mirror_upstream)}")
    for name in (UPSTREAM_NAME, HUB_NAME):
        lines += [
            "",
            f"[proxy.upstreams.{json.dumps(name)}]",
            f"url = {json.dumps(upstream_url)}",
            f'tag_ttl = "{TAG_TTL:g}s"',
        ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def refusing_port() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` where a bound, never-listening socket refuses connections:
    a fallback for clients that must not leave the machine when the proxy fails them."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextlib.contextmanager
def running_pull_through(
    kind: str, workdir: Path, mirror_upstream: str | None = None
) -> Iterator[PullThrough]:
    """An upstream of ``kind`` (one of ``UPSTREAM_KINDS``) and a regproxy caching it, both
    under ``workdir``; ``mirror_upstream`` is the proxy's ``proxy.mirror_upstream``."""
    upstream: Upstream
    if kind == "distribution":
        upstream = ReferenceRegistry(workdir / "upstream")
    else:
        upstream = RegproxyProcess(workdir / "upstream")
    upstream.start()
    try:
        proxy = RegproxyProcess(
            workdir / "proxy", extra_config=proxy_config(upstream.url, mirror_upstream)
        )
        proxy.start()
        try:
            yield PullThrough(
                kind=kind,
                upstream=upstream,
                proxy=proxy,
                seeder=Skopeo(workdir / "seeder"),
                workdir=workdir,
            )
        finally:
            proxy.stop()
    finally:
        upstream.stop()
