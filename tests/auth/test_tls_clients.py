"""Real clients over HTTPS with a test CA: docker, skopeo and podman log in, push and pull.

regproxy runs as `python -m regproxy serve` with `[server] tls_certificate/tls_key` and
the token flow on. The CA is generated per module (`tests/auth/certs.py`). Every client
is shown the CA explicitly (skopeo/podman `--cert-dir`, dockerd's `certs.d`), and the
negative cases (no CA, wrong password, logged out) prove verification and auth happen.

dockerd reads `/etc/docker/certs.d/<host:port>/ca.crt`; a test writes only its own
`127.0.0.1:<port>` folder there and removes it afterwards. (dockerd treats every
127.0.0.0/8 registry as "insecure" and skips certificate verification for it, so for
docker this shows HTTPS + login + token flow working; skopeo and podman prove the CA.)
Also: SIGHUP reloads the certificate without dropping an open connection.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import shutil
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.auth import PASSWORDS, write_htpasswd
from tests.support.certs import ServerCert, TestCA
from tests.support.dockerd import DockerDaemon
from tests.support.images import Image, make_image, write_docker_archive, write_oci_layout
from tests.support.podman import Podman
from tests.support.processes import RegproxyProcess
from tests.support.skopeo import Skopeo
from tests.support.tools import run

DOCKER_CERTS_D = Path("/etc/docker/certs.d")
PUSH_DIGEST = re.compile(r"digest: (sha256:[0-9a-f]{64}) size: (\d+)")


class TlsRegproxy(RegproxyProcess):
    """`RegproxyProcess` serving HTTPS (its listening line says `https://`)."""

    name = "regproxy-tls"
    LISTENING = re.compile(r"listening on https://127\.0\.0\.1:(\d+)")

    @property
    def url(self) -> str:
        return f"https://{self.host}"


def tls_auth_config(workdir: Path, cert: ServerCert, extra: str = "") -> str:
    htpasswd = write_htpasswd(workdir / "htpasswd")
    return f"""
[server]
tls_certificate = {json.dumps(str(cert.certificate))}
tls_key = {json.dumps(str(cert.key))}
{extra}

[auth]
htpasswd = {json.dumps(str(htpasswd))}
mode = "token"
token_ttl = "5m"

[auth.groups]
admins = ["root"]

[[auth.rules]]
repository = "public/*"
pull = ["anonymous"]
push = ["@authenticated"]
delete = ["@admins"]

[[auth.rules]]
repository = "alice/*"
pull = ["alice"]
push = ["alice"]
delete = ["alice"]
"""


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, ca: TestCA) -> Iterator[TlsRegproxy]:
    workdir = tmp_path_factory.mktemp("regproxy-tls")
    cert = ca.issue(workdir / "tls")
    proc = TlsRegproxy(workdir, extra_config=tls_auth_config(workdir, cert))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def cert_dir(ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A containers-style cert dir: `*.crt` files are CAs."""
    directory = tmp_path_factory.mktemp("cert-dir")
    shutil.copy(ca.ca_file, directory / "ca.crt")
    return directory


@pytest.fixture(scope="module")
def oci_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Image, Path]:
    img = make_image("tls-image", (64 * 1024, 16 * 1024))
    return img, write_oci_layout(tmp_path_factory.mktemp("layout") / "image", img, "v1")


def creds(user: str, password: str | None = None) -> str:
    return f"{user}:{PASSWORDS[user] if password is None else password}"


# ---- skopeo ------------------------------------------------------------------------------


def test_skopeo_with_creds_and_cert_dir(
    server: TlsRegproxy,
    skopeo: Skopeo,
    cert_dir: Path,
    oci_image: tuple[Image, Path],
) -> None:
    img, layout = oci_image
    private = f"docker://{server.host}/alice/skopeo:v1"
    public = f"docker://{server.host}/public/skopeo:v1"
    for dest in (private, public):
        skopeo(
            "copy",
            "--dest-creds", creds("alice"),
            "--dest-cert-dir", cert_dir,
            "--preserve-digests",
            f"oci:{layout}:v1",
            dest,
        )  # fmt: skip
    raw = skopeo("inspect", "--raw", "--creds", creds("alice"), "--cert-dir", cert_dir, private)
    assert raw.stdout.encode() == img.manifest
    # anonymous pull of a public repository (the token flow without credentials)
    anonymous = skopeo("inspect", "--raw", "--no-creds", "--cert-dir", cert_dir, public)
    assert anonymous.stdout.encode() == img.manifest
    out = tmp_dir = Path(skopeo.env["TMPDIR"]) / "pulled"
    skopeo("copy", "--src-creds", creds("alice"), "--src-cert-dir", cert_dir, private, f"dir:{out}")
    assert (tmp_dir / "manifest.json").read_bytes() == img.manifest

    refused = {
        "anonymous on a private repository": ("--no-creds", "--cert-dir", cert_dir, private),
        "wrong password": ("--creds", creds("alice", "nope"), "--cert-dir", cert_dir, private),
        "another user": ("--creds", creds("bob"), "--cert-dir", cert_dir, private),
        "no CA (certificate must be verified)": ("--creds", creds("alice"), private),
    }
    for what, args in refused.items():
        result = skopeo("inspect", "--raw", *args, check=False)
        assert result.returncode != 0, what
        if what.startswith("no CA"):
            assert "certificate" in result.stderr, result.stderr
        else:
            assert re.search(r"unauthorized|denied|authentication required", result.stderr,
                             re.IGNORECASE), (what, result.stderr)  # fmt: skip
    # push refused to bob on alice/* (403), with valid credentials
    result = skopeo(
        "copy", "--dest-creds", creds("bob"), "--dest-cert-dir", cert_dir,
        f"oci:{layout}:v1", f"docker://{server.host}/alice/bob-was-here:v1", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert re.search(r"denied|403", result.stderr, re.IGNORECASE), result.stderr


# ---- podman ------------------------------------------------------------------------------


def test_podman_login_push_pull(
    server: TlsRegproxy,
    podman: Podman,
    cert_dir: Path,
    oci_image: tuple[Image, Path],
) -> None:
    img, layout = oci_image
    host = server.host
    no_ca = podman("login", "-u", "alice", "-p", PASSWORDS["alice"], host, check=False)
    assert no_ca.returncode != 0
    assert "certificate" in no_ca.stderr, no_ca.stderr
    wrong = podman(
        "login", "--cert-dir", cert_dir, "-u", "alice", "-p", "not-the-password", host,
        check=False,
    )  # fmt: skip
    assert wrong.returncode != 0
    assert re.search(r"unauthorized|invalid username", wrong.stderr, re.IGNORECASE), wrong.stderr

    login = podman("login", "--cert-dir", cert_dir, "-u", "alice", "-p", PASSWORDS["alice"], host)
    assert "Login Succeeded" in login.stdout
    podman.pull(f"oci:{layout}:v1")
    ref = f"{host}/alice/podman:v1"
    podman(
        "push", "--signature-policy", podman.config.policy, "--cert-dir", cert_dir,
        img.image_id, f"docker://{ref}",
    )  # fmt: skip
    podman("rmi", "--all", "--force")
    podman("pull", "--signature-policy", podman.config.policy, "--cert-dir", cert_dir, ref)
    assert podman.image_inspect(ref)["Id"] == img.image_id.removeprefix("sha256:")

    podman("logout", host)
    podman("rmi", "--all", "--force")
    refused = podman(
        "pull", "--signature-policy", podman.config.policy, "--cert-dir", cert_dir, ref,
        check=False,
    )  # fmt: skip
    assert refused.returncode != 0


# ---- docker ------------------------------------------------------------------------------


@pytest.fixture
def docker_trusts_ca(server: TlsRegproxy, ca: TestCA) -> Iterator[Path]:
    """`/etc/docker/certs.d/127.0.0.1:<port>/ca.crt`, removed afterwards."""
    created_root = not DOCKER_CERTS_D.exists()
    host_dir = DOCKER_CERTS_D / server.host
    if host_dir.exists():
        pytest.fail(f"{host_dir} exists already: refusing to overwrite it")
    host_dir.mkdir(parents=True)
    try:
        shutil.copy(ca.ca_file, host_dir / "ca.crt")
        yield host_dir
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)
        if created_root:
            with contextlib.suppress(OSError):
                DOCKER_CERTS_D.rmdir()  # only if still empty


def docker_cli(
    daemon: DockerDaemon, *args: str | Path, stdin: bytes | None = None, check: bool = True
) -> tuple[int, str]:
    result = run(
        [daemon.docker_client, "--host", f"unix://{daemon.socket}", *args],
        env=daemon.docker_env,
        check=check,
        input=stdin,
        timeout=120,
    )
    return result.returncode, result.stdout + result.stderr


def test_docker_login_push_pull(
    server: TlsRegproxy,
    dockerd: DockerDaemon,
    docker_trusts_ca: Path,
    tmp_path: Path,
) -> None:
    img = make_image("tls-docker", (48 * 1024,))
    archive = write_docker_archive(tmp_path / "image.tar", img, ["regproxy-test/tls:v1"])
    host = server.host
    try:
        docker_cli(dockerd, "load", "--input", archive)
        code, out = docker_cli(
            dockerd, "login", "-u", "alice", "--password-stdin", host, stdin=b"wrong\n",
            check=False,
        )  # fmt: skip
        assert code != 0, out
        assert re.search(r"unauthorized|invalid username", out, re.IGNORECASE), out

        _, out = docker_cli(
            dockerd, "login", "-u", "alice", "--password-stdin", host,
            stdin=PASSWORDS["alice"].encode() + b"\n",
        )  # fmt: skip
        assert "Login Succeeded" in out
        private, public = f"{host}/alice/docker:v1", f"{host}/public/docker:v1"
        digests = {}
        for ref in (private, public):
            docker_cli(dockerd, "tag", "regproxy-test/tls:v1", ref)
            _, out = docker_cli(dockerd, "push", ref)
            match = PUSH_DIGEST.search(out)
            assert match, out
            digests[ref] = match.group(1)
        docker_cli(dockerd, "rmi", "--force", private, public, "regproxy-test/tls:v1")
        _, out = docker_cli(dockerd, "pull", private)
        assert f"Digest: {digests[private]}" in out

        docker_cli(dockerd, "logout", host)
        docker_cli(dockerd, "rmi", "--force", private)
        # anonymous pull of public/*, authenticated push: the point of the token flow
        _, out = docker_cli(dockerd, "pull", public)
        assert f"Digest: {digests[public]}" in out
        code, out = docker_cli(dockerd, "pull", private, check=False)
        assert code != 0
        assert re.search(r"denied|unauthorized|authentication required", out, re.I), out
        code, out = docker_cli(dockerd, "push", public, check=False)
        assert code != 0, out
    finally:
        ids = docker_cli(dockerd, "images", "--all", "--quiet", "--no-trunc")[1].split()
        if ids:
            docker_cli(dockerd, "rmi", "--force", *sorted(set(ids)), check=False)


# ---- certificate reload --------------------------------------------------------------------


def presented(context: ssl.SSLContext, port: int) -> bytes:
    """The certificate a new TLS handshake with 127.0.0.1:`port` is shown."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return _peer_cert(tls)


def _peer_cert(sock: ssl.SSLSocket) -> bytes:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_sighup_reloads_the_certificate_without_dropping_connections(
    tmp_path: Path, ca: TestCA
) -> None:
    first = ca.issue(tmp_path / "first", "first.regproxy.test")
    second = ca.issue(tmp_path / "second", "second.regproxy.test")
    live = ca.issue(tmp_path / "live")
    shutil.copy(first.certificate, live.certificate)
    shutil.copy(first.key, live.key)
    proc = TlsRegproxy(tmp_path / "server", extra_config=tls_auth_config(tmp_path, live))
    proc.start()
    try:
        context = ssl.create_default_context(cafile=str(ca.ca_file))
        assert proc.port is not None
        old = http.client.HTTPSConnection("127.0.0.1", proc.port, context=context, timeout=10)
        old.request("GET", "/v2/")
        response = old.getresponse()
        response.read()
        assert response.status == 401
        assert old.sock is not None
        assert _peer_cert(old.sock) == first.der

        shutil.copy(second.certificate, live.certificate)
        shutil.copy(second.key, live.key)
        assert proc.process is not None and proc.process.proc is not None
        proc.process.proc.send_signal(signal.SIGHUP)
        proc.process.wait_for_log("TLS certificate reloaded", timeout=10)

        assert presented(context, proc.port) == second.der
        # the connection opened before the reload is still served, with its old certificate
        old.request("GET", "/v2/")
        response = old.getresponse()
        response.read()
        assert response.status == 401
        assert _peer_cert(old.sock) == first.der

        # a broken certificate file is not loaded: the server keeps the last good one
        live.certificate.write_text("not a certificate")
        proc.process.proc.send_signal(signal.SIGHUP)
        proc.process.wait_for_log("TLS certificate reload failed", timeout=10)
        assert presented(context, proc.port) == second.der
        assert proc.process.running
        old.close()
    finally:
        proc.stop()


def test_secrets_never_reach_the_log(server: TlsRegproxy) -> None:
    """After the clients above logged in, pushed and pulled (this runs last in the module):
    no password, Basic credential or issued token appears in the server's log."""
    log = server.process.log_text() if server.process else ""
    assert "listening on https://" in log
    for user, password in PASSWORDS.items():
        assert password not in log
        assert base64.b64encode(f"{user}:{password}".encode()).decode() not in log
    assert not re.search(r"eyJ[A-Za-z0-9_-]{10,}\.eyJ", log), "a bearer token was logged"
