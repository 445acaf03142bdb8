"""Graceful stop: requests get `shutdown_timeout` to finish, then cut-off uploads are dropped."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

from tests.support.processes import RegproxyProcess


def _start_upload(url: str, name: str) -> str:
    request = urllib.request.Request(f"{url}/v2/{name}/blobs/uploads/", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202
        return response.headers["Location"]


def test_sigterm_removes_uploads_cut_off_by_the_shutdown(tmp_path: Path) -> None:
    server = RegproxyProcess(tmp_path, extra_config='[server]\nshutdown_timeout = "1s"\n')
    server.start()
    try:
        location = _start_upload(server.url, "team/app")
        uploads = server.temporary_storage_dir / "uploads"
        assert len(list(uploads.iterdir())) == 1
        # a PATCH that announces 1 MB, sends a little, then stalls
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        head = (
            f"PATCH {location} HTTP/1.1\r\nHost: {server.host}\r\n"
            "Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n"
        )
        sock.sendall(head.encode() + b"x" * 1000)
        time.sleep(0.3)  # let the server start the handler
        started = time.monotonic()
        code = server.process.stop(timeout=15)
        elapsed = time.monotonic() - started
        sock.close()
        assert code == 0, "SIGTERM must end the server cleanly"
        assert elapsed < 10, "shutdown_timeout bounds the wait for in-flight requests"
        assert list(uploads.iterdir()) == [], "the cut-off upload's temp files are removed"
    finally:
        server.stop()


def test_sigterm_keeps_idle_upload_sessions_resumable(tmp_path: Path) -> None:
    """A session with no request in flight survives a restart (clients may resume it)."""
    server = RegproxyProcess(tmp_path)
    server.start()
    try:
        location = _start_upload(server.url, "team/app")
        server.restart()
        request = urllib.request.Request(f"{server.url}{location}", method="GET")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 204
            assert response.headers["Range"] == "0-0"
    finally:
        server.stop()
