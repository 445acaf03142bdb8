"""The servers a benchmark runs: builds of the test harness's managed processes.

regproxy runs with its default logging (info level, one access line per request, text):
as it ships, so its numbers include what its access log costs (issue 16). The reference
logs nothing per request (its access log and info logging off), which can only favour it.
Both keep filesystem storage in a temp folder and listen on a loopback port. Peak RSS and
CPU time come from ``/proc``; the peak (``VmHWM``) can be reset between measurements by
writing ``5`` to ``clear_refs``, so each measurement gets its own peak.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import (
    REPO_ROOT,
    ReferenceRegistry,
    RegproxyProcess,
)

__all__ = ["REPO_ROOT", "Reference", "Regproxy", "S3Reference", "S3Regproxy", "S3Target", "Server"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")

#: The reference runs as Debian ships it (/etc/docker/registry/config.yml): filesystem
#: storage with the in-memory blob descriptor cache, deletes enabled; no auth, no health
#: check, and with info logging and the access log off (regproxy keeps its defaults: the
#: access log on; so the comparison can only favour the reference).
REFERENCE_LOG = {"level": "error", "formatter": "text", "accesslog": {"disabled": True}}


class Reference(ReferenceRegistry):
    """Debian's ``docker-registry`` with Debian's storage settings and per-request logging
    off."""

    label = "reference"

    def __init__(self, workdir: Path, *, proxy_remote_url: str | None = None) -> None:
        super().__init__(workdir, proxy_remote_url=proxy_remote_url)
        self.extra_config = {
            "log": REFERENCE_LOG,
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "cache": {"blobdescriptor": "inmemory"},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
        }

    @property
    def pid(self) -> int:
        assert self.process is not None and self.process.pid is not None
        return self.process.pid


class Regproxy(RegproxyProcess):
    """regproxy with its default logging: the access log on, as text, to its log file."""

    label = "regproxy"

    def __init__(
        self, workdir: Path, *, extra_config: str = "", env: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(workdir, extra_config=extra_config, env=env)

    @property
    def pid(self) -> int:
        assert self.process is not None and self.process.pid is not None
        return self.process.pid


@dataclass(frozen=True)
class S3Target:
    """Where a server's stores go on the benchmark's S3 engine (SeaweedFS on loopback)."""

    endpoint: str
    region: str
    access_key: str
    secret_key: str
    bucket: str
    #: blob GETs answer 307 to a presigned URL of the engine instead of relaying the bytes
    redirect: bool = False


class S3Reference(Reference):
    """docker-registry 2.8.2 with its own S3 driver (``storage.s3``) on ``target``.

    ``regionendpoint`` makes the driver use path-style URLs (``http://host:port/bucket/key``)
    with V4 signatures; the bucket must exist (the driver never creates one). Debian's
    in-memory blob descriptor cache and deletes stay on as in the filesystem runs.
    ``storage.redirect.disable`` is the inverse of ``target.redirect``: with redirects on,
    blob GETs answer 307 to a presigned URL of the engine, as regproxy's ``[s3] redirect``.
    """

    def __init__(self, workdir: Path, *, target: S3Target, rootdirectory: str = "/docker") -> None:
        super().__init__(workdir)
        self.target = target
        self.extra_config["storage"] = {
            "s3": {
                "accesskey": target.access_key,
                "secretkey": target.secret_key,
                "region": target.region,
                "regionendpoint": target.endpoint,
                "bucket": target.bucket,
                "rootdirectory": rootdirectory,
                "secure": target.endpoint.startswith("https://"),
                "v4auth": True,
            },
            "redirect": {"disable": not target.redirect},
            "cache": {"blobdescriptor": "inmemory"},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        }

    #: and no ``AWS_*`` either: its aws-sdk-go panics at start when ``AWS_CA_BUNDLE`` is set
    #: (as it is where a proxy's CA is installed), and the keys come from the configuration
    dropped_env = ("REGISTRY_", "AWS_")


class S3Regproxy(Regproxy):
    """regproxy with both stores on ``target``'s bucket (``registry`` and ``proxy``
    prefixes), temporary storage in its local work folder, the secret key in a file."""

    def __init__(self, workdir: Path, *, target: S3Target) -> None:
        secret = workdir / "s3-secret"
        workdir.mkdir(parents=True, exist_ok=True)
        secret.write_text(target.secret_key + "\n")
        s3 = "\n".join(
            [
                "[s3]",
                f"endpoint = {json.dumps(target.endpoint)}",
                f"region = {json.dumps(target.region)}",
                f"access_key_id = {json.dumps(target.access_key)}",
                f"secret_access_key_file = {json.dumps(str(secret))}",
                f"redirect = {'true' if target.redirect else 'false'}",
                "",
            ]
        )
        super().__init__(workdir, extra_config=s3)
        self.target = target

    def _write_config(self) -> None:
        bucket = self.target.bucket
        lines = [
            f'registry_storage = "s3://{bucket}/registry"',
            f"temporary_registry_storage = {json.dumps(str(self.temporary_storage_dir))}",
            f'proxy_storage = "s3://{bucket}/proxy"',
            "",
            self.extra_config,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")


Server = Reference | Regproxy


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    """Start ``server``; stop it and delete its storage afterwards."""
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


# ---- /proc ---------------------------------------------------------------------------


def peak_rss(pid: int) -> int | None:
    """Peak resident set size (``VmHWM``) of a process in bytes; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss(pid: int) -> bool:
    """Restart ``VmHWM`` at the current RSS (Linux >= 4.0); False when not permitted."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads) so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    # after the command: state is field 3, utime 14 and stime 15 (1-based, see proc(5))
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "?"


def missing_tools() -> list[str]:
    return [t for t in ("docker-registry", "wrk", "skopeo") if shutil.which(t) is None]


def python_version() -> str:
    return sys.version.split()[0]
