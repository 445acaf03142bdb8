"""Rootful podman with all state in a temporary directory.

Storage (``--root``/``--runroot``, vfs driver), registries.conf, policy, auth file and
temporary files are private to one ``Podman`` instance, so tests neither see nor change
the machine's images and need no kernel features beyond what vfs requires (none).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .containers_conf import write_containers_config
from .tools import remove_tree, require_root, require_tool, run

CONTAINERS_CONF = """\
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{events}"
"""


class Podman:
    """Runs ``podman`` as root against private storage; ``close()`` removes it all."""

    def __init__(self, workdir: Path) -> None:
        require_root()
        self.binary = require_tool("podman")
        self.workdir = workdir
        self.root = workdir / "root"
        # podman refuses a --runroot longer than 50 characters (pytest's tmp_path is
        # longer), so the run directory lives in a short directory of its own.
        self.runroot = Path(tempfile.mkdtemp(prefix="rpp-", dir="/tmp"))
        self.tmpdir = workdir / "libpod-tmp"
        for d in (self.root, self.runroot, self.tmpdir):
            d.mkdir(parents=True, exist_ok=True)
        self.config = write_containers_config(workdir / "containers")
        self.env = self.config.env
        containers_conf = workdir / "containers" / "containers.conf"
        containers_conf.write_text(CONTAINERS_CONF.format(events=workdir / "events.log"))
        # CONTAINERS_CONF replaces /etc/containers/containers.conf entirely.
        self.env["CONTAINERS_CONF"] = str(containers_conf)
        storage_conf = workdir / "containers" / "storage.conf"
        storage_conf.write_text(
            "[storage]\n"
            'driver = "vfs"\n'
            # json.dumps gives a valid TOML string for any path.
            f"graphroot = {json.dumps(str(self.root))}\n"
            f"runroot = {json.dumps(str(self.runroot))}\n"
        )
        self.env["CONTAINERS_STORAGE_CONF"] = str(storage_conf)

    def __call__(
        self, *args: str | Path, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        return run(
            [
                self.binary,
                "--root",
                self.root,
                "--runroot",
                self.runroot,
                "--storage-driver",
                "vfs",
                "--tmpdir",
                self.tmpdir,
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
                *args,
            ],
            env=self.env,
            check=check,
            timeout=timeout,
        )

    def push(self, local: str, dest: str, *flags: str) -> str:
        """Push to a plain-HTTP registry; return the manifest digest podman pushed."""
        digest_file = self.workdir / "push.digest"
        digest_file.unlink(missing_ok=True)
        self(
            "push",
            "--signature-policy",
            self.config.policy,
            "--tls-verify=false",
            "--digestfile",
            digest_file,
            *flags,
            local,
            dest,
        )
        return digest_file.read_text().strip()

    def pull(self, ref: str, *flags: str) -> str:
        """Pull (from a plain-HTTP registry, or e.g. ``oci:DIR:TAG``); return the image ID."""
        out = self(
            "pull", "--signature-policy", self.config.policy, "--tls-verify=false", *flags, ref
        ).stdout
        return out.strip().splitlines()[-1]

    def image_inspect(self, ref: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self("image", "inspect", ref).stdout)
        return data[0]

    def close(self) -> None:
        """Delete all of this instance's storage (vfs leaves no mounts, but be safe)."""
        remove_tree(self.runroot)
        remove_tree(self.workdir)
