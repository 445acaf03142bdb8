"""``ctr`` (the containerd that the test dockerd starts) bound to one namespace."""

from __future__ import annotations

from pathlib import Path

from tests.support.dockerd import DockerDaemon
from tests.support.tools import run, run_bytes


class Ctr:
    """``ctr`` bound to one containerd namespace."""

    def __init__(self, daemon: DockerDaemon, namespace: str) -> None:
        self.argv = daemon.ctr_argv(namespace)
        self.namespace = namespace

    def __call__(self, *args: str | Path, check: bool = True) -> str:
        return run([*self.argv, *args], check=check).stdout

    def pull(self, hosts_dir: Path, ref: str, *flags: str, check: bool = True) -> str:
        """Pull with registry hosts configured by ``hosts.toml`` files under ``hosts_dir``."""
        return self("images", "pull", "--hosts-dir", hosts_dir, *flags, ref, check=check)

    def image_names(self) -> list[str]:
        return self("images", "list", "--quiet").split()

    def image_digest(self, name: str) -> str:
        """Target digest of image ``name`` (third column of ``ctr images list``)."""
        for line in self("images", "list").splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == name:
                return fields[2]
        raise AssertionError(f"no image {name} in namespace {self.namespace}")

    def content_digests(self) -> set[str]:
        return set(self("content", "list", "--quiet").split())

    def content(self, digest: str) -> bytes:
        return run_bytes([*self.argv, "content", "get", digest]).stdout

    def remove_all_images(self) -> None:
        """Remove every image; ``--sync`` waits until containerd has deleted the content."""
        names = self.image_names()
        if names:
            self("images", "remove", "--sync", *names)
