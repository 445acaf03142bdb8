"""Benchmark: `workers = 2` against `workers = 1`, same machine, same run.

```sh
python -m tests.benchmarks.workers                 # everything: about 5 minutes on 2 cores
python -m tests.benchmarks.workers --only small    # sections: moves small https proxy
python -m tests.benchmarks.workers --quick         # 2 s loads, 1 repetition, small blobs
```

- **moves**: what an upload session moving between workers costs: the running hash of a
  worker that never saw the session is rebuilt from its data file (seconds per GiB, the
  file in the page cache), against `hashlib.sha256` over the same bytes in memory.
- **small**: manifest GET by tag (`wrk -t2 -c64`, with an Accept header) and blob HEAD
  (`tests/benchmarks/loadgen.py`, 64 connections) against regproxy with 1 and 2 workers
  and, in the same run, Debian's docker-registry 2.8.2 as `tests/benchmarks` runs it
  (`servers.Reference`: Debian's storage settings, its logging off) and once more with its
  default logging (info, access log on). CPU seconds of each process (supervisor
  included) from /proc, requests per worker from the `regproxy_worker_requests_total`
  series (a single process: the load generator's count): CPU seconds per 10,000 requests
  per worker; peak RSS (`VmHWM`, reset before each load) of each process.
- **https**: 4 concurrent pulls of one blob over TLS (regproxy terminating it), total MB/s.
- **proxy**: 8 concurrent cold pulls of one blob through a fresh cache, each on its own
  connection (spread by the kernel over the workers); upstream bytes counted by the
  byte-counting relay of `tests/benchmarks/relay.py` in front of a second regproxy.

regproxy runs everywhere with its default logging (`[log]` untouched: text, info, one access
line per request, to the log file the test harness keeps), as issue 16 asks of benchmarks.

Each measurement runs `--reps` times (default 3), alternating which configuration goes
first; the table has medians (the ratios to docker-registry: the median of each
repetition's ratio). Results: `tests/benchmarks/results/workers.json` (every
run's value, the load average at the start).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.client
import json
import os
import shutil
import ssl
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from regproxy.storage.uploads import Uploads
from tests.benchmarks import loadgen, wrk
from tests.benchmarks.client import (
    ACCEPT_MANIFESTS,
    BlobSource,
    Connection,
    random_buffer,
)
from tests.benchmarks.relay import CountingRelay
from tests.benchmarks.sections import _setup_small
from tests.benchmarks.servers import Reference, cpu_seconds, peak_rss, reset_peak_rss
from tests.support.certs import TestCA
from tests.support.processes import RegproxyProcess
from tests.workers.helpers import WorkersProcess

MiB = 1024 * 1024
GiB = 1024 * MiB
MB = 1_000_000
#: next to the main benchmark's results (a folder git ignores)
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "workers.json"


#: the small section's servers besides regproxy's
REF = "docker-registry"
REF_LOGGING = "docker-registry, default logging"


def server(workdir: Path, workers: int, extra: str = "") -> RegproxyProcess:
    """regproxy with its default logging (the access log on)."""
    if workers == 1:
        return RegproxyProcess(workdir, extra_config=extra)
    return WorkersProcess(workdir, workers=workers, extra_config=extra)


class LoggingReference(Reference):
    """docker-registry with its own default logging (info, access log on), as Debian's
    configuration leaves it, instead of the benchmark's logging off."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        del self.extra_config["log"]  # ReferenceRegistry's: info, text, access log on


def pids(srv: RegproxyProcess | Reference) -> dict[str, int]:
    """{"supervisor"/"1"/"2"…: pid} of a server's processes."""
    assert srv.process is not None and srv.process.pid is not None
    if isinstance(srv, WorkersProcess):
        found = {str(n): pid for n, pid in srv.pids().items()}
        return {"supervisor": srv.process.pid, **found}
    return {"1": srv.process.pid}


def cpu(srv: RegproxyProcess | Reference) -> dict[str, float]:
    return {name: cpu_seconds(pid) or 0.0 for name, pid in pids(srv).items()}


def reset_rss(srv: RegproxyProcess | Reference) -> None:
    for pid in pids(srv).values():
        reset_peak_rss(pid)


def rss_mib(srv: RegproxyProcess | Reference) -> dict[str, float]:
    return {name: (peak_rss(pid) or 0) / MiB for name, pid in pids(srv).items()}


def worker_requests(srv: RegproxyProcess | Reference) -> dict[str, float]:
    """Requests answered per worker so far (0 for a single process: the caller knows)."""
    if not isinstance(srv, WorkersProcess):
        return {}
    time.sleep(1.2)  # every worker's snapshot is at most a second old
    with urllib.request.urlopen(f"{srv.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("regproxy_worker_requests_total{"):
            name, _, value = line.rpartition(" ")
            found[name.split('"')[1]] = float(value)
    return found


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---- moves ---------------------------------------------------------------------------------


def moves(work: Path, quick: bool) -> dict:
    size = 128 * MiB if quick else GiB
    data = random_buffer(size)
    started = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    in_memory = time.perf_counter() - started
    lock_folder = work / "workers"
    writer = Uploads(work, lock_folder=lock_folder)
    session = writer.create("bench/app")
    view = memoryview(data)
    for start in range(0, size, 16 * MiB):
        writer.write(session, [view[start : start + 16 * MiB]])
    del view
    os.sync()
    with open(session.data_path, "rb") as f:  # in the page cache, as after a PATCH
        while f.read(16 * MiB):
            pass
    other = Uploads(work, lock_folder=lock_folder)
    moved = other.get("bench/app", session.id)
    started = time.perf_counter()
    fd = other.acquire(moved)  # a worker that never saw it: the whole prefix
    rehash = time.perf_counter() - started
    assert fd is not None and moved.hasher is not None
    assert moved.hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    other.release(moved, fd, record=True)
    writer.cancel(session)
    per_gib = GiB / size
    return {
        "size": size,
        "rehash_s_per_gib": rehash * per_gib,
        "sha256_in_memory_s_per_gib": in_memory * per_gib,
    }


# ---- small requests ----------------------------------------------------------------------


def small(work: Path, reps: int, seconds: float, reference: bool = True) -> dict:
    results: dict[str, dict[str, list]] = {}
    servers: dict[str, RegproxyProcess | Reference] = {
        f"workers={n}": server(work / f"w{n}", n) for n in (1, 2)
    }
    # docker-registry next to workers=2 in the order, so their ratio sees the least drift
    order = ["workers=1", "workers=2"]
    if reference:
        servers[REF] = Reference(work / "reference")
        servers[REF_LOGGING] = LoggingReference(work / "reference-logging")
        order = [REF_LOGGING, "workers=1", "workers=2", REF]
    try:
        for srv in servers.values():
            srv.start()
        layers = {label: _setup_small(srv.url, 10)[0] for label, srv in servers.items()}
        for rep in range(reps):
            # one endpoint at a time: its runs in a repetition are less than a minute apart
            for name in ("manifest GET by tag", "blob HEAD"):
                for label in order if rep % 2 == 0 else order[::-1]:
                    srv = servers[label]
                    before_cpu, before_req = cpu(srv), worker_requests(srv)
                    reset_rss(srv)
                    if name == "blob HEAD":
                        url = f"{srv.url}/v2/bench/small/blobs/{layers[label]}"
                        r = loadgen.run(url, method="HEAD", connections=64, seconds=seconds)
                        rps, total, errors = r.rps, r.requests, r.errors + r.non_2xx
                    else:
                        url = f"{srv.url}/v2/bench/small/manifests/latest"
                        headers = [f"Accept: {ACCEPT_MANIFESTS}"]
                        w = wrk.run(url, connections=64, seconds=seconds, headers=headers)
                        rps, total, errors = w.rps, w.requests, w.errors
                    rss = rss_mib(srv)
                    after_cpu, after_req = cpu(srv), worker_requests(srv)
                    used = {k: after_cpu[k] - before_cpu.get(k, 0.0) for k in after_cpu}
                    answered = (
                        {k: after_req[k] - before_req.get(k, 0.0) for k in after_req}
                        if after_req
                        else {"1": float(total)}
                    )
                    per_10k = {
                        k: used[k] / answered[k] * 10_000 for k in answered if answered[k] > 0
                    }
                    entry = results.setdefault(f"{name} | {label}", {})
                    entry.setdefault("rps", []).append(rps)
                    entry.setdefault("errors", []).append(errors)
                    entry.setdefault("cpu_s", []).append(used)
                    entry.setdefault("requests", []).append(answered)
                    entry.setdefault("cpu_s_per_10k_per_worker", []).append(per_10k)
                    entry.setdefault("peak_rss_mib", []).append(rss)
                    entry.setdefault("load_1min_after", []).append(os.getloadavg()[0])
                    shown = ", ".join(f"{k} {v:.2f}" for k, v in per_10k.items())
                    print(
                        f"  {name}, {label}: {rps:,.0f} req/s, {errors} errors, "
                        f"CPU s per 10k: {shown}",
                        flush=True,
                    )
    finally:
        for srv in servers.values():
            srv.stop()
    if reference:  # each repetition's ratio: the runs next to each other in time
        for name in ("manifest GET by tag", "blob HEAD"):
            for base in (REF, REF_LOGGING):
                ref = results[f"{name} | {base}"]["rps"]
                for n in (1, 2):
                    ours = results[f"{name} | workers={n}"]["rps"]
                    ratios = [a / b if b else float("nan") for a, b in zip(ours, ref, strict=True)]
                    results[f"{name} | workers={n} / {base}"] = {"ratio": ratios}
    return results


# ---- HTTPS pull --------------------------------------------------------------------------


def _tls_pull(port: int, path: str, size: int, context: ssl.SSLContext) -> None:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=300)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        buf = bytearray(MiB)
        got = 0
        while n := resp.readinto(buf):
            got += n
        if resp.status != 200 or got != size:
            raise AssertionError(f"HTTPS pull: {resp.status}, {got} of {size} bytes")
    finally:
        conn.close()


def parallel(jobs: list[Callable[[], None]]) -> float:
    errors: list[BaseException] = []

    def run(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def https(work: Path, reps: int, size: int, clients: int = 4) -> dict:
    ca = TestCA(work / "ca")
    cert = ca.issue(work / "cert")
    tls = (
        f"[server]\ntls_certificate = {json.dumps(str(cert.certificate))}\n"
        f"tls_key = {json.dumps(str(cert.key))}\n"
    )
    context = ssl.create_default_context(cafile=str(ca.ca_file))
    blob = BlobSource(random_buffer(size)).blob(0, size, "https")
    results: dict[str, list] = {}
    for rep in range(reps):
        for n in (1, 2) if rep % 2 == 0 else (2, 1):
            srv = server(work / f"https-{rep}-{n}", n)
            # push over plain HTTP on a first start, then serve the store over TLS
            srv.start()
            with Connection(srv.url) as c:
                c.push_monolithic("bench/tls", blob)
            srv.stop()
            srv.extra_config = tls + srv.extra_config.replace("[server]\n", "", 1)
            srv.LISTENING = WorkersProcess.LISTENING if n > 1 else _HTTPS_ONE
            srv.start()
            try:
                path = f"/v2/bench/tls/blobs/{blob.digest}"
                _tls_pull(srv.port or 0, path, size, context)  # warm the page cache
                before = cpu(srv)
                port = srv.port or 0
                job = functools.partial(_tls_pull, port, path, size, context)
                seconds = parallel([job] * clients)
                used = {k: v - before.get(k, 0.0) for k, v in cpu(srv).items()}
                mbps = clients * size / seconds / MB
                results.setdefault(f"workers={n}", []).append({"MB/s": mbps, "cpu_s": used})
                print(f"  HTTPS {clients} pulls, workers={n}: {mbps:,.0f} MB/s, cpu {used}")
            finally:
                srv.stop()
    return results


_HTTPS_ONE = __import__("re").compile(r"listening on https://127\.0\.0\.1:(\d+)")


# ---- proxy -------------------------------------------------------------------------------


def proxy(work: Path, reps: int, size: int, clients: int = 8) -> dict:
    blob = BlobSource(random_buffer(size)).blob(0, size, "proxied")
    upstream = server(work / "upstream", 1)
    upstream.start()
    results: dict[str, list] = {}
    try:
        with Connection(upstream.url) as c:
            c.push_monolithic("bench/proxied", blob)
        with CountingRelay(upstream.port or 0) as relay:
            for rep in range(reps):
                for n in (1, 2) if rep % 2 == 0 else (2, 1):
                    up = f'[proxy.upstreams.up]\nurl = "{relay.url}"\n'
                    srv = server(work / f"proxy-{rep}-{n}", n, up)
                    srv.start()
                    try:
                        relay.reset()
                        path = f"/v2/p/up/bench/proxied/blobs/{blob.digest}"
                        replicas: set[str] = set()

                        job = functools.partial(_proxied_pull, srv.url, path, size, replicas)
                        seconds = parallel([job] * clients)
                        upstream_bytes = relay.wait_quiet()
                        entry = {
                            "MB/s": clients * size / seconds / MB,
                            "upstream_x_blob": upstream_bytes / size,
                            "workers_answering": len(replicas),
                        }
                        results.setdefault(f"workers={n}", []).append(entry)
                        print(f"  proxy {clients} cold pulls, workers={n}: {entry}")
                    finally:
                        srv.stop()
    finally:
        upstream.stop()
    return results


def _proxied_pull(url: str, path: str, size: int, replicas: set[str]) -> None:
    with Connection(url) as c:
        r = c.request("GET", path, keep_body=False)
    if r.status != 200 or r.received != size:
        raise AssertionError(f"pull: {r.status}, {r.received} bytes")
    replicas.add(r.headers.get("x-regproxy-replica", "?"))


# ---- main --------------------------------------------------------------------------------


TARGETS = {"manifest GET by tag": 5.0, "blob HEAD": 5.7}  # workers=2 / docker-registry


def _per_worker(runs: list[dict[str, float]], fmt: str = "{:.2f}") -> str:
    """Medians per process over the runs: "1.40" for one, "w1 1.32, w2 1.37 (sup. 0.01)"."""
    names = sorted({k for run in runs for k in run})
    value = {k: median([run[k] for run in runs if k in run]) for k in names}
    if names == ["1"]:
        return fmt.format(value["1"])
    shown = ", ".join(f"w{k} {fmt.format(value[k])}" for k in names if k != "supervisor")
    if "supervisor" in value:
        shown += f" (supervisor {fmt.format(value['supervisor'])})"
    return shown


def _ratio(found: dict, key: str) -> str:
    ratios = found["small"].get(key, {}).get("ratio", [])
    if not ratios:
        return ""
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}×"
    return f"{median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"


def table(found: dict) -> str:
    rows = [
        "| measurement | docker-registry 2.8.2 | workers = 1 | workers = 2 | 2 vs 1 |",
        "|---|---|---|---|---|",
    ]
    small = found.get("small", {})
    ref = f"manifest GET by tag | {REF}" in small
    for name in ("manifest GET by tag", "blob HEAD") if small else ():
        one = median(small[f"{name} | workers=1"]["rps"])
        two = median(small[f"{name} | workers=2"]["rps"])
        base = f"{median(small[f'{name} | {REF}']['rps']):,.0f}" if ref else ""
        rows.append(f"| {name} (req/s) | {base} | {one:,.0f} | {two:,.0f} | {two / one:.2f}× |")
        if ref:
            rows.append(
                f"| … against docker-registry (target for workers = 2: "
                f"≥ {TARGETS[name]:g}×) | 1.00× | {_ratio(found, f'{name} | workers=1 / {REF}')} "
                f"| {_ratio(found, f'{name} | workers=2 / {REF}')} | |"
            )
            logging = median(small[f"{name} | {REF_LOGGING}"]["rps"])
            rows.append(
                f"| … against docker-registry with its default logging ({logging:,.0f} req/s) "
                f"| | {_ratio(found, f'{name} | workers=1 / {REF_LOGGING}')} "
                f"| {_ratio(found, f'{name} | workers=2 / {REF_LOGGING}')} | |"
            )
        cells = {
            label: _per_worker(small[f"{name} | {label}"]["cpu_s_per_10k_per_worker"])
            for label in ([REF] if ref else []) + ["workers=1", "workers=2"]
        }
        rows.append(
            f"| {name}: CPU s per 10,000 requests, per process | {cells.get(REF, '')} "
            f"| {cells['workers=1']} | {cells['workers=2']} | |"
        )
        cells = {
            label: _per_worker(small[f"{name} | {label}"]["peak_rss_mib"], "{:.0f}")
            for label in ([REF] if ref else []) + ["workers=1", "workers=2"]
        }
        rows.append(
            f"| {name}: peak RSS under load (MiB), per process | {cells.get(REF, '')} "
            f"| {cells['workers=1']} | {cells['workers=2']} | |"
        )
    if "https" in found:
        one = median([r["MB/s"] for r in found["https"]["workers=1"]])
        two = median([r["MB/s"] for r in found["https"]["workers=2"]])
        rows.append(
            f"| HTTPS pull, 4 concurrent (MB/s) | | {one:,.0f} | {two:,.0f} | {two / one:.2f}× |"
        )
    if "proxy" in found:
        for key, unit in (("MB/s", "MB/s"), ("upstream_x_blob", "×blob upstream")):
            one = median([r[key] for r in found["proxy"]["workers=1"]])
            two = median([r[key] for r in found["proxy"]["workers=2"]])
            rows.append(f"| 8 concurrent cold pulls ({unit}) | | {one:,.2f} | {two:,.2f} | |")
    if "moves" in found:
        m = found["moves"]
        rows.append(
            f"| upload moved to a new worker: re-hash (s per GiB) | | | "
            f"{m['rehash_s_per_gib']:.2f} | sha256 in memory: "
            f"{m['sha256_in_memory_s_per_gib']:.2f} |"
        )
    rows.append("")
    rows.append(
        f"regproxy with its default logging (access log on); load average at the start "
        f"{', '.join(f'{x:.2f}' for x in found['machine']['load_at_start'])}, at the end "
        f"{', '.join(f'{x:.2f}' for x in found['machine'].get('load_at_end', ()))}"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", default="moves,small,https,proxy")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="length of each load run")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run everything (servers, load generators) at this nice value, e.g. -5 on a "
        "shared machine (below 0 needs root)",
    )
    args = parser.parse_args(argv)
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by every child
    sections = args.only.split(",")
    reps = args.reps or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    size = 32 * MiB if args.quick else 256 * MiB
    if shutil.which("wrk") is None and "small" in sections:
        print("wrk is not installed: leaving out small", file=sys.stderr)
        sections.remove("small")
    reference = shutil.which("docker-registry") is not None
    if not reference and "small" in sections:
        print("docker-registry is not installed: small without it", file=sys.stderr)
    found: dict = {
        "machine": {"cpus": os.cpu_count(), "load_at_start": os.getloadavg()},
        "nice": args.nice,
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with tempfile.TemporaryDirectory(prefix="regproxy-workers-bench-") as tmp:
        work = Path(tmp)
        if "moves" in sections:
            found["moves"] = moves(work / "moves", args.quick)
            print(f"  moves: {found['moves']}")
        if "small" in sections:
            found["small"] = small(work / "small", reps, seconds, reference)
        if "https" in sections:
            found["https"] = https(work / "https", reps, size)
        if "proxy" in sections:
            found["proxy"] = proxy(work / "proxy", reps, size)
    found["machine"]["load_at_end"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(found, indent=2, default=str) + "\n")
    print(table(found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
