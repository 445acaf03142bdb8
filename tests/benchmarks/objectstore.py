"""The ``s3`` section (issue 13): both registries with their stores on one SeaweedFS.

One ``weed mini`` on loopback (``tests/support/seaweed.py``: pinned ports, static keys,
buckets never created by a write) serves a bucket per registry: docker-registry 2.8.2
with its own S3 driver (``storage.s3``, path-style through ``regionendpoint``, V4
signatures) and regproxy with both stores on S3 (``s3://BUCKET/registry`` and
``/proxy``; uploads still buffered in its local temporary folder). Both run twice: with
blobs relayed through the registry (``[s3] redirect = false``,
``storage.redirect.disable: true``), then with blob GETs answered by a 307 to a presigned
URL of the engine, which the client follows.

Measured, medians of ``--reps`` as everywhere: pushes of one blob (monolithic, and in
PATCH chunks), pulls (relayed, and following the redirect), manifest GET by tag and
tags/list under ``wrk``, the servers' peak RSS (the ``rss`` rows), and ``regproxy gc
--dry-run`` over a store of ``s3_gc_blobs`` blobs written straight into a third bucket.
Each row also keeps the engine's CPU seconds per run (``seaweedfs_cpu_s``): the engine
shares the two cores with the registry and the client.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from .client import ClientError, Connection, timed_parallel
from .harness import Bench, Sample, SectionSkipped
from .report import REF, RP, Row, Target
from .servers import S3Reference, S3Regproxy, S3Target, Server, cpu_seconds

MB = 1e6
MiB = 1024 * 1024
BASELINE = "docker-registry 2.8.2 with its S3 driver, same SeaweedFS"


def _engine(workdir: Path):  # -> SeaweedS3
    """A started SeaweedFS, or SectionSkipped saying what is missing."""
    try:
        import boto3  # noqa: F401
    except ImportError:
        raise SectionSkipped("boto3 is not installed (pip install '.[s3]')") from None
    import pytest

    from tests.support.seaweed import SeaweedS3

    try:  # tests.support reports a missing tool as a pytest skip (or failure with CI=true)
        engine = SeaweedS3(workdir)
    except (pytest.skip.Exception, pytest.fail.Exception) as exc:
        raise SectionSkipped(f"SeaweedFS: {exc.msg} (pip install '.[test]')") from None
    engine.start()
    return engine


def _follow(url: str, path: str, size: int, hops: list[float] | None = None) -> Callable[[], None]:
    """GET a blob that answers 307, then GET the presigned URL it names (loopback only);
    the seconds until the 307 go to ``hops``."""

    def job() -> None:
        started = time.perf_counter()
        with Connection(url) as c:
            resp = c.request("GET", path)
        if hops is not None:
            hops.append(round(time.perf_counter() - started, 4))
        if resp.status != 307:
            raise ClientError(f"GET {url}{path}: {resp.status}, expected a 307 redirect")
        target = urlsplit(resp.headers["location"])
        with Connection(f"{target.scheme}://{target.netloc}") as s3:
            s3.pull(f"{target.path}?{target.query}", size)

    return job


def _relayed(url: str, path: str, size: int) -> Callable[[], None]:
    def job() -> None:
        with Connection(url) as c:
            c.pull(path, size)

    return job


class _Run:
    """Measurements of this section: the server's sample plus the engine's CPU time."""

    def __init__(self, b: Bench, engine_pid: int) -> None:
        self.b = b
        self.engine_pid = engine_pid

    def measure(self, srv: Server, fn: Callable[[], object]) -> tuple[Sample, float | None]:
        before = cpu_seconds(self.engine_pid)
        sample = self.b.measure(srv, fn)
        after = cpu_seconds(self.engine_pid)
        return sample, None if before is None or after is None else after - before

    def record(
        self, row: Row, label: str, sample: Sample, engine_cpu: float | None, value: float
    ) -> None:
        from .sections import record

        record(row, label, sample, value)
        if engine_cpu is not None:
            cpu = row.extra.setdefault("seaweedfs_cpu_s", {}).setdefault(label, [])
            cpu.append(round(engine_cpu, 3))


def s3(b: Bench) -> None:
    from .sections import human

    if shutil.which("wrk") is None:
        raise SectionSkipped("wrk is not installed (apt-get install wrk)")
    from tests.support.seaweed import ACCESS_KEY, REGION, SECRET_KEY, VERSION

    s, src = b.sizes, b.source
    size = human(s.s3_blob)
    at_least = {x: Target("ratio", ">=", x) for x in (1.0, 2.0, 4.0)}

    def row(name: str, unit: str, target: float | None = None, **kw: object) -> Row:
        return b.row(
            name,
            unit,
            target=None if target is None else at_least[target],
            baseline=BASELINE,
            **kw,  # type: ignore[arg-type]
        )

    mono = row(f"push {size} monolithic (POST, PUT)", "MB/s", 2.0)
    chunked = row(f"push {size} in {human(s.chunk)} PATCH chunks", "MB/s", 2.0)
    relayed = row(f"pull {size}, relayed by the registry", "MB/s", 1.0)
    redirected = row(f"pull {size}, following the 307 to a presigned URL", "MB/s", 1.0)
    put_rate = row("manifest PUT by tag, one connection (setting up the tags)", "req/s")
    loads = {
        "manifest": (
            row("manifest GET by tag: throughput", "req/s", 4.0),
            row("manifest GET by tag: p50 latency", "ms", higher_is_better=False),
            row("manifest GET by tag: p99 latency", "ms", higher_is_better=False),
        ),
        "tags": (
            row(f"tags/list of {s.tags:,} tags: throughput", "req/s", 1.0),
            row(f"tags/list of {s.tags:,} tags: p50 latency", "ms", higher_is_better=False),
            row(f"tags/list of {s.tags:,} tags: p99 latency", "ms", higher_is_better=False),
        ),
    }
    started = time.perf_counter()
    engine = _engine(b.fresh_dir("seaweedfs"))
    try:
        assert engine.process is not None and engine.process.pid is not None
        run = _Run(b, engine.process.pid)
        b.info["s3_engine"] = {
            "seaweedfs": VERSION,
            "start_s": round(time.perf_counter() - started, 2),
        }
        buckets = {REF: "bench-reference", RP: "bench-regproxy"}
        for bucket in buckets.values():
            engine.create_bucket(bucket)

        def targets(redirect: bool) -> dict[str, S3Target]:
            return {
                label: S3Target(engine.endpoint, REGION, ACCESS_KEY, SECRET_KEY, bucket, redirect)
                for label, bucket in buckets.items()
            }

        classes = {REF: S3Reference, RP: S3Regproxy}
        pulled = src.blob(0, s.s3_blob, "s3-pull")
        path = f"/v2/bench/s3/blobs/{pulled.digest}"

        # ---- blobs relayed through the registry: push, pull, small requests ----------
        relay = targets(False)
        with (
            b.server(REF, cls=classes[REF], target=relay[REF]) as ref,
            b.server(RP, cls=classes[RP], target=relay[RP]) as rp,
        ):
            servers: dict[str, Server] = {REF: ref, RP: rp}
            for srv in servers.values():  # warms both up: connections to the engine
                with Connection(srv.url) as c:
                    c.push_monolithic("bench/s3", src.blob(0, s.rss_probe, "s3-probe"))
                    c.push_monolithic("bench/s3", pulled)
            for rep in range(s.reps):
                for label in b.order(rep):
                    srv = servers[label]
                    blob = src.blob(0, s.s3_blob, f"s3-mono-{rep}")

                    def push(u: str = srv.url, x=blob) -> float:
                        with Connection(u) as c:
                            return timed_parallel([lambda: c.push_monolithic("bench/s3", x)])

                    sample, cpu = run.measure(srv, push)
                    run.record(mono, label, sample, cpu, blob.size / sample.seconds / MB)

                    blob = src.blob(0, s.s3_blob, f"s3-chunked-{rep}")

                    def push_chunked(u: str = srv.url, x=blob) -> float:
                        with Connection(u) as c:
                            return timed_parallel([lambda: c.push_chunked("bench/s3", x, s.chunk)])

                    sample, cpu = run.measure(srv, push_chunked)
                    run.record(chunked, label, sample, cpu, blob.size / sample.seconds / MB)

                    job = _relayed(srv.url, path, pulled.size)
                    sample, cpu = run.measure(srv, lambda j=job: timed_parallel([j]))
                    run.record(relayed, label, sample, cpu, pulled.size / sample.seconds / MB)
            _small(b, run, servers, put_rate, loads)

        # ---- blob GETs redirected to the engine ----------------------------------------
        redirect = targets(True)
        with (
            b.server(REF, cls=classes[REF], target=redirect[REF]) as ref,
            b.server(RP, cls=classes[RP], target=redirect[RP]) as rp,
        ):
            servers = {REF: ref, RP: rp}
            for srv in servers.values():
                _follow(srv.url, path, pulled.size)()  # warm-up, and checks the 307
            for rep in range(s.reps):
                for label in b.order(rep):
                    srv = servers[label]
                    hops = redirected.extra.setdefault("seconds_to_307", {}).setdefault(label, [])
                    job = _follow(srv.url, path, pulled.size, hops)
                    sample, cpu = run.measure(srv, lambda j=job: timed_parallel([j]))
                    run.record(redirected, label, sample, cpu, pulled.size / sample.seconds / MB)

        _gc(b, engine)
        b.info["s3_engine"]["rss_mib_at_end"] = round(engine.rss_bytes() / MiB, 1)  # type: ignore[index]
    finally:
        engine.stop()
        shutil.rmtree(engine.workdir, ignore_errors=True)


def _small(
    b: Bench,
    run: _Run,
    servers: dict[str, Server],
    put_rate: Row,
    loads: dict[str, tuple[Row, Row, Row]],
) -> None:
    """Manifest GET by tag and tags/list under wrk (64 connections), as the small section."""
    from . import wrk
    from .client import ACCEPT_MANIFESTS
    from .sections import _setup_small

    s = b.sizes
    for label, srv in servers.items():
        _layer, rate = _setup_small(srv.url, s.tags)
        put_rate.add(label, rate)
    endpoints = {
        "manifest": ("/v2/bench/small/manifests/latest", [f"Accept: {ACCEPT_MANIFESTS}"]),
        "tags": ("/v2/bench/tags/tags/list", []),
    }
    for rep in range(s.reps):
        for key, (path, headers) in endpoints.items():
            for label in b.order(rep):
                srv = servers[label]
                result: dict[str, wrk.WrkResult] = {}

                def load(u: str = srv.url + path, h: list[str] = headers, out=result) -> None:
                    conns, secs = s.connections, s.wrk_seconds
                    out["r"] = wrk.run(u, connections=conns, seconds=secs, headers=h)

                sample, cpu = run.measure(srv, load)
                r = result["r"]
                rps, p50, p99 = loads[key]
                run.record(rps, label, sample, cpu, r.rps)
                p50.add(label, r.p50_ms)
                p99.add(label, r.p99_ms)
                rps.extra.setdefault("errors", {}).setdefault(label, []).append(r.errors)
                if r.errors:
                    print(f"  warning: {label} {rps.name}: {r.errors} errors", flush=True)


def _gc(b: Bench, engine) -> None:
    """``regproxy gc --dry-run --grace 0`` (reps times), then one real sweep, over a store
    written straight into its own bucket."""
    from tests.support.seaweed import ACCESS_KEY, SECRET_KEY

    from .sections import _regproxy_command, run_cli
    from .stores import build_gc_store_s3

    _regproxy_command("gc")
    s = b.sizes
    bucket = engine.create_bucket("bench-gc")
    built = build_gc_store_s3(
        engine.client(max_pool_connections=32), bucket, "registry", s.s3_gc_blobs,
        s.s3_gc_manifests, threads=16,
    )  # fmt: skip
    b.info["s3_gc_store"] = {
        "blobs": built.blobs,
        "manifests": built.manifests,
        "orphans": built.orphans,
        "unreferenced": built.unreferenced,
        "repositories": built.repositories,
        "build_s": round(built.seconds, 2),
    }
    root = b.fresh_dir("gc-config")
    root.mkdir(parents=True)
    secret = root / "s3-secret"
    secret.write_text(SECRET_KEY + "\n")
    config = root / "configuration.toml"
    config.write_text(
        "\n".join(
            [
                f'registry_storage = "s3://{bucket}/registry"',
                f'proxy_storage = "s3://{bucket}/proxy"',
                f"temporary_registry_storage = {json.dumps(str(root / 'tmp'))}",
                "[s3]",
                f"endpoint = {json.dumps(engine.endpoint)}",
                'region = "us-east-1"',
                f"access_key_id = {json.dumps(ACCESS_KEY)}",
                f"secret_access_key_file = {json.dumps(str(secret))}",
                "",
            ]
        )
    )
    what = f"{built.blobs:,} blobs / {built.manifests:,} manifests"
    dry = b.row(
        f"gc --dry-run --grace 0 (mark + plan) on S3, {what}",
        "s",
        higher_is_better=False,
        note="command's own time",
    )
    wall = b.row("gc --dry-run on S3: wall time (whole command)", "s", higher_is_better=False)
    memory = b.row("gc --dry-run on S3: peak RSS", "MiB", higher_is_better=False)
    real = b.row(
        f"gc --grace 0 on S3, sweeping {built.unreferenced:,} unreferenced blobs",
        "s",
        higher_is_better=False,
        note="one run",
    )
    # S3 times are whole seconds and gc counts anything within 1 s of its start as new
    time.sleep(2.1)
    try:
        for _rep in range(b.sizes.reps):
            report, seconds, rss = run_cli(["gc", "-c", str(config), "--dry-run", "--grace", "0"])
            removed = sum(st["blobs_removed"] for st in report["stores"])
            if removed != built.unreferenced:
                raise AssertionError(f"gc --dry-run: {removed} to remove, not {built.unreferenced}")
            dry.add(RP, report["seconds"])
            wall.add(RP, seconds)
            memory.add(RP, rss / MiB)
        report, seconds, rss = run_cli(["gc", "-c", str(config), "--grace", "0"])
        removed = sum(st["blobs_removed"] for st in report["stores"])
        if removed != built.unreferenced:
            raise AssertionError(f"gc removed {removed} blobs, not {built.unreferenced}")
        real.add(RP, report["seconds"])
        real.extra.update(wall_s=round(seconds, 3), peak_rss_mib=round(rss / MiB, 1))
    finally:
        shutil.rmtree(root, ignore_errors=True)
