"""`regproxy serve` start-up failures: one line that names the real cause, exit 2."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.helpers import assert_one_line_error, run_cli, write_config


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something else already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_stray_file_in_storage_is_not_a_listen_error(tmp_path: Path) -> None:
    """A file named `blobs` where the store wants a folder used to read "cannot listen"."""
    path = write_config(tmp_path)
    (tmp_path / "registry").mkdir()
    stray = tmp_path / "registry" / "blobs"
    stray.write_text("not a folder")
    ran = run_cli("serve", "-c", path, "--listen", "127.0.0.1:0")
    assert_one_line_error(ran, 2, "cannot start", "File exists", str(stray))
    assert "listen" not in ran.stderr


def test_address_in_use_names_the_address(tmp_path: Path, busy_port: int) -> None:
    address = f"127.0.0.1:{busy_port}"
    ran = run_cli("serve", "-c", write_config(tmp_path), "--listen", address)
    assert_one_line_error(ran, 2, f"cannot listen on {address}", "address already in use")


def test_metrics_address_in_use_names_the_metrics_address(tmp_path: Path, busy_port: int) -> None:
    address = f"127.0.0.1:{busy_port}"
    path = write_config(tmp_path, extra=f'[metrics]\nlisten = "{address}"')
    ran = run_cli("serve", "-c", path, "--listen", "127.0.0.1:0")
    assert ran.code == 2 and "Traceback" not in ran.stderr, ran.stderr
    # the main listener came up (and logged so) first: the last line is the error
    last = ran.stderr.strip().splitlines()[-1]
    assert last.startswith(f"regproxy: cannot listen on {address}: "), last
    assert "address already in use" in last, last
