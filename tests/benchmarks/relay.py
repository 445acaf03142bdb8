"""A byte-counting TCP relay in front of an upstream registry, moving data with splice(2).

The proxy benchmarks need the bytes an upstream actually sent, live (a pull-through
cache may go on fetching after its client is done, and an access log line only appears
when a response ends). Every connection gets two threads that move data socket → pipe
→ socket with ``os.splice``: no copy through user space and the GIL released in the
syscall, so the relay costs little CPU even at GB/s and never becomes the bottleneck.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time

PIPE_SIZE = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class _Pair:
    """The two sockets of one relayed connection; closed when both directions ended."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.running = 2


class CountingRelay:
    """Listens on a loopback port and forwards every connection to ``127.0.0.1:target``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self.downstream_bytes = 0  # upstream → client: what the upstream served
        self.upstream_bytes = 0  # client → upstream: requests
        self.connections = 0
        self._sockets: set[socket.socket] = set()
        self._stopped = False
        self._accepter = threading.Thread(target=self._accept, name="relay-accept", daemon=True)
        self._accepter.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.downstream_bytes = self.upstream_bytes = self.connections = 0

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._sockets.update((client, upstream))
            pair = _Pair(client, upstream)
            for src, dst, down in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(
                    target=self._pump, args=(pair, src, dst, down), name="relay-pump", daemon=True
                ).start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket, down: bool) -> None:
        read_end, write_end = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
        try:
            while True:
                try:
                    n = os.splice(src.fileno(), write_end, PIPE_SIZE)
                except OSError:
                    n = 0
                if n == 0:
                    break
                with self._lock:
                    if down:
                        self.downstream_bytes += n
                    else:
                        self.upstream_bytes += n
                while n:
                    n -= os.splice(read_end, dst.fileno(), n)
        except OSError:
            pass
        finally:
            os.close(read_end)
            os.close(write_end)
            # pass the end of stream on; the socket closes when both directions are done
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with self._lock:
                pair.running -= 1
                if pair.running == 0:
                    for sock in (pair.client, pair.upstream):
                        self._sockets.discard(sock)
                        sock.close()

    def wait_quiet(self, quiet: float = 1.0, timeout: float = 120.0) -> int:
        """Wait until no byte has moved for ``quiet`` seconds; return the downstream count.

        A cache that keeps fetching after its client finished (docker-registry stores a
        blob in a second, background fetch) is still moving bytes, so its count settles
        only when it is done.
        """
        deadline = time.monotonic() + timeout
        last = (-1, -1)
        since = time.monotonic()
        while time.monotonic() < deadline:
            now = (self.downstream_bytes, self.upstream_bytes)
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
            time.sleep(0.05)
        return self.downstream_bytes

    def close(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for s in list(self._sockets):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._sockets.clear()

    def __enter__(self) -> CountingRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
