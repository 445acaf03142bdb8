"""The ``https`` section (issue 16): both registries terminating TLS with one certificate.

A throw-away CA (``tests.support.certs.TestCA``) signs one server certificate for
127.0.0.1; regproxy serves it with ``[server] tls_certificate/tls_key``, docker-registry
with ``http.tls``. The client verifies it (``SSL_CERT_FILE`` names the CA while the section
runs, for the Python client, the readiness probes and docker-registry's Go TLS stack).
Measured: pulls (one stream, concurrent readers, a Range), a monolithic push, docker's
chunked push (one PATCH sent with ``Transfer-Encoding: chunked`` in 32 KiB chunks, as Go's
``io.Copy`` writes them), the server's CPU seconds per GiB it served over TLS, and a cold
pull through each registry's cache from an upstream docker-registry serving TLS with the
test CA (counted by the splice relay: TLS records add ~0.1 % to the bytes).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import ssl
from collections.abc import Iterator
from pathlib import Path

from tests.support.certs import ServerCert, TestCA

from .client import Blob, Connection, GiB, timed_parallel
from .harness import Bench
from .relay import CountingRelay
from .report import REF, RP, Target
from .sections import MB, human, record
from .servers import Reference, Regproxy

#: Go's io.Copy buffer: the chunk size docker and containerd send a PATCH body in
DOCKER_CHUNK = 32 * 1024


class TlsReference(Reference):
    """docker-registry serving TLS (``http.tls``) with ``cert``."""

    def __init__(self, workdir: Path, *, cert: ServerCert, **kwargs: object) -> None:
        super().__init__(workdir, **kwargs)  # type: ignore[arg-type]
        self.cert = cert

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    def _write_config(self, port: int) -> None:
        super()._write_config(port)
        config = json.loads(self.config_path.read_text())
        config["http"]["tls"] = {
            "certificate": str(self.cert.certificate),
            "key": str(self.cert.key),
        }
        self.config_path.write_text(json.dumps(config, indent=2))


class TlsRegproxy(Regproxy):
    """regproxy serving TLS itself (``[server] tls_certificate/tls_key``) with ``cert``."""

    LISTENING = re.compile(r"listening on https://127\.0\.0\.1:(\d+)")

    def __init__(self, workdir: Path, *, cert: ServerCert, extra_config: str = "") -> None:
        tls = (
            f"[server]\ntls_certificate = {json.dumps(str(cert.certificate))}\n"
            f"tls_key = {json.dumps(str(cert.key))}\n"
        )
        super().__init__(workdir, extra_config=tls + extra_config)

    @property
    def url(self) -> str:
        return f"https://{self.host}"


@contextlib.contextmanager
def _trusting(ca: TestCA) -> Iterator[None]:
    """``SSL_CERT_FILE`` naming the test CA while the section runs (Python's default
    contexts and Go's crypto/x509 both read it); the old value afterwards."""
    old = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(ca.ca_file)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = old


def _pull_job(url: str, path: str, size: int, byte_range: tuple[int, int] | None = None):
    def job() -> None:
        with Connection(url, context=ssl.create_default_context()) as c:
            c.pull(path, size, byte_range)

    return job


def https(b: Bench) -> None:
    s, src = b.sizes, b.source
    ca = TestCA(b.workdir / "https-ca")
    cert = ca.issue(b.workdir / "https-cert")
    pull_size, readers, conc_size = s.pull, s.readers, s.https_concurrent_size
    single = b.row(
        f"HTTPS pull, single stream, {human(pull_size)}", "MB/s", target=Target("ratio", ">=", 1.0)
    )
    cpu = b.row(
        "HTTPS pull: server CPU seconds per GiB served (single stream)",
        "s/GiB",
        higher_is_better=False,
    )
    conc = b.row(
        f"HTTPS pull, {readers} concurrent readers of one {human(conc_size)} blob (total)",
        "MB/s",
        target=Target("ratio", ">=", 1.0),
    )
    conc_cpu = b.row(
        f"HTTPS pull, {readers} concurrent readers: server CPU seconds per GiB served",
        "s/GiB",
        higher_is_better=False,
    )
    ranged = b.row(
        f"HTTPS Range request of {human(s.range)}", "MB/s", target=Target("ratio", ">=", 1.0)
    )
    mono = b.row(
        f"HTTPS push, monolithic {human(s.push)} (POST, PUT)",
        "MB/s",
        target=Target("ratio", ">=", 2.0),
    )
    chunked = b.row(
        f"HTTPS push, {human(s.https_chunked)} in one PATCH with Transfer-Encoding: chunked "
        f"({human(DOCKER_CHUNK)} chunks, as docker sends it)",
        "MB/s",
        target=Target("ratio", ">=", 1.5),
    )
    options = {REF: {"cls": TlsReference, "cert": cert}, RP: {"cls": TlsRegproxy, "cert": cert}}
    blob = src.blob(0, pull_size, "https-pull")
    conc_blob = src.blob(0, conc_size, "https-concurrent")
    start = pull_size // 4
    byte_range = (start, start + s.range - 1)
    with _trusting(ca):
        with b.server(REF, **options[REF]) as ref, b.server(RP, **options[RP]) as rp:
            servers = {REF: ref, RP: rp}
            for srv in servers.values():
                with Connection(srv.url) as c:
                    c.push_monolithic("bench/tls", blob)
                    c.push_monolithic("bench/tls", conc_blob)
                _pull_job(srv.url, f"/v2/bench/tls/blobs/{blob.digest}", blob.size)()  # warm
            path = f"/v2/bench/tls/blobs/{blob.digest}"
            conc_path = f"/v2/bench/tls/blobs/{conc_blob.digest}"
            for rep in range(s.reps):
                for label in b.order(rep):
                    srv = servers[label]
                    sample = b.measure(
                        srv, lambda u=srv.url: timed_parallel([_pull_job(u, path, blob.size)])
                    )
                    record(single, label, sample, blob.size / sample.seconds / MB)
                    if sample.cpu is not None:
                        cpu.add(label, sample.cpu / (blob.size / GiB))
                    jobs = [_pull_job(srv.url, conc_path, conc_blob.size) for _ in range(readers)]
                    sample = b.measure(srv, lambda j=jobs: timed_parallel(j))
                    total = readers * conc_blob.size
                    record(conc, label, sample, total / sample.seconds / MB)
                    if sample.cpu is not None:
                        conc_cpu.add(label, sample.cpu / (total / GiB))
                    job = _pull_job(srv.url, path, s.range, byte_range)
                    sample = b.measure(srv, lambda j=job: timed_parallel([j]))
                    record(ranged, label, sample, s.range / sample.seconds / MB)

                    pushed = src.blob(0, s.push, f"https-mono-{rep}")

                    def push_mono(u: str = srv.url, x: Blob = pushed) -> float:
                        with Connection(u) as c:
                            return timed_parallel([lambda: c.push_monolithic("bench/push", x)])

                    sample = b.measure(srv, push_mono)
                    record(mono, label, sample, pushed.size / sample.seconds / MB)

                    pushed = src.blob(0, s.https_chunked, f"https-te-{rep}")

                    def push_te(u: str = srv.url, x: Blob = pushed) -> float:
                        with Connection(u) as c:
                            return timed_parallel(
                                [lambda: c.push_chunked_encoding("bench/push", x, DOCKER_CHUNK)]
                            )

                    sample = b.measure(srv, push_te)
                    record(chunked, label, sample, pushed.size / sample.seconds / MB)
        _proxy_from_tls_upstream(b, ca, cert)


def _proxy_from_tls_upstream(b: Bench, ca: TestCA, cert: ServerCert) -> None:
    """A cold pull through each cache (served over plain HTTP) from a docker-registry
    upstream serving TLS with the test CA; regproxy names the CA with `ca_file`,
    docker-registry trusts it through ``SSL_CERT_FILE``."""
    s, src = b.sizes, b.source
    blob = src.blob(0, s.proxy_blob, "https-proxied")
    base = "docker-registry 2.8.2 as a proxy (proxy.remoteurl)"
    cold = b.row(
        f"cold pull of {human(s.proxy_blob)} from an HTTPS upstream",
        "MB/s",
        target=Target("ratio", ">=", 1.0),
        baseline=base,
    )
    cold_bytes = b.row(
        "cold pull from an HTTPS upstream: upstream bytes (TLS records included)",
        "×blob",
        higher_is_better=False,
        target=Target("regproxy", "<=", 1.01),
        baseline=base,
    )
    with b.server(REF, cls=TlsReference, cert=cert) as upstream:
        with Connection(upstream.url) as c:
            c.push_monolithic("bench/proxied", blob)
        assert upstream.port is not None
        with CountingRelay(upstream.port) as relay:
            remote = f"https://127.0.0.1:{relay.port}"
            up = (
                f'[proxy.upstreams.up]\nurl = "{remote}"\nca_file = {json.dumps(str(ca.ca_file))}\n'
            )
            options = {REF: {"proxy_remote_url": remote}, RP: {"extra_config": up}}
            paths = {
                REF: f"/v2/bench/proxied/blobs/{blob.digest}",
                RP: f"/v2/p/up/bench/proxied/blobs/{blob.digest}",
            }
            for rep in range(s.reps):
                for label in b.order(rep):
                    with b.server(label, **options[label]) as srv:
                        relay.reset()
                        job = _pull_job(srv.url, paths[label], blob.size)
                        sample = b.measure(srv, lambda j=job: timed_parallel([j]))
                        record(cold, label, sample, blob.size / sample.seconds / MB)
                        cold_bytes.add(label, relay.wait_quiet() / blob.size)
