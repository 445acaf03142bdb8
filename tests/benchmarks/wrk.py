"""Run wrk and read its report: requests/s, latency percentiles, errors."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    output: str

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


def parse(output: str) -> WrkResult:
    percentiles = {int(p): float(v) * _UNITS_MS[u] for p, v, u in _PERCENTILE.findall(output)}
    rps = _RPS.search(output)
    total = _TOTAL.search(output)
    if rps is None or 50 not in percentiles or 99 not in percentiles:
        raise ValueError(f"cannot read wrk's report:\n{output}")
    non_2xx = _NON_2XX.search(output)
    sock = _SOCKET.search(output)
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(total.group(1)) if total else 0,
        p50_ms=percentiles[50],
        p99_ms=percentiles[99],
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(x) for x in sock.groups()) if sock else 0,
        output=output,
    )


def run(
    url: str,
    *,
    connections: int = 64,
    seconds: float = 10.0,
    threads: int = 2,
    headers: list[str] | None = None,
) -> WrkResult:
    """``wrk --latency`` against one loopback URL."""
    assert url.startswith("http://127.0.0.1:"), "loopback only"
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s"]
    argv.append("--latency")
    for header in headers or []:
        argv += ["-H", header]
    argv.append(url)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    return parse(proc.stdout)
