"""Several `regproxy serve` processes sharing one store, as replicas on separate hosts, and
HAProxy in front of them (`tests/support/haproxy.py`).

`Cluster(workdir, count=3, store=...)` starts `count` real `python -m regproxy serve`
processes on free loopback ports. They share `registry_storage` and `proxy_storage`:
either one folder each (`store="folder"`, as on NFS) or prefixes of one SeaweedFS bucket
(`store=S3Store(engine, bucket)`). Each has its **own** `temporary_registry_storage`
(upload sessions and spool files, local disk on a real host), `[server] replica_name =
"r1"`, `"r2"`… (the `X-Regproxy-Replica` of its answers) and `advertise_url =
"http://127.0.0.1:<its port>"` (where the others reach it), and all share one token
signing key file (only read when `[auth]` is on). The HAProxy balancing them
round-robin starts once every replica listens and passes its health check.

A replica is stopped (SIGTERM, then SIGKILL of its process group) or killed (SIGKILL of
its process group) by its PID, never by name; `restart()` brings it back on the same
port with the same folders.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

from regproxy.config import ServerConfig

from .haproxy import HAProxy
from .processes import ProcessError, RegproxyProcess, free_port
from .s3store import s3_section
from .seaweed import SeaweedS3

REPLICA_HEADER = "X-Regproxy-Replica"
#: HAProxy's health checks in a replica's access log (several a second: left out of tails)
HEALTH_CHECK = re.compile(r'"GET /healthz HTTP/1\.0" 200 ')
#: what the store parametrisation of tests/replicas is called
STORE_KINDS = ("folder", "s3")


def advertise_supported() -> bool:
    """This checkout knows `[server] advertise_url` (an unknown key stops `serve`)."""
    return "advertise_url" in {f.name for f in fields(ServerConfig)}


@dataclass(frozen=True)
class S3Store:
    """Both stores on prefixes `registry` and `proxy` of `bucket` on `engine`."""

    engine: SeaweedS3
    bucket: str


class Replica(RegproxyProcess):
    """`regproxy serve` as replica `replica_name` of a cluster: shared stores, own temp folder."""

    def __init__(
        self,
        workdir: Path,
        *,
        replica_name: str,
        shared: Path,
        store: str | S3Store = "folder",
        extra_config: str = "",
        server_config: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        self.replica_name = replica_name
        self.shared = shared
        self.store = store
        self.server_config = server_config
        self.planned_port = 0
        if isinstance(store, S3Store):
            extra_config = s3_section(store.engine, workdir) + extra_config
        super().__init__(workdir, extra_config=extra_config, env=env)
        self.name = f"regproxy-{replica_name}"

    @property
    def storage_dir(self) -> Path:
        """The shared `registry_storage` folder (unused on S3: the environment overrides it)."""
        return self.shared / "registry"

    @property
    def proxy_storage_dir(self) -> Path:
        return self.shared / "proxy"

    @property
    def signing_key_file(self) -> Path:
        return self.shared / "signing.key"

    @property
    def uploads_dir(self) -> Path:
        """This replica's upload sessions (its own temporary storage)."""
        return self.temporary_storage_dir / "uploads"

    def _write_config(self) -> None:
        port = self.planned_port
        server = [
            "[server]",
            f"replica_name = {json.dumps(self.replica_name)}",
            'shutdown_timeout = "2s"',
        ]
        if advertise_supported():
            server.append(f'advertise_url = "http://127.0.0.1:{port}"')
        registry, proxy = str(self.storage_dir), str(self.proxy_storage_dir)
        if isinstance(self.store, S3Store):
            # in the file, not the environment: offline commands read the same file
            registry = f"s3://{self.store.bucket}/registry"
            proxy = f"s3://{self.store.bucket}/proxy"
        lines = [
            f"registry_storage = {json.dumps(registry)}",
            f"temporary_registry_storage = {json.dumps(str(self.temporary_storage_dir))}",
            f"proxy_storage = {json.dumps(proxy)}",
            "",
            *server,
            self.server_config,
            "",
            self.extra_config,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, port: int = 0, *, timeout: float = 30.0) -> None:
        """Start on `port` (0: a free one, retried if another process takes it first)."""
        for attempt in range(3):
            self.planned_port = port or free_port()
            try:
                super().start(self.planned_port, timeout=timeout)
                return
            except ProcessError:
                assert self.process is not None
                in_use = "cannot listen" in self.process.log_text(current_run_only=True)
                if port or not in_use or attempt == 2:
                    raise

    def growing_uploads(self) -> dict[Path, int]:
        """{data file: size} of the upload sessions in this replica's temporary folder."""
        found = {}
        for data in self.uploads_dir.glob("*/data"):
            try:
                found[data] = data.stat().st_size
            except OSError:
                continue
        return found


class Cluster:
    """`count` replicas on one shared store and an HAProxy in front of them."""

    def __init__(
        self,
        workdir: Path,
        *,
        count: int = 3,
        store: str | S3Store = "folder",
        extra_config: str = "",
        server_config: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.store = store
        shared = workdir / "shared"
        shared.mkdir(parents=True, exist_ok=True)
        key = shared / "signing.key"
        if not key.exists():
            key.write_text(secrets.token_hex(32) + "\n")
            os.chmod(key, 0o600)
        self.replicas = [
            Replica(
                workdir / f"r{n}",
                replica_name=f"r{n}",
                shared=shared,
                store=store,
                extra_config=extra_config,
                server_config=server_config,
                env=env,
            )
            for n in range(1, count + 1)
        ]
        self.haproxy: HAProxy | None = None

    @property
    def names(self) -> list[str]:
        return [r.replica_name for r in self.replicas]

    @property
    def lb(self) -> HAProxy:
        assert self.haproxy is not None, "the cluster has not been started"
        return self.haproxy

    @property
    def url(self) -> str:
        """The load balancer's URL: what clients use."""
        return self.lb.url

    @property
    def host(self) -> str:
        return self.lb.host

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.replica_name == name)

    def start(self) -> Cluster:
        try:
            # one after the other, from this thread: a child started from a pool thread
            # would get SIGTERM when that thread ends (PR_SET_PDEATHSIG, processes.py)
            for replica in self.replicas:
                replica.start()
            self.haproxy = HAProxy(
                self.workdir / "haproxy",
                [(r.replica_name, r.port or 0) for r in self.replicas],
            ).start()
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self, name: str) -> None:
        """SIGKILL replica `name` (its process group), then wait until HAProxy has it DOWN."""
        self.replica(name).kill()
        self.lb.wait_for_state({name: "DOWN"})

    def restart(self, name: str) -> None:
        replica = self.replica(name)
        replica.stop()
        replica.start(replica.planned_port)
        self.lb.wait_for_state({name: "UP"})

    def stop(self) -> None:
        if self.haproxy is not None:
            self.haproxy.stop()
        with ThreadPoolExecutor(len(self.replicas)) as pool:
            list(pool.map(lambda r: r.stop(), self.replicas))

    def logs(self, lines: int = 40) -> str:
        """The tail of every process's log, for failure messages."""
        parts = [
            f"--- {r.name} ---\n{r.process.log_tail(lines, exclude=HEALTH_CHECK)}"
            for r in self.replicas
            if r.process is not None
        ]
        if self.haproxy is not None:
            parts.append(f"--- haproxy ---\n{self.haproxy.log_tail(lines)}")
        return "\n".join(parts)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cluster_store(kind: str, engine: SeaweedS3 | None) -> str | S3Store:
    """The `store` argument of a Cluster for a STORE_KINDS entry (a fresh bucket on S3)."""
    if kind == "folder":
        return "folder"
    assert engine is not None
    return S3Store(engine, engine.create_bucket())


def replicas_of(answers: Sequence[object]) -> list[str]:
    """The `X-Regproxy-Replica` of each response (aiohttp responses or `Pulled`)."""
    return [str(getattr(a, "headers", {}).get(REPLICA_HEADER)) for a in answers]
