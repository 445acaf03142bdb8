"""regproxy against Debian's docker-registry 2.8.2, on this machine, in one run.

    python -m tests.benchmarks.bench                 # everything (~10 min on 2 cores)
    python -m tests.benchmarks.bench --only push,pull
    python -m tests.benchmarks.bench --quick         # tiny sizes, 1 repetition (CI)

Both servers run on loopback with filesystem storage in a temp folder, no auth and no
per-request logging. Each measurement is repeated (alternating which server goes first);
the table shows medians and the regproxy/reference ratio against issue 7's targets.
Results: ``tests/benchmarks/results/latest.json`` (every run's value, server CPU time and
peak RSS) and ``latest.md`` (the table, for the README). See tests/benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python tests/benchmarks/bench.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "tests.benchmarks"

from tests.benchmarks.harness import FULL, QUICK, Bench, SectionSkipped
from tests.benchmarks.report import REF, RP, Row, Target, markdown, print_table
from tests.benchmarks.sections import NOT_QUICK, SECTIONS
from tests.benchmarks.servers import REPO_ROOT, python_version, tool_version

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1024 * 1024


def machine() -> dict[str, object]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = 0
    try:
        with open("/proc/meminfo") as f:
            memory = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "memory_gib": round(memory / 2**30, 1),
    }


def versions() -> dict[str, str]:
    import aiohttp

    commit = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "regproxy_commit": commit or "?",
        "python": python_version(),
        "aiohttp": aiohttp.__version__,
        "docker-registry": tool_version(["docker-registry", "--version"]),
        "wrk": tool_version(["wrk", "-v"]).split("Copyright")[0].strip(),
        "skopeo": tool_version(["skopeo", "--version"]),
    }


def header(info: dict[str, object], quick: bool) -> str:
    m = info["machine"]
    v = info["versions"]
    assert isinstance(m, dict) and isinstance(v, dict)
    mode = "quick mode: tiny sizes, not a measurement" if quick else f"medians of {info['reps']}"
    return (
        f"regproxy {v['regproxy_commit']} vs {v['docker-registry']} — {m['cpu']}, "
        f"{m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, Python {v['python']}, "
        f"{info['date']} ({mode})"
    )


def rss_rows(bench: Bench) -> list[Row]:
    """Peak RSS per section and over the run (the proxy section's: the proxies')."""
    rows = []
    overall = Row(
        "rss",
        "server peak RSS over the run",
        "MiB",
        higher_is_better=False,
        target=Target("ratio", "<=", 1.0),
    )
    for section, peaks in bench.rss.items():
        row = Row("rss", f"server peak RSS during '{section}'", "MiB", higher_is_better=False)
        for label in (REF, RP):
            if label in peaks:
                row.add(label, peaks[label] / MiB)
        rows.append(row)
    for label in (REF, RP):
        values = [p[label] for p in bench.rss.values() if label in p]
        if values:
            overall.add(label, max(values) / MiB)
    return [*rows, overall] if rows else []


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.bench",
        description="Benchmark regproxy against Debian's docker-registry in the same run.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repetition, 1 s loads")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SECTION",
        help=f"run only these sections (repeat or comma-separate): {', '.join(SECTIONS)}; "
        f"--quick leaves out {', '.join(sorted(NOT_QUICK))} unless named here",
    )
    parser.add_argument("--reps", type=int, help="repetitions per measurement (default 3)")
    parser.add_argument("--seconds", type=float, help="duration of each load run (default 10)")
    parser.add_argument(
        "--out", type=Path, help=f"JSON result file (default {RESULTS}/latest.json)"
    )
    parser.add_argument("--workdir", type=Path, help="parent folder for the servers' storage")
    parser.add_argument("--keep", action="store_true", help="keep the storage folder")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record regproxy with py-spy (collapsed stacks per server into DIR)",
    )
    args = parser.parse_args(argv)
    only = [s.strip() for item in args.only for s in item.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    args.sections = only or [s for s in SECTIONS if not (args.quick and s in NOT_QUICK)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("docker-registry") is None:
        print("docker-registry is not installed (apt-get install docker-registry)", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    if args.reps:
        sizes = dataclasses.replace(sizes, reps=args.reps)
    if args.seconds:
        sizes = dataclasses.replace(sizes, wrk_seconds=args.seconds)
    out = args.out or RESULTS / "latest.json"
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="regproxy-bench-", dir=args.workdir))
    bench = Bench(sizes, workdir, args.profile)
    info: dict[str, object] = {
        "machine": machine(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "reps": sizes.reps,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    title = header(info, args.quick)
    print(title, flush=True)
    if os.getloadavg()[0] > 0.5:
        print(
            f"warning: the machine is not idle (load average {os.getloadavg()[0]:.2f}): "
            "other work competes for the cores and widens the spread of every number",
            flush=True,
        )
    sections: dict[str, dict[str, object]] = {}
    started = time.perf_counter()
    try:
        for name in args.sections:
            bench.section = name
            t0 = time.perf_counter()
            print(f"[{name}] ...", flush=True)
            try:
                SECTIONS[name](bench)
                status: dict[str, object] = {"status": "ok"}
            except SectionSkipped as exc:
                status = {"status": "skipped", "reason": str(exc)}
                print(f"[{name}] skipped: {exc}", flush=True)
            except Exception as exc:
                status = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
                traceback.print_exc()
                print(f"[{name}] FAILED: {exc}", flush=True)
            status["seconds"] = round(time.perf_counter() - t0, 1)
            sections[name] = status
            print(f"[{name}] {status['status']} in {status['seconds']} s", flush=True)
    finally:
        if args.keep:
            print(f"storage kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    rows = [*bench.rows, *rss_rows(bench)]
    result = {
        "schema": 1,
        "mode": "quick" if args.quick else "full",
        "header": title,
        **info,
        "seconds": round(time.perf_counter() - started, 1),
        "sizes": dataclasses.asdict(sizes),
        "sections": sections,
        "info": bench.info,
        "rows": [row.to_json() for row in rows],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, allow_nan=False, default=_json_default) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, title))
    print()
    print_table(rows, title)
    print(f"\n{len(rows)} rows in {result['seconds']} s; written to {out} and .md")
    return 1 if any(s["status"] == "error" for s in sections.values()) else 0


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {value!r}")


if __name__ == "__main__":
    sys.exit(main())
