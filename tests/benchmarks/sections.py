"""The benchmark's sections. Each starts its own servers, so any of them can run alone."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .client import (
    ACCEPT_MANIFESTS,
    OCI_MANIFEST,
    Blob,
    Connection,
    MiB,
    image_manifest,
    small_blob,
    timed_parallel,
)
from .harness import Bench, Sample, SectionSkipped
from .relay import CountingRelay
from .report import REF, RP, Row, Target
from .servers import REPO_ROOT, Server, peak_rss

MB = 1e6


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:g} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def record(row: Row, label: str, sample: Sample, value: float) -> None:
    """Add a run's value and keep its server-side CPU time and peak RSS with the row."""
    row.add(label, value)
    if sample.cpu is not None:
        row.extra.setdefault("server_cpu_s", {}).setdefault(label, []).append(round(sample.cpu, 3))
    if sample.rss is not None:
        row.extra.setdefault("server_peak_rss_mib", {}).setdefault(label, []).append(
            round(sample.rss / MiB, 1)
        )


def _push_one(url: str, repo: str, blob: Blob) -> Callable[[], None]:
    def job() -> None:
        with Connection(url) as c:
            c.push_monolithic(repo, blob)

    return job


def _pull_one(url: str, path: str, size: int, byte_range: tuple[int, int] | None = None):
    def job() -> None:
        with Connection(url) as c:
            c.pull(path, size, byte_range)

    return job


# ---- blob push ---------------------------------------------------------------------------


def push(b: Bench) -> None:
    s, src = b.sizes, b.source
    mono = b.row(
        f"monolithic {human(s.push)} (POST, PUT)", "MB/s", target=Target("ratio", ">=", 2.5)
    )
    chunked = b.row(
        f"{human(s.push)} in {human(s.chunk)} PATCH chunks",
        "MB/s",
        target=Target("ratio", ">=", 2.5),
    )
    conc = b.row(
        f"{s.concurrent} concurrent pushes of {human(s.concurrent_size)} (total)",
        "MB/s",
        target=Target("ratio", ">=", 2.0),
    )
    growth = b.row(
        f"peak RSS growth from a {human(s.rss_probe)} to a {human(s.push)} push",
        "MiB",
        higher_is_better=False,
        target=Target("regproxy", "<=", 64),
        note="constant in blob size",
    )
    with b.pair() as servers:
        probe_rss: dict[str, int] = {}
        for label, srv in servers.items():  # also warms up both servers
            probe = src.blob(0, s.rss_probe, "rss-probe")
            sample = b.measure(srv, _push_one(srv.url, "bench/push", probe))
            probe_rss[label] = sample.rss or 0
        for rep in range(s.reps):
            for label in b.order(rep):
                srv = servers[label]
                blob = src.blob(0, s.push, f"mono-{rep}")
                sample = b.measure(srv, lambda u=srv.url, x=blob: timed_parallel(
                    [_push_one(u, "bench/push", x)]))  # fmt: skip
                record(mono, label, sample, blob.size / sample.seconds / MB)
                if sample.rss is not None:
                    growth.add(label, (sample.rss - probe_rss[label]) / MiB)

                blob = src.blob(0, s.push, f"chunked-{rep}")

                def chunked_push(u: str = srv.url, x: Blob = blob) -> float:
                    with Connection(u) as c:
                        return timed_parallel([lambda: c.push_chunked("bench/push", x, s.chunk)])

                sample = b.measure(srv, chunked_push)
                record(chunked, label, sample, blob.size / sample.seconds / MB)

                blobs = [
                    src.blob(i * s.concurrent_size, s.concurrent_size, f"concurrent-{rep}")
                    for i in range(s.concurrent)
                ]
                jobs = [_push_one(srv.url, "bench/push", x) for x in blobs]
                sample = b.measure(srv, lambda j=jobs: timed_parallel(j))
                record(conc, label, sample, sum(x.size for x in blobs) / sample.seconds / MB)


# ---- blob pull ---------------------------------------------------------------------------


def pull(b: Bench) -> None:
    s, src = b.sizes, b.source
    single = b.row(f"single stream, {human(s.pull)}", "MB/s", target=Target("ratio", ">=", 1.0))
    conc = b.row(
        f"{s.readers} concurrent readers of one {human(s.pull)} blob (total)",
        "MB/s",
        target=Target("ratio", ">=", 1.0),
    )
    ranged = b.row(f"Range request of {human(s.range)}", "MB/s")
    blob = src.blob(0, s.pull, "pull")
    start = s.pull // 4
    byte_range = (start, start + s.range - 1)
    with b.pair() as servers:
        for srv in servers.values():
            with Connection(srv.url) as c:
                c.push_monolithic("bench/pull", blob)
        path = f"/v2/bench/pull/blobs/{blob.digest}"
        for rep in range(s.reps):
            for label in b.order(rep):
                srv = servers[label]
                sample = b.measure(
                    srv, lambda u=srv.url: timed_parallel([_pull_one(u, path, blob.size)])
                )
                record(single, label, sample, blob.size / sample.seconds / MB)
                jobs = [_pull_one(srv.url, path, blob.size) for _ in range(s.readers)]
                sample = b.measure(srv, lambda j=jobs: timed_parallel(j))
                record(conc, label, sample, s.readers * blob.size / sample.seconds / MB)
                job = _pull_one(srv.url, path, s.range, byte_range)
                sample = b.measure(srv, lambda j=job: timed_parallel([j]))
                record(ranged, label, sample, s.range / sample.seconds / MB)


# ---- small requests ------------------------------------------------------------------------

SMALL_CONFIG = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
SMALL_LAYER = b"a small benchmark layer " * 64


def _setup_small(url: str, tags: int) -> tuple[str, float]:
    """A tagged manifest in bench/small and ``tags`` tags in bench/tags; the layer digest
    and the tag PUTs' rate."""
    manifest = image_manifest(small_blob(SMALL_CONFIG), [small_blob(SMALL_LAYER)])
    with Connection(url) as c:
        for repo in ("bench/small", "bench/tags"):
            c.push_small(repo, SMALL_CONFIG)
            layer = c.push_small(repo, SMALL_LAYER)
        c.put_manifest("bench/small", "latest", manifest, OCI_MANIFEST)
        started = time.perf_counter()
        for i in range(tags):
            c.put_manifest("bench/tags", f"t{i:04d}", manifest, OCI_MANIFEST)
        rate = tags / (time.perf_counter() - started)
        listed = c.tags("bench/tags")
        if len(listed) != tags:
            raise AssertionError(f"{url}: tags/list has {len(listed)} tags, expected {tags}")
        c.expect(200, "HEAD", f"/v2/bench/small/blobs/{layer}")
        c.expect(
            200,
            "GET",
            "/v2/bench/small/manifests/latest",
            headers={"Accept": ACCEPT_MANIFESTS},
        )
    return layer, rate


def small(b: Bench) -> None:
    from . import loadgen, wrk

    if shutil.which("wrk") is None:
        raise SectionSkipped("wrk is not installed (apt-get install wrk)")
    s = b.sizes
    conns, secs = s.connections, s.wrk_seconds
    put_rate = b.row(
        "manifest PUT by tag, one connection (setting up the tags)",
        "req/s",
    )
    # GET /v2/ has no target: one run per server keeps the section (and the run) shorter
    endpoints: list[tuple[str, str, str, list[str], float | None, float | None]] = [
        ("GET /v2/", "wrk", "/v2/", [], None, None),
        (
            "manifest GET by tag",
            "wrk",
            "/v2/bench/small/manifests/latest",
            [f"Accept: {ACCEPT_MANIFESTS}"],
            4.4,
            0.2,
        ),
        ("blob HEAD", "loadgen", "/v2/bench/small/blobs/{layer}", [], 5.7, None),
        (f"tags/list of {s.tags:,} tags", "wrk", "/v2/bench/tags/tags/list", [], 1.0, None),
    ]
    rows: dict[str, tuple[Row, Row, Row]] = {}
    for name, tool, _path, _hdrs, rps_target, p99_target in endpoints:
        note = "" if tool == "wrk" else "loadgen.py: wrk cannot HEAD"
        if rps_target is None:
            note = "one run"
        rows[name] = (
            b.row(
                f"{name}: throughput",
                "req/s",
                target=None if rps_target is None else Target("ratio", ">=", rps_target),
                note=note,
            ),
            b.row(f"{name}: p50 latency", "ms", higher_is_better=False),
            b.row(
                f"{name}: p99 latency",
                "ms",
                higher_is_better=False,
                target=None if p99_target is None else Target("ratio", "<=", p99_target),
            ),
        )
    calibration = b.row(
        "GET /v2/ with the HEAD load generator: throughput",
        "req/s",
        note="one run: calibrates it against wrk",
    )
    with b.pair() as servers:
        layers = {}
        for label, srv in servers.items():
            layers[label], rate = _setup_small(srv.url, s.tags)
            put_rate.add(label, rate)
        for rep in range(s.reps):
            for name, tool, path, hdrs, rps_target, _p99 in endpoints:
                if rps_target is None and rep > 0:
                    continue
                for label in b.order(rep):
                    srv = servers[label]
                    url = srv.url + path.format(layer=layers[label])
                    result: dict[str, object] = {}

                    def load(
                        url: str = url,
                        hdrs: list[str] = hdrs,
                        tool: str = tool,
                        result: dict[str, object] = result,
                    ) -> None:
                        if tool == "wrk":
                            r = wrk.run(url, connections=conns, seconds=secs, headers=hdrs)
                            result.update(rps=r.rps, p50=r.p50_ms, p99=r.p99_ms, err=r.errors)
                        else:
                            r = loadgen.run(url, method="HEAD", connections=conns, seconds=secs)
                            result.update(
                                rps=r.rps,
                                p50=r.percentile(50),
                                p99=r.percentile(99),
                                err=r.errors + r.non_2xx,
                            )

                    sample = b.measure(srv, load)
                    rps_row, p50_row, p99_row = rows[name]
                    record(rps_row, label, sample, float(result["rps"]))  # type: ignore[arg-type]
                    p50_row.add(label, float(result["p50"]))  # type: ignore[arg-type]
                    p99_row.add(label, float(result["p99"]))  # type: ignore[arg-type]
                    errors = rps_row.extra.setdefault("errors", {}).setdefault(label, [])
                    errors.append(result["err"])
                    if result["err"]:
                        print(f"  warning: {label} {name}: {result['err']} errors", flush=True)
            if rep == 0:
                for label in b.order(rep):
                    srv = servers[label]
                    r = loadgen.run(
                        f"{srv.url}/v2/", method="GET", connections=conns, seconds=max(1, secs / 2)
                    )
                    calibration.add(label, r.rps)


# ---- a whole image with skopeo -------------------------------------------------------------


def image(b: Bench) -> None:
    if shutil.which("skopeo") is None:
        raise SectionSkipped("skopeo is not installed (apt-get install skopeo)")
    from tests.support.images import make_image, write_oci_layout
    from tests.support.skopeo import Skopeo

    s = b.sizes
    started = time.perf_counter()
    layer_size = s.image_total // s.image_layers
    img = make_image("regproxy-benchmark", [layer_size] * s.image_layers)
    layout = write_oci_layout(b.workdir / "image-layout", img, "v1")
    b.info["image_generation_s"] = round(time.perf_counter() - started, 2)
    total = sum(layer.size for layer in img.layers) + len(img.config) + len(img.manifest)
    skopeo = Skopeo(b.workdir / "skopeo")
    what = f"{s.image_layers} layers, {human(s.image_total)}"
    push_row = b.row(f"skopeo copy to the registry ({what})", "s", higher_is_better=False)
    pull_row = b.row(
        "skopeo copy from the registry (to an OCI layout)", "s", higher_is_better=False
    )
    for rep in range(s.reps):
        for label in b.order(rep):
            # a fresh, empty registry each time, so every blob is really uploaded
            with b.server(label) as srv:
                ref = f"docker://{srv.host}/bench/image:v1"
                sample = b.measure(
                    srv, lambda r=ref: skopeo.copy(f"oci:{layout}:v1", r, "--preserve-digests")
                )
                record(push_row, label, sample, sample.seconds)
                dest = b.fresh_dir("pulled")
                sample = b.measure(srv, lambda r=ref, d=dest: skopeo.copy(r, f"oci:{d}:v1"))
                record(pull_row, label, sample, sample.seconds)
                shutil.rmtree(dest, ignore_errors=True)
    push_row.extra["bytes"] = pull_row.extra["bytes"] = total


# ---- proxy (issue 3) -------------------------------------------------------------------------


def proxy(b: Bench) -> None:
    s, src = b.sizes, b.source
    blob = src.blob(0, s.proxy_blob, "proxied")
    size = human(s.proxy_blob)
    base = "docker-registry 2.8.2 as a proxy (proxy.remoteurl)"
    at_most_once = Target("regproxy", "<=", 1.01)
    cold = b.row(f"cold pull of {size}", "MB/s", target=Target("ratio", ">=", 1.0), baseline=base)
    cold_bytes = b.row(
        "cold pull: upstream bytes", "×blob", higher_is_better=False, target=at_most_once,
        baseline=base,
    )  # fmt: skip
    warm = b.row("warm pull", "MB/s", baseline=base)
    warm_local = b.row(
        "warm pull vs a pushed blob of the same size",
        "MB/s",
        target=Target("ratio", ">=", 0.9),
        baseline="regproxy pulling a local blob",
        note="reference column: regproxy local pull",
    )
    conc = b.row(
        f"{s.proxy_clients} concurrent cold pulls (total)",
        "MB/s",
        target=Target("ratio", ">=", 1.0),
        baseline=base,
    )
    conc_bytes = b.row(
        f"{s.proxy_clients} concurrent cold pulls: upstream bytes",
        "×blob",
        higher_is_better=False,
        target=at_most_once,
        baseline=base,
    )
    rss = b.row(
        "peak RSS of the proxy",
        "MiB",
        higher_is_better=False,
        target=Target("ratio", "<=", 1.0),
        baseline=base,
    )
    with b.server(REF) as upstream:
        with Connection(upstream.url) as c:
            c.push_monolithic("bench/proxied", blob)
        with CountingRelay(upstream.port) as relay:
            options = {
                REF: {"proxy_remote_url": relay.url},
                RP: {"extra_config": f'[proxy.upstreams.up]\nurl = "{relay.url}"\n'},
            }
            paths = {
                REF: f"/v2/bench/proxied/blobs/{blob.digest}",
                RP: f"/v2/p/up/bench/proxied/blobs/{blob.digest}",
            }
            for rep in range(s.reps):
                for label in b.order(rep):
                    path = paths[label]
                    peak = 0
                    with b.server(label, **options[label]) as srv:
                        relay.reset()
                        sample = _pull(b, srv, path, blob.size, 1)
                        record(cold, label, sample, blob.size / sample.seconds / MB)
                        cold_bytes.add(label, relay.wait_quiet() / blob.size)
                        peak = max(peak, sample.rss or 0)
                        relay.reset()
                        sample = _pull(b, srv, path, blob.size, 1)
                        record(warm, label, sample, blob.size / sample.seconds / MB)
                        if label == RP:
                            warm_local.add(RP, blob.size / sample.seconds / MB)
                        relay.wait_quiet(quiet=0.3)
                        peak = max(peak, sample.rss or 0)
                        if label == RP:
                            with Connection(srv.url) as c:
                                c.push_monolithic("bench/local", blob)
                            local = f"/v2/bench/local/blobs/{blob.digest}"
                            sample = _pull(b, srv, local, blob.size, 1)
                            warm_local.add(REF, blob.size / sample.seconds / MB)
                    with b.server(label, **options[label]) as srv:
                        relay.reset()
                        sample = _pull(b, srv, path, blob.size, s.proxy_clients)
                        total = s.proxy_clients * blob.size
                        record(conc, label, sample, total / sample.seconds / MB)
                        conc_bytes.add(label, relay.wait_quiet() / blob.size)
                        peak = max(peak, sample.rss or 0)
                    rss.add(label, peak / MiB)


def _pull(b: Bench, srv: Server, path: str, size: int, clients: int) -> Sample:
    jobs = [_pull_one(srv.url, path, size) for _ in range(clients)]
    return b.measure(srv, lambda: timed_parallel(jobs))


# ---- offline commands: verify and gc -------------------------------------------------------


def _regproxy_command(command: str) -> None:
    """Skip the section when this checkout's regproxy has no such command (yet)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    probe = subprocess.run(
        [sys.executable, "-m", "regproxy", command, "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        check=False,
    )
    if probe.returncode != 0:
        reason = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["?"]
        raise SectionSkipped(f"`regproxy {command}` is not usable here: {reason[0]}")


def _config(root: Path) -> Path:
    config = root / "configuration.toml"
    lines = [
        f"registry_storage = {json.dumps(str(root / 'registry'))}",
        f"proxy_storage = {json.dumps(str(root / 'proxy'))}",
        f"temporary_registry_storage = {json.dumps(str(root / 'tmp'))}",
    ]
    config.write_text("\n".join(lines) + "\n")
    return config


def run_cli(args: list[str], timeout: float = 600) -> tuple[dict, float, int]:
    """``python -m regproxy ARGS --json``: its JSON, wall seconds and peak RSS (bytes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGPROXY_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "regproxy", *args, "--json"],
            stdout=out,
            stderr=err,
            env=env,
            cwd=REPO_ROOT,
        )
        # Peak RSS: poll VmHWM (reset by exec, unlike the rusage of a child forked from
        # this big process) until the child exits; reap it with waitpid ourselves.
        peak = 0
        deadline = time.monotonic() + timeout
        while True:
            peak = max(peak, peak_rss(proc.pid) or 0)
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode not in (0, 1):
        raise RuntimeError(
            f"regproxy {' '.join(args)} failed ({proc.returncode}): {stderr.decode()[-2000:]}"
        )
    return json.loads(stdout), wall, peak


def verify(b: Bench) -> None:
    _regproxy_command("verify")
    s, src = b.sizes, b.source
    root = b.fresh_dir("store")
    started = time.perf_counter()
    from .stores import build_verify_store

    stored = build_verify_store(root / "registry", src, s.verify_total, s.verify_blob)
    b.info["verify_store_build_s"] = round(time.perf_counter() - started, 2)
    config = _config(root)
    baseline = "hashlib.sha256 on one core, same run"
    speed = b.row(
        f"verify throughput, {human(stored)} in {human(s.verify_blob)} blobs",
        "MB/s",
        target=Target("ratio", ">=", 1.5),
        baseline=baseline,
        note="reference column: sha256 on one core",
    )
    wall = b.row("verify wall time (whole command)", "s", higher_is_better=False)
    memory = b.row("verify peak RSS", "MiB", higher_is_better=False)
    data = src.view[: s.verify_blob]
    try:
        for _rep in range(s.reps):
            started = time.perf_counter()
            hashlib.sha256(data).hexdigest()
            speed.add(REF, len(data) / (time.perf_counter() - started) / MB)
            report, seconds, rss = run_cli(["verify", "-c", str(config)])
            if not report.get("ok"):
                raise AssertionError(f"verify found problems: {report.get('problems')}")
            speed.add(RP, report["bytes_hashed"] / report["hash_seconds"] / MB)
            speed.extra.setdefault("workers", report.get("workers"))
            memory.add(RP, rss / MiB)
            wall.add(RP, seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def gc(b: Bench) -> None:
    _regproxy_command("gc")
    from .stores import build_gc_store

    s = b.sizes
    root = b.fresh_dir("store")
    try:
        built = build_gc_store(root / "registry", s.gc_blobs, s.gc_manifests)
        b.info["gc_store"] = {
            "blobs": built.blobs,
            "manifests": built.manifests,
            "orphans": built.orphans,
            "repositories": built.repositories,
            "build_s": round(built.seconds, 2),
        }
        config = _config(root)
        what = f"{built.blobs:,} blobs / {built.manifests:,} manifests"
        dry = b.row(f"gc --dry-run (mark + plan), {what}", "s", higher_is_better=False)
        real = b.row(
            f"gc, sweeping {built.orphans:,} unreferenced blobs", "s", higher_is_better=False
        )
        memory = b.row("gc --dry-run peak RSS", "MiB", higher_is_better=False)
        for _rep in range(s.reps):
            report, seconds, rss = run_cli(["gc", "-c", str(config), "--dry-run"])
            removed = sum(st["blobs_removed"] for st in report["stores"])
            if removed != built.orphans:
                raise AssertionError(f"gc --dry-run would remove {removed}, not {built.orphans}")
            dry.add(RP, report["seconds"])
            dry.extra.setdefault("wall_s", []).append(round(seconds, 3))
            memory.add(RP, rss / MiB)
        report, seconds, rss = run_cli(["gc", "-c", str(config)])
        removed = sum(st["blobs_removed"] for st in report["stores"])
        if removed != built.orphans:
            raise AssertionError(f"gc removed {removed} blobs, not {built.orphans}")
        real.add(RP, report["seconds"])
        real.extra["wall_s"] = round(seconds, 3)
        real.extra["peak_rss_mib"] = round(rss / MiB, 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def s3(b: Bench) -> None:
    from .objectstore import s3 as run

    run(b)


def https(b: Bench) -> None:
    from .https import https as run

    run(b)


SECTIONS: dict[str, Callable[[Bench], None]] = {
    "push": push,
    "pull": pull,
    "small": small,
    "image": image,
    "proxy": proxy,
    "verify": verify,
    "gc": gc,
    "s3": s3,
    "https": https,
}
#: sections a ``--quick`` run leaves out unless named with ``--only``: CI's quick run
#: must stay short, and starting SeaweedFS and four registries costs ~20 s
NOT_QUICK = frozenset({"s3"})
