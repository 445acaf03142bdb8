"""A private, rootful ``dockerd`` (Debian's docker.io) and the containerd it spawns.

The daemon gets its own data root, exec root, pidfile and unix socket under a short /tmp
directory, no iptables, no bridge, vfs storage and an explicit (near-empty) config file,
so it neither reads nor disturbs the machine's docker setup and needs no kernel network
features. The containerd it spawns listens under the exec root; ``ctr`` talks to that.

Socket paths stay short because a unix socket path is limited to 108 bytes and containerd
adds ``containerd/containerd.sock.ttrpc`` to the exec root.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .processes import ManagedProcess
from .tools import remove_tree, require_root, require_tool, run

# Debian's client, matching dockerd 20.10: /usr/local/bin/docker may be a newer client
# whose default API version this daemon does not speak.
DOCKER_CLIENT = "/usr/bin/docker"

DAEMON_CONFIG = {
    # Loopback is insecure (plain HTTP allowed) by default; say so explicitly anyway.
    "insecure-registries": ["127.0.0.0/8"],
    "registry-mirrors": [],
    "log-level": "info",
}


_PUSH_DIGEST = re.compile(r"digest: (sha256:[0-9a-f]{64}) size: \d+")
_LOG_NOISE = re.compile(r"module=grpc|loading plugin|skip loading plugin|serving\.\.\.")


def _ping(sock_path: Path, timeout: float = 1.0) -> bool:
    """True if the Docker API on ``sock_path`` answers ``GET /_ping`` with 200."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock_path))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            response = s.recv(4096)
    except OSError:
        return False
    return response.startswith(b"HTTP/1.") and b" 200 " in response.split(b"\r\n", 1)[0]


class DockerDaemon:
    """Start/stop a private dockerd; run ``docker`` and ``ctr`` against it."""

    def __init__(
        self,
        basedir: Path | None = None,
        *,
        config: Mapping[str, object] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``config`` entries override :data:`DAEMON_CONFIG` (e.g. ``registry-mirrors``);
        ``env`` is added to dockerd's environment (e.g. ``HTTPS_PROXY``)."""
        require_root()
        self.dockerd = require_tool("dockerd")
        self.docker_client = require_tool(DOCKER_CLIENT)
        require_tool("containerd")
        require_tool("runc")
        self.base = basedir or Path(tempfile.mkdtemp(prefix="rpd-", dir="/tmp"))
        self.data_root = self.base / "data"
        self.exec_root = self.base / "x"
        self.socket = self.base / "docker.sock"
        self.pidfile = self.base / "dockerd.pid"
        self.config_file = self.base / "daemon.json"
        self.client_config = self.base / "client"
        self.process: ManagedProcess | None = None
        self._containerd_pid: int | None = None
        self.daemon_config: dict[str, object] = {**DAEMON_CONFIG, **(config or {})}
        self.extra_env = dict(env or {})

    @property
    def containerd_socket(self) -> Path:
        return self.exec_root / "containerd" / "containerd.sock"

    @property
    def docker_env(self) -> dict[str, str]:
        # A private client config: no credential helpers or contexts from ~/.docker.
        return {"DOCKER_CONFIG": str(self.client_config)}

    def start(self, timeout: float = 60.0) -> None:
        """Start dockerd and wait until both its API and its containerd answer."""
        for d in (self.data_root, self.exec_root, self.client_config, self.base / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps(self.daemon_config))
        (self.client_config / "config.json").write_text("{}")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "CONTAINERD_"))}
        # Temporary files, and the goroutine dumps containerd writes when dockerd restarts
        # it, stay in our directory instead of littering /tmp.
        env["TMPDIR"] = str(self.base / "tmp")
        env.update(self.extra_env)
        self.process = ManagedProcess(
            [
                self.dockerd,
                "--config-file",
                self.config_file,
                "--data-root",
                self.data_root,
                "--exec-root",
                self.exec_root,
                "--pidfile",
                self.pidfile,
                "--host",
                f"unix://{self.socket}",
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--storage-driver=vfs",
            ],
            name="dockerd",
            log_path=self.base / "dockerd.log",
            env=env,
        ).start()
        try:
            self.process.wait_for(
                lambda: _ping(self.socket), timeout=timeout, what=f"GET /_ping on {self.socket}"
            )
            self.process.wait_for(
                self._containerd_up, timeout=timeout, what=f"containerd at {self.containerd_socket}"
            )
        except BaseException:
            self.stop()
            raise

    def _containerd_up(self) -> bool:
        pidfile = self.exec_root / "containerd" / "containerd.pid"
        if not self.containerd_socket.exists() or not pidfile.exists():
            return False
        with contextlib.suppress(ValueError, OSError):
            self._containerd_pid = int(pidfile.read_text().strip())
        return self._containerd_pid is not None

    def docker(
        self, *args: str | Path, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run Debian's docker client against this daemon."""
        return run(
            [self.docker_client, "--host", f"unix://{self.socket}", *args],
            env=self.docker_env,
            check=check,
            timeout=timeout,
        )

    def image_inspect(self, ref: str) -> dict[str, Any]:
        """``docker image inspect`` of one image."""
        data: list[dict[str, Any]] = json.loads(self.docker("image", "inspect", ref).stdout)
        return data[0]

    def push(self, ref: str) -> tuple[str, str]:
        """``docker push``; (the manifest digest it reports, its whole output)."""
        out = self.docker("push", ref).stdout
        match = _PUSH_DIGEST.search(out)
        assert match, f"no digest in docker push output:\n{out}"
        return match.group(1), out

    def remove_all_images(self) -> None:
        """Empty the image store, so that the next pull really downloads."""
        ids = self.docker("images", "--all", "--quiet", "--no-trunc").stdout.split()
        if ids:
            self.docker("rmi", "--force", *sorted(set(ids)))

    def ctr_argv(self, namespace: str) -> list[str]:
        """``ctr`` command prefix for this daemon's containerd, in ``namespace``.

        Use a namespace of your own: dockerd keeps its images in ``moby``.
        """
        return [
            require_tool("ctr"),
            "--address",
            str(self.containerd_socket),
            "--namespace",
            namespace,
        ]

    def ctr(
        self, *args: str | Path, namespace: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this daemon's containerd."""
        return run([*self.ctr_argv(namespace), *args], check=check, timeout=timeout)

    def stop(self) -> None:
        """Stop dockerd (it stops its containerd), make sure containerd is gone, clean up.

        containerd runs in its own session, so the process-group kill cannot reach it;
        its pid from the pidfile is the fallback.
        """
        if self.process is not None:
            self.process.stop(timeout=30)
        if self._containerd_pid is not None and self._is_our_containerd(self._containerd_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._containerd_pid, signal.SIGKILL)
        self._containerd_pid = None
        remove_tree(self.base)

    def _is_our_containerd(self, pid: int) -> bool:
        """Guard against pid reuse: only a containerd configured under our exec root."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return b"containerd" in cmdline and str(self.exec_root).encode() in cmdline

    def log_tail(self, lines: int = 60) -> str:
        """Log tail without the start-up chatter (grpc state changes, plugin loading)."""
        return self.process.log_tail(lines, exclude=_LOG_NOISE) if self.process else ""

    def __enter__(self) -> DockerDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
