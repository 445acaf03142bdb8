"""skopeo with private configuration, for copying images to and from a plain-HTTP registry."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .containers_conf import write_containers_config
from .digests import sha256
from .tools import require_tool, run


class Skopeo:
    """Runs skopeo against loopback registries, with config isolated in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.binary = require_tool("skopeo")
        self.workdir = workdir
        self.config = write_containers_config(workdir / "containers")
        self.env = self.config.env

    def __call__(
        self, *args: str | Path, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        return run(
            [
                self.binary,
                "--policy",
                self.config.policy,
                "--tmpdir",
                self.env["TMPDIR"],
                *args,
            ],
            env=self.env,
            check=check,
            timeout=timeout,
        )

    def copy(self, src: str, dest: str, *flags: str) -> subprocess.CompletedProcess[str]:
        """``skopeo copy`` with TLS verification off on both ends (the registries are HTTP)."""
        return self("copy", "--src-tls-verify=false", "--dest-tls-verify=false", *flags, src, dest)

    def inspect_raw(self, ref: str) -> bytes:
        """The manifest bytes exactly as the registry serves them (JSON, so UTF-8 safe)."""
        return self("inspect", "--raw", "--tls-verify=false", ref).stdout.encode()

    def inspect_raw_digest(self, ref: str) -> str:
        return sha256(self.inspect_raw(ref))

    def inspect(self, ref: str) -> dict[str, object]:
        """``skopeo inspect`` JSON (digest, layers, ...) of a registry reference."""
        out = self("inspect", "--tls-verify=false", ref).stdout
        result: dict[str, object] = json.loads(out)
        return result

    def list_tags(self, repo_ref: str) -> list[str]:
        """Tags of ``docker://HOST/REPO`` as the registry lists them."""
        out = self("list-tags", "--tls-verify=false", repo_ref).stdout
        tags: list[str] = json.loads(out)["Tags"]
        return tags

    def delete(self, ref: str) -> subprocess.CompletedProcess[str]:
        return self("delete", "--tls-verify=false", ref)
