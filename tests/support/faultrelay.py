"""A fault-injecting TCP relay on 127.0.0.1 in front of one HTTP server (the test S3 engine).

Every connection is served by plain threads, so the relay works the same whether the
code under test runs in this process's event loop or in another process. What it does
with a connection is decided by `mode` when the connection arrives (and `cut()` ends the
ones already open):

- ``pass``: bytes are relayed both ways; `delay` seconds of sleep before each piece of
  up to 256 KiB, either way (a slow object store); `cut_after` resets every connection,
  and turns the relay to ``reset``, once one connection has sent that many bytes to the
  target (the store dying in the middle of an upload);
- ``reset``: the connection is reset at once (an endpoint that is down);
- ``error``: each request is read and answered with `status` and an S3 XML error body,
  then the connection is closed (an endpoint that answers 500 or 503);
- ``stall``: new requests are read and never answered, and open connections stop
  moving bytes either way (a hung object store), until the mode changes or `cut()`.

`target` may change at any time (a restarted engine on new ports): new connections go
there.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

MODES = ("pass", "reset", "error", "stall")
_REASONS = {500: "Internal Server Error", 503: "Service Unavailable"}
_CODES = {500: "InternalError", 503: "ServiceUnavailable"}
_CHUNK = 256 * 1024


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed peer's kernel would answer.

    `shutdown(SHUT_RD)` first wakes a thread blocked in `recv` on it: a plain `close()`
    would leave the socket open (and silent) for as long as that `recv` holds it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


def _error_response(status: int) -> bytes:
    code = _CODES.get(status, "InternalError")
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>injected by the test relay</Message>"
        "<RequestId>relay</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body


class FaultRelay:
    """Listens on a loopback port and relays to ``127.0.0.1:target``, or injects faults."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.mode = "pass"
        self.status = 503
        self.delay = 0.0
        self.cut_after: int | None = None
        self.requests_refused = 0  # connections reset or answered with an error
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name="faultrelay-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(
        self,
        mode: str,
        *,
        status: int = 503,
        delay: float = 0.0,
        cut_after: int | None = None,
    ) -> None:
        """Switch mode for new connections; ``reset`` and ``error`` also `cut()` the open
        ones (a pooled keep-alive connection would otherwise go on working), ``stall``
        freezes them."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode, self.status, self.delay, self.cut_after = mode, status, delay, cut_after
        if mode in ("reset", "error"):
            self.cut()

    def heal(self) -> None:
        """Back to relaying everything at full speed."""
        self.set("pass")

    def cut(self) -> None:
        """Reset every open connection."""
        with self._lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            _reset(sock)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.cut()

    def __enter__(self) -> FaultRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- connections ---------------------------------------------------------------------

    def _track(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._open.update(sockets)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            mode = self.mode
            if mode == "reset":
                self.requests_refused += 1
                _reset(client)
                continue
            self._track(client)
            handler = {"pass": self._relay, "error": self._answer_errors, "stall": self._stall}
            threading.Thread(
                target=handler[mode], args=(client,), name=f"faultrelay-{mode}", daemon=True
            ).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            upstream.settimeout(None)
        except OSError:
            _reset(client)
            return
        self._track(upstream)
        threading.Thread(
            target=self._pump, args=(upstream, client, False), name="faultrelay-down", daemon=True
        ).start()
        self._pump(client, upstream, True)

    def _pump(self, src: socket.socket, dst: socket.socket, to_target: bool) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                if self.delay:
                    time.sleep(self.delay)
                while self.mode == "stall" and not self._closed:
                    time.sleep(0.02)
                dst.sendall(data)
                sent += len(data)
                if to_target and self.cut_after is not None and sent >= self.cut_after:
                    self.set("reset")  # the store dies with this upload in flight
                    return
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def _read_request(self, client: socket.socket) -> bool:
        """Read one request head and its Content-Length body; False at end of stream.
        A request that expects 100-continue gets its answer before it sends a body."""
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            data = client.recv(_CHUNK)
            if not data:
                return False
            buffer += data
        head, _, rest = buffer.partition(b"\r\n\r\n")
        length = 0
        expect = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip() or 0)
            elif name.strip().lower() == b"expect":
                expect = b"100-continue" in value.lower()
        left = 0 if expect else length - len(rest)
        while left > 0:
            data = client.recv(min(_CHUNK, left))
            if not data:
                return False
            left -= len(data)
        return True

    def _answer_errors(self, client: socket.socket) -> None:
        try:
            if self._read_request(client):
                self.requests_refused += 1
                client.sendall(_error_response(self.status))
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.close()
            with self._lock:
                self._open.discard(client)

    def _stall(self, client: socket.socket) -> None:
        try:
            while client.recv(_CHUNK):
                pass
        except OSError:
            pass
