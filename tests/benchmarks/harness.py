"""What every section shares: sizes, fresh server pairs, timed measurements, rows.

A measurement runs a callable against one server after ``sync()`` (so writeback of an
earlier run does not land in this one), with the server's peak RSS reset before and read
after, and its CPU time taken around it. Repetitions alternate which server goes first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .client import BlobSource, GiB, MiB, random_buffer
from .report import REF, RP, Row, Target
from .servers import Reference, Regproxy, Server, cpu_seconds, peak_rss, reset_peak_rss


@dataclass(frozen=True)
class Sizes:
    reps: int
    push: int
    chunk: int
    concurrent: int
    concurrent_size: int
    rss_probe: int
    pull: int
    readers: int
    range: int
    wrk_seconds: float
    connections: int
    tags: int
    image_total: int
    image_layers: int
    proxy_blob: int
    proxy_clients: int
    verify_total: int
    verify_blob: int
    gc_blobs: int
    gc_manifests: int
    #: the S3 section (issue 13): blob pushed and pulled, and the gc store's size
    s3_blob: int
    s3_gc_blobs: int
    s3_gc_manifests: int
    #: the HTTPS section (issue 16): concurrent readers' blob, docker-style chunked push
    https_concurrent_size: int
    https_chunked: int

    def buffer_size(self) -> int:
        return max(
            self.push,
            self.concurrent * self.concurrent_size,
            self.pull,
            self.proxy_blob,
            self.verify_blob,
            self.s3_blob,
        )


FULL = Sizes(
    reps=3,
    push=GiB,
    chunk=16 * MiB,
    concurrent=8,
    concurrent_size=128 * MiB,
    rss_probe=16 * MiB,
    pull=GiB,
    readers=8,
    range=512 * MiB,
    wrk_seconds=10,
    connections=64,
    tags=1000,
    image_total=200 * MiB,
    image_layers=5,
    proxy_blob=512 * MiB,
    proxy_clients=8,
    verify_total=2 * GiB,
    verify_blob=256 * MiB,
    gc_blobs=100_000,
    gc_manifests=10_000,
    s3_blob=256 * MiB,
    s3_gc_blobs=10_000,
    s3_gc_manifests=1_000,
    https_concurrent_size=256 * MiB,
    https_chunked=512 * MiB,
)

QUICK = Sizes(
    reps=1,
    push=8 * MiB,
    chunk=MiB,
    concurrent=8,
    concurrent_size=MiB,
    rss_probe=MiB,
    pull=8 * MiB,
    readers=8,
    range=4 * MiB,
    wrk_seconds=1,
    connections=64,
    tags=50,
    image_total=2 * MiB,
    image_layers=5,
    proxy_blob=8 * MiB,
    proxy_clients=8,
    verify_total=32 * MiB,
    verify_blob=8 * MiB,
    gc_blobs=2_000,
    gc_manifests=200,
    s3_blob=8 * MiB,
    s3_gc_blobs=400,
    s3_gc_manifests=40,
    https_concurrent_size=4 * MiB,
    https_chunked=4 * MiB,
)


@dataclass
class Sample:
    seconds: float
    rss: int | None
    cpu: float | None


class SectionSkipped(Exception):
    """A section cannot run here (a tool or command is missing); the message says why."""


@dataclass
class Bench:
    sizes: Sizes
    workdir: Path
    profile_dir: Path | None = None
    rows: list[Row] = field(default_factory=list)
    #: section -> server label -> highest peak RSS seen in a measurement
    rss: dict[str, dict[str, int]] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)
    section: str = ""
    _source: BlobSource | None = None
    _serial: int = 0

    @property
    def source(self) -> BlobSource:
        if self._source is None:
            self._source = BlobSource(random_buffer(self.sizes.buffer_size()))
        return self._source

    def row(
        self,
        name: str,
        unit: str,
        *,
        higher_is_better: bool = True,
        target: Target | None = None,
        baseline: str = "docker-registry 2.8.2",
        note: str = "",
    ) -> Row:
        row = Row(
            self.section,
            name,
            unit,
            higher_is_better,
            target=target,
            baseline=baseline,
            note=note,
        )
        self.rows.append(row)
        return row

    def fresh_dir(self, what: str) -> Path:
        self._serial += 1
        return self.workdir / f"{self.section}-{self._serial:03d}-{what}"

    @staticmethod
    def order(rep: int) -> tuple[str, str]:
        """Alternate which server goes first, so drift does not favour either."""
        return (REF, RP) if rep % 2 == 0 else (RP, REF)

    @contextlib.contextmanager
    def server(self, label: str, cls: type | None = None, **kwargs: object) -> Iterator[Server]:
        """A fresh server (empty storage unless ``cls`` keeps it elsewhere, as the S3 ones
        do), stopped and its work folder deleted afterwards."""
        workdir = self.fresh_dir(label)
        cls = cls or (Reference if label == REF else Regproxy)
        server: Server = cls(workdir, **kwargs)
        profiler = None
        try:
            server.start()
            if label == RP and self.profile_dir is not None:
                profiler = Profiler(server.pid, self.profile_dir / f"{workdir.name}.txt")
            yield server
        finally:
            if profiler is not None:
                profiler.stop()
            server.stop()
            shutil.rmtree(workdir, ignore_errors=True)

    @contextlib.contextmanager
    def pair(self) -> Iterator[dict[str, Server]]:
        with self.server(REF) as ref, self.server(RP) as rp:
            yield {REF: ref, RP: rp}

    def measure(self, server: Server, fn: Callable[[], object]) -> Sample:
        """Run ``fn`` against ``server``; a float it returns is its own, tighter timing."""
        os.sync()
        pid = server.pid
        reset_peak_rss(pid)
        cpu0 = cpu_seconds(pid)
        started = time.perf_counter()
        own = fn()
        seconds = own if isinstance(own, float) else time.perf_counter() - started
        cpu1 = cpu_seconds(pid)
        rss = peak_rss(pid)
        label = server.label
        if rss is not None:
            seen = self.rss.setdefault(self.section, {})
            seen[label] = max(seen.get(label, 0), rss)
        cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
        return Sample(seconds, rss, cpu)


def _py_spy() -> str:
    # the venv's bin folder is not on PATH when run as .venv/bin/python
    beside = Path(sys.executable).parent / "py-spy"
    py_spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if py_spy is None:
        raise SectionSkipped("--profile needs py-spy (pip install py-spy)")
    return py_spy


def profiled_python(out: Path, scratch: Path) -> str:
    """A stand-in for the Python interpreter that runs it under ``py-spy record`` (collapsed
    stacks to ``out``, written when the recorder gets SIGINT: `stop_profiler`). py-spy
    launching the server works where attaching to it does not (a VM whose kernel refuses
    to let py-spy read a process it did not start). The server's pid is py-spy's then."""
    out.parent.mkdir(parents=True, exist_ok=True)
    command = (
        f"{_py_spy()} record --rate 250 --format raw --nonblocking --threads "
        f"-o {out} -- {sys.executable}"
    )
    return python_wrapper(scratch / f"py-spy-{out.stem}.sh", command)


def python_wrapper(path: Path, command: str) -> str:
    """A shell script at `path` that runs `command` (the interpreter, with what goes
    before it) with the arguments it was given: a stand-in for the Python interpreter
    where a server is started (`RegproxyProcess(python=...)`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
    path.chmod(0o755)
    return str(path)


def stop_profiler(process: object) -> None:
    """SIGINT to a server started through `profiled_python`: py-spy writes its stacks."""
    proc = getattr(process, "proc", None)
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)


class Profiler:
    """``py-spy record`` attached to a regproxy process, collapsed stacks to ``out``."""

    def __init__(self, pid: int, out: Path) -> None:
        py_spy = _py_spy()
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.proc = subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
             "--nonblocking", "--threads", "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)  # let it attach

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
