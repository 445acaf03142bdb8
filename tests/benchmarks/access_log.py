"""What the access log costs: small-request throughput with it off, on as text, on as JSON.

```sh
python -m tests.benchmarks.access_log                  # 3 rounds of 5 s per load
python -m tests.benchmarks.access_log --rounds 5 --seconds 10 --json out.json
```

Three regproxy processes on loopback (started afresh every round), identical but for
`[log]`: `access = false`; the default (`access = true`, text); `access = true` with
`format = "json"`. Every other setting is the default, so the "text" server is
regproxy as it ships. Each writes its log to a file (as the test harness does; under
systemd or docker it is a pipe).
The loads are the benchmark's small requests: `GET /v2/` and manifest GET by tag with
wrk, blob HEAD with `loadgen.py` (wrk cannot HEAD), 64 connections each. Rounds
rotate which server goes first; the table shows each load's median requests/s and the
ratio to the server with the access log off. At the end of a round the servers get
SIGTERM, and each log must hold an access line for every request the loads completed, so a fast log
that drops lines fails here.

Needs `wrk` (Debian package); loopback only. Numbers on a shared 2-core VM move by
±30 % between runs: read the ratios, measured in the same run.

`--toggle SECONDS` measures the same ratio in one process instead: a server as it ships
(text, then JSON) whose access log `log_toggle/sitecustomize.py` switches off and on every
SECONDS while the loads run. Each "on" phase is compared with the "off" phase before it
(requests/s and CPU µs per request), and the table shows the medians of those pairs. Two
server processes can differ by more than the log costs, and a load's rounds move with
the machine; here both sides of a pair share the process, its heap and the same second.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks import loadgen, wrk
from tests.benchmarks.client import (
    ACCEPT_MANIFESTS,
    OCI_MANIFEST,
    Connection,
    image_manifest,
    small_blob,
)
from tests.benchmarks.harness import profiled_python, python_wrapper, stop_profiler
from tests.benchmarks.servers import cpu_seconds
from tests.support.processes import RegproxyProcess

VARIANTS = {
    "off": "[log]\naccess = false\n",
    "text": "",  # the defaults: access = true, format = "text"
    "json": '[log]\nformat = "json"\n',
}
CONFIG = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
LAYER = b"a small benchmark layer " * 64
_TARGETS = r"(?:GET /v2/|GET /v2/bench/small/manifests/latest|HEAD /v2/bench/small/blobs/\S+)"
#: the access line of a load's request, as text and as JSON (whose message is
#: "METHOD path status")
_LOAD_LINE = re.compile(rf'"{_TARGETS} (?:HTTP/\d\.\d" |\d{{3}}")')


def setup(url: str) -> str:
    """A tagged manifest in bench/small; returns its layer's digest."""
    manifest = image_manifest(small_blob(CONFIG), [small_blob(LAYER)])
    with Connection(url) as c:
        c.push_small("bench/small", CONFIG)
        layer = c.push_small("bench/small", LAYER)
        c.put_manifest("bench/small", "latest", manifest, OCI_MANIFEST)
        c.expect(200, "HEAD", f"/v2/bench/small/blobs/{layer}")
    return layer


def load(name: str, url: str, layer: str, seconds: float) -> tuple[float, int]:
    """One load against one server: (requests/s, requests made)."""
    if name == "GET /v2/":
        r = wrk.run(url + "/v2/", seconds=seconds)
        return r.rps, r.requests
    if name == "manifest GET by tag":
        r = wrk.run(
            url + "/v2/bench/small/manifests/latest",
            seconds=seconds,
            headers=[f"Accept: {ACCEPT_MANIFESTS}"],
        )
        return r.rps, r.requests
    h = loadgen.run(url + f"/v2/bench/small/blobs/{layer}", method="HEAD", seconds=seconds)
    return h.rps, h.requests


LOADS = ("GET /v2/", "manifest GET by tag", "blob HEAD")


def access_lines(log: Path) -> int:
    """Access lines of the loads' requests in a server's log."""
    return len(_LOAD_LINE.findall(log.read_text(errors="replace")))


TOGGLE_SHIM = Path(__file__).with_name("log_toggle")


def toggled_python(rows: Path, phase: float, scratch: Path) -> str:
    """A stand-in for the interpreter that loads `log_toggle/sitecustomize.py`: the
    server's access log switched off and on every `phase` seconds, phases to `rows`."""
    command = (
        f"env PYTHONPATH={TOGGLE_SHIM} BENCH_LOG_TOGGLE={phase} BENCH_LOG_TOGGLE_OUT={rows} "
        f"{sys.executable}"
    )
    return python_wrapper(scratch / f"toggled-{rows.stem}.sh", command)


def phase_pairs(
    rows: list[dict[str, float]], start: float, end: float
) -> list[tuple[float, float]]:
    """(on/off requests/s, on-minus-off CPU µs per request) of each "on" phase within
    [start, end] and the "off" phase just before it."""
    inside = [r for r in rows if r["start"] >= start and r["end"] <= end and r["requests"] > 0]
    pairs = []
    for off, on in itertools.pairwise(inside):
        if off["on"] or not on["on"]:
            continue
        off_rps = off["requests"] / (off["end"] - off["start"])
        on_rps = on["requests"] / (on["end"] - on["start"])
        cpu = (on["cpu"] / on["requests"] - off["cpu"] / off["requests"]) * 1e6
        pairs.append((on_rps / off_rps, cpu))
    return pairs


def toggled(args: argparse.Namespace) -> int:
    """`--toggle`: the access log's cost measured inside one server process per format."""
    work = Path(tempfile.mkdtemp(prefix="rp-accesslog-toggle-"))
    pairs: dict[str, dict[str, list[tuple[float, float]]]] = {}
    variants = [v for v in args.only.split(",") if v in ("text", "json")]
    for variant in variants:
        pairs[variant] = {name: [] for name in LOADS}
        for round_ in range(args.rounds):
            rows_path = work / f"{variant}-{round_ + 1}.jsonl"
            python = toggled_python(rows_path, args.toggle, work)
            server = RegproxyProcess(
                work / f"{variant}-{round_ + 1}", extra_config=VARIANTS[variant], python=python
            )
            server.start()
            try:
                layer = setup(server.url)
                spans = {}
                for name in LOADS:
                    started = time.time()
                    load(name, server.url, layer, args.seconds)
                    spans[name] = (started, time.time())
                time.sleep(args.toggle + 0.2)  # the last phase is written
            finally:
                server.stop()
            rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
            for name, (start, end) in spans.items():
                found = phase_pairs(rows, start, end)
                pairs[variant][name] += found
                if found:
                    print(
                        f"round {round_ + 1} {name:22} {variant:5} {len(found):3d} pairs: "
                        f"on/off {statistics.median(p[0] for p in found):.3f}, "
                        f"+{statistics.median(p[1] for p in found):.1f} µs CPU/request",
                        flush=True,
                    )
    print(f"\nmedians of phase pairs ({args.toggle:g} s each), access log on against off:")
    print(
        f"{'load':22}"
        + "".join(f"{v:>10}" for v in variants)
        + "".join(f"{v + ' µs':>10}" for v in variants)
    )
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for name in LOADS:
        row = f"{name:22}"
        cells = {}
        for variant in variants:
            found = pairs[variant][name]
            cells[variant] = {
                "ratio": statistics.median(p[0] for p in found) if found else float("nan"),
                "cpu_us": statistics.median(p[1] for p in found) if found else float("nan"),
                "pairs": len(found),
            }
        row += "".join(f"{cells[v]['ratio']:10.3f}" for v in variants)
        row += "".join(f"{cells[v]['cpu_us']:10.1f}" for v in variants)
        print(row)
        summary[name] = cells
    if args.json:
        args.json.write_text(json.dumps({"toggle": args.toggle, "loads": summary}))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--only", default=",".join(VARIANTS), help="variants: off,text,json")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record each server with py-spy while the loads run (collapsed stacks in DIR)",
    )
    parser.add_argument(
        "--toggle",
        type=float,
        metavar="SECONDS",
        help="one server per format, its access log switched off and on every SECONDS",
    )
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    if args.toggle:
        return toggled(args)
    variants = [v for v in args.only.split(",") if v]
    work = Path(tempfile.mkdtemp(prefix="rp-accesslog-bench-"))
    results: dict[str, dict[str, list[float]]] = {v: {n: [] for n in LOADS} for v in variants}
    #: the server's CPU time per request (µs): steadier than req/s on a busy machine
    cpu: dict[str, dict[str, list[float]]] = {v: {n: [] for n in LOADS} for v in variants}
    made = dict.fromkeys(variants, 0)
    written = dict.fromkeys(variants, 0)
    for round_ in range(args.rounds):
        # fresh processes every round: one process can run 30 % slower than its twin for
        # its whole life (where its memory landed), which would bias every round alike
        servers: dict[str, RegproxyProcess] = {}
        try:
            layers = {}
            for variant in variants:
                python = sys.executable
                if args.profile is not None:  # CPU figures are py-spy's then: profile apart
                    name = f"access-log-{variant}-{round_ + 1}.txt"
                    python = profiled_python(args.profile / name, work)
                folder = work / f"{variant}-{round_ + 1}"
                server = RegproxyProcess(folder, extra_config=VARIANTS[variant], python=python)
                server.start()
                servers[variant] = server
                layers[variant] = setup(server.url)
            before = {v: access_lines(s.log_path) for v, s in servers.items()}
            order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
            for name in LOADS:
                for variant in order:
                    server = servers[variant]
                    assert server.process is not None and server.process.pid is not None
                    pid = server.process.pid
                    cpu_before = cpu_seconds(pid) or 0.0
                    rps, requests = load(name, server.url, layers[variant], args.seconds)
                    per_request = ((cpu_seconds(pid) or 0.0) - cpu_before) / max(requests, 1) * 1e6
                    results[variant][name].append(rps)
                    cpu[variant][name].append(per_request)
                    made[variant] += requests
                    print(
                        f"round {round_ + 1} {name:22} {variant:5} {rps:9.0f} req/s "
                        f"{per_request:7.1f} µs CPU/request",
                        flush=True,
                    )
            for server in servers.values():
                if args.profile is not None and server.process is not None:
                    stop_profiler(server.process)
            time.sleep(1.0)
            for server in servers.values():
                server.stop()  # SIGTERM: whatever the log still held must now be in the file
            for v, s in servers.items():
                written[v] += access_lines(s.log_path) - before[v]
        finally:
            for server in servers.values():
                server.stop()
    print()
    header = f"{'load':22}" + "".join(f"{v:>10}" for v in variants)
    header += "".join(f"{v + '/off':>10}" for v in variants if v != "off" and "off" in variants)
    print(header)
    medians = {v: {n: statistics.median(results[v][n]) for n in LOADS} for v in variants}
    cpu_medians = {v: {n: statistics.median(cpu[v][n]) for n in LOADS} for v in variants}
    for title, table, digits in (("req/s", medians, 0), ("CPU µs/request", cpu_medians, 1)):
        print(title)
        for name in LOADS:
            row = f"{name:22}" + "".join(f"{table[v][name]:10.{digits}f}" for v in variants)
            if "off" in variants:
                row += "".join(
                    f"{table[v][name] / table['off'][name]:10.2f}" for v in variants if v != "off"
                )
            print(row)
    lost = False
    for variant in variants:
        if variant == "off":
            continue
        # loads count the requests they completed; a connection cut at the end of a load
        # may have had one more request answered, so the log may hold up to one per
        # connection more, never fewer
        ok = written[variant] >= made[variant]
        lost |= not ok
        print(
            f"{variant}: {written[variant]} access lines for {made[variant]} requests"
            f"{'' if ok else '  <-- LINES LOST'}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "runs": results,
                    "medians": medians,
                    "cpu_us_per_request": cpu,
                    "cpu_medians": cpu_medians,
                    "lines": written,
                    "requests": made,
                }
            )
        )
    shutil.rmtree(work, ignore_errors=True)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
