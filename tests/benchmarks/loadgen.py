"""A small closed-loop HTTP/1.1 load generator for what wrk cannot do: HEAD.

wrk's response parser is not told that a HEAD response has no body, so against a server
that (correctly) sends the GET's Content-Length it waits forever and reports 0 req/s.
This generator keeps ``connections`` keep-alive connections busy with one request in
flight each, like wrk, spread over ``processes`` worker processes (one per core by
default) that each drive their connections from one epoll loop on raw sockets. It
reads response heads, skips bodies by Content-Length (so it can also run GET, which
is how it is calibrated against wrk), and reports requests/s and latency percentiles
in wrk's terms.

Run as a worker: ``python -m tests.benchmarks.loadgen --worker URL METHOD CONNS SECONDS``
prints one JSON line; :func:`run` starts the workers and merges their results.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LoadResult:
    requests: int
    seconds: float
    errors: int
    non_2xx: int
    latencies_us: list[int]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        """Latency percentile in milliseconds."""
        if not self.latencies_us:
            return float("nan")
        ordered = sorted(self.latencies_us)
        index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
        return ordered[index] / 1000


def _worker(url: str, method: str, connections: int, seconds: float, headers: list[str]) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    assert host == "127.0.0.1", "loopback only"
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    extra = "".join(f"{h}\r\n" for h in headers)
    request = f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n".encode()
    head_only = method == "HEAD"
    ep = select.epoll()
    conns: dict[int, dict] = {}

    def connect() -> None:
        s = socket.create_connection((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        state = {"sock": s, "buf": b"", "need": None, "t0": time.perf_counter_ns()}
        conns[s.fileno()] = state
        ep.register(s.fileno(), select.EPOLLIN)
        s.send(request)

    for _ in range(connections):
        connect()
    latencies: list[int] = []
    count = errors = non_2xx = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        now = time.perf_counter()
        if now >= deadline:
            break
        for fd, _event in ep.poll(deadline - now):
            state = conns[fd]
            sock = state["sock"]
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # the server closed the connection: count it, reconnect
                errors += 1
                ep.unregister(fd)
                sock.close()
                del conns[fd]
                connect()
                continue
            buf = state["buf"] + data
            while True:
                need = state["need"]
                if need is None:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    head = buf[:end]
                    buf = buf[end + 4 :]
                    status = int(head[9:12])
                    length = 0
                    if not head_only:
                        for line in head.split(b"\r\n")[1:]:
                            name, _, value = line.partition(b":")
                            if name.strip().lower() == b"content-length":
                                length = int(value)
                                break
                    state["need"] = need = length
                    if not 200 <= status < 300:
                        non_2xx += 1
                if len(buf) < need:
                    break
                buf = buf[need:]
                state["need"] = None
                t = time.perf_counter_ns()
                latencies.append((t - state["t0"]) // 1000)
                count += 1
                state["t0"] = t
                sock.send(request)
            state["buf"] = buf
    elapsed = time.perf_counter() - started
    for state in conns.values():
        state["sock"].close()
    ep.close()
    return {
        "requests": count,
        "seconds": elapsed,
        "errors": errors,
        "non_2xx": non_2xx,
        "latencies_us": latencies,
    }


def run(
    url: str,
    *,
    method: str = "HEAD",
    connections: int = 64,
    seconds: float = 10.0,
    processes: int | None = None,
    headers: list[str] | None = None,
) -> LoadResult:
    """Drive ``url`` for ``seconds`` with ``connections`` connections over ``processes``."""
    processes = processes or max(1, min(os.cpu_count() or 1, connections))
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    worker = [sys.executable, "-m", "tests.benchmarks.loadgen", "--worker", url, method]
    procs = [
        subprocess.Popen(
            [*worker, str(n), str(seconds), *(headers or [])],
            stdout=subprocess.PIPE,
            env=env,
            cwd=REPO_ROOT,
        )
        for n in shares
    ]
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 60)
            if proc.returncode != 0:
                raise RuntimeError(f"load generator worker failed ({proc.returncode})")
            results.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    latencies = [x for r in results for x in r["latencies_us"]]
    return LoadResult(
        requests=sum(r["requests"] for r in results),
        # requests/s is the sum of each worker's rate: report it as over one common span
        seconds=sum(r["requests"] for r in results)
        / max(sum(r["requests"] / r["seconds"] for r in results), 1e-9),
        errors=sum(r["errors"] for r in results),
        non_2xx=sum(r["non_2xx"] for r in results),
        latencies_us=latencies,
    )


if __name__ == "__main__":
    if len(sys.argv) >= 6 and sys.argv[1] == "--worker":
        url, method, conns, secs, *hdrs = sys.argv[2:]
        print(json.dumps(_worker(url, method, int(conns), float(secs), hdrs)))
    else:
        print(__doc__)
        sys.exit(2)
