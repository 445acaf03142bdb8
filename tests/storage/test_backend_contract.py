"""The `Backend` contract: every promise of `storage/backend.py`, on both backends.

Each test runs twice: on `FsBackend` over a folder, and on `S3Backend` over a fresh bucket
of the session's SeaweedFS (both opened by `stores.open_store`, as `serve` opens them). A
`Rig` holds the few things only a backend's own terms can say: how to leave an
interrupted write behind, what bookkeeping of its own it may leave, how coarse its clock
is (S3's Last-Modified has whole seconds), and a second instance of the same store
standing for another process or host.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from regproxy import splice_relay
from regproxy.config import S3Config, S3Location
from regproxy.storage import s3, stores
from regproxy.storage.backend import Backend
from regproxy.storage.fs import FsBackend
from regproxy.storage.layout import temp_name
from tests.support.s3store import s3_config
from tests.support.seaweed import SeaweedS3

MiB = 1024 * 1024
#: larger than `s3.SMALL_FILE`: touched through a marker on S3
LARGE = 100 * 1024

pytestmark = pytest.mark.timeout(60)


@dataclass
class Rig:
    """One backend under test, and what the tests need to say in its own terms."""

    kind: str
    backend: Backend
    root: Path
    #: temporary storage: where finished local files come from
    local: Path
    #: another instance on the same store: another process, or another host
    twin: Callable[[], Backend]
    #: a wait after which a new write or touch has a later mtime
    tick: float
    #: a wait after which a new leftover is clearly younger than an old one
    leftover_gap: float
    #: interrupted writes `sweep_leftovers` finds: make one now, count them
    leftover: Callable[[], None]
    leftovers: Callable[[], int]
    #: what the backend's own operations left behind besides the store's files
    residue: Callable[[], list[str]]
    #: a holder of the store lock (shared or exclusive) that died holding it
    dead_holder: Callable[[Path, bool], None]

    def path(self, relative: str) -> Path:
        return self.root / relative

    def source(self, data: bytes) -> Path:
        """A finished file in temporary storage."""
        self.local.mkdir(parents=True, exist_ok=True)
        path = self.local / uuid.uuid4().hex
        path.write_bytes(data)
        return path


def _fs_rig(tmp_path: Path) -> Rig:
    store = stores.open_store(tmp_path / "store", S3Config())
    root = store.root
    tmp = store.layout.tmp

    def leftover() -> None:
        temp_name(tmp).write_bytes(b"half a commit")

    def dead_holder(lock: Path, exclusive: bool) -> None:
        """A process that took the flock and was killed: the kernel lets go of it."""
        mode = "LOCK_EX" if exclusive else "LOCK_SH"
        code = (
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
            f"fcntl.flock(fd, fcntl.{mode})\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n"
        )
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "held"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)

    return Rig(
        kind="fs",
        backend=store.backend,
        root=root,
        local=tmp_path / "temporary",
        twin=lambda: FsBackend(tmp),
        tick=0.05,
        leftover_gap=0.6,
        leftover=leftover,
        leftovers=lambda: len(os.listdir(tmp)),
        residue=lambda: os.listdir(tmp),
        dead_holder=dead_holder,
    )


@dataclass
class S3Site:
    """What every S3 test shares (a boto3 client takes a few tenths of a second to build):
    the `[s3]` settings, whose client `stores` keeps, and a second client standing for
    another process, which tests never patch."""

    settings: S3Config
    other: Any


@pytest.fixture(scope="module")
def s3_site(seaweed: SeaweedS3, tmp_path_factory: pytest.TempPathFactory) -> S3Site:
    settings = s3_config(seaweed, "unused", tmp_path_factory.mktemp("site")).s3
    return S3Site(settings, seaweed.client(max_pool_connections=32))


def _s3_rig(site: S3Site, tmp_path: Path) -> Rig:
    """A store on a fresh bucket, opened by `stores.open_store` as `serve` opens one."""
    bucket = f"t-{uuid.uuid4().hex[:20]}"
    client = site.other
    client.create_bucket(Bucket=bucket)
    store = stores.open_store(S3Location(bucket, "registry"), site.settings)
    backend = store.backend
    assert isinstance(backend, s3.S3Backend)
    prefix = f"{backend.prefix}/"

    def keys() -> set[str]:
        found: set[str] = set()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found |= {item["Key"] for item in page.get("Contents", [])}
        return found

    def uploads() -> list[dict[str, Any]]:
        answer = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
        return list(answer.get("Uploads", []))

    def leftover() -> None:
        key = f"{prefix}blobs/sha256/00/{uuid.uuid4().hex}"
        client.create_multipart_upload(Bucket=bucket, Key=key)

    def residue() -> list[str]:
        """Touch markers of files that are gone, lock objects, unfinished uploads."""
        present = keys()
        touched = f"{prefix}{s3.TOUCHED}/"
        orphans = [
            k
            for k in present
            if k.startswith(touched) and f"{prefix}{k[len(touched) :]}" not in present
        ]
        locks = [k for k in present if k.startswith(f"{prefix}lock.d/")]
        return sorted(orphans + locks) + [u["Key"] for u in uploads()]

    def dead_holder(lock: Path, exclusive: bool) -> None:
        """A process that wrote its lease or shared marker and was killed."""
        lease = s3.LeaseLock(backend, backend.key(lock))
        if exclusive:
            lease._take(uuid.uuid4().hex)  # never renewed, never released
        else:
            client.put_object(Bucket=bucket, Key=f"{lease.folder}/shared/dead", Body=b"")

    return Rig(
        kind="s3",
        backend=backend,
        root=store.root,
        local=tmp_path / "temporary",
        twin=lambda: s3.S3Backend(client, bucket, backend.prefix, PurePosixPath(store.root)),
        tick=1.1,
        leftover_gap=2.2,  # an upload's Initiated time has whole seconds
        leftover=leftover,
        leftovers=lambda: len(uploads()),
        residue=residue,
        dead_holder=dead_holder,
    )


@pytest.fixture(params=["fs", "s3"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Rig:
    if request.param == "fs":
        return _fs_rig(tmp_path)
    return _s3_rig(request.getfixturevalue("s3_site"), tmp_path)


def _read_all(rig: Rig, path: Path, start: int = 0, end: int | None = None) -> bytes:
    stream = rig.backend.open_read(path, start, end)
    try:
        return stream.read()
    finally:
        stream.close()


# ---- whole small files --------------------------------------------------------------------


def test_prepare_makes_folders_usable_and_is_idempotent(rig: Rig) -> None:
    folders = [rig.path("blobs"), rig.path("repositories"), rig.path("tmp")]
    rig.backend.prepare(folders)
    rig.backend.prepare(folders)
    assert rig.backend.names(rig.path("blobs")) == []
    assert list(rig.backend.files(rig.path("repositories"))) == []
    rig.backend.write_atomic(rig.path("blobs/sha256/ab/x"), b"x")
    assert rig.backend.names(rig.path("blobs")) == ["sha256"]


def test_read_and_write_atomic(rig: Rig) -> None:
    path = rig.path("repositories/app/_tags/v1")
    assert rig.backend.read(path) is None
    rig.backend.write_atomic(path, b"first")  # folders above it come with it
    assert rig.backend.read(path) == b"first"
    rig.backend.write_atomic(path, b"second, longer")
    assert rig.backend.read(path) == b"second, longer"
    big = os.urandom(3 * LARGE)
    rig.backend.write_atomic(path, big)
    assert rig.backend.read(path) == big
    rig.backend.write_atomic(path, b"")
    assert rig.backend.read(path) == b""
    assert rig.residue() == []


def test_readers_never_see_a_partial_write(rig: Rig) -> None:
    path = rig.path("repositories/app/_tags/v1")
    versions = [bytes([n]) * (2 * LARGE) for n in (1, 2)]
    rig.backend.write_atomic(path, versions[0])
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            rig.backend.write_atomic(path, versions[n % 2])

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(writer)
        try:
            seen = [rig.backend.read(path) for _ in range(40)]
        finally:
            stop.set()
        running.result()
    assert all(data in versions for data in seen)


def test_create_is_put_if_absent(rig: Rig) -> None:
    path = rig.path("blobs/sha256/ab/abc")
    assert rig.backend.create(path, b"one") is True
    assert rig.backend.create(path, b"two") is False
    assert rig.backend.read(path) == b"one"


def test_create_race_has_exactly_one_winner(rig: Rig) -> None:
    path = rig.path("blobs/sha256/cd/cdef")
    start = threading.Barrier(16)

    def create(n: int) -> bool:
        start.wait()
        return rig.backend.create(path, b"writer %d" % n)

    with ThreadPoolExecutor(16) as pool:
        won = list(pool.map(create, range(16)))
    assert won.count(True) == 1
    assert rig.backend.read(path) == b"writer %d" % won.index(True)
    assert rig.residue() == []


def test_ensure_makes_an_empty_marker_once(rig: Rig) -> None:
    path = rig.path("repositories/app/_layers/sha256/ab")
    rig.backend.ensure(path)
    assert rig.backend.read(path) == b""
    rig.backend.write_atomic(path, b"kept")
    rig.backend.ensure(path)  # present: left alone
    assert rig.backend.read(path) == b"kept"


# ---- metadata -----------------------------------------------------------------------------


def test_exists_size_version_mtime(rig: Rig) -> None:
    path = rig.path("repositories/app/_manifests/sha256/ab")
    assert not rig.backend.exists(path)
    assert rig.backend.size(path) is None
    assert rig.backend.version(path) is None
    assert rig.backend.mtime(path) is None
    before = time.time()
    rig.backend.write_atomic(path, b"12345")
    assert rig.backend.exists(path)
    assert rig.backend.size(path) == 5
    first = rig.backend.version(path)
    assert first is not None
    mtime = rig.backend.mtime(path)
    assert mtime is not None and before - rig.tick <= mtime <= time.time() + 1
    rig.backend.write_atomic(path, b"other content")
    assert rig.backend.version(path) not in (None, first)
    assert rig.backend.size(path) == len(b"other content")


def test_folders_are_not_files(rig: Rig) -> None:
    """A folder exists only through the files below it: no size, time, bytes or removal
    (on an object store it is nothing but a shared key prefix)."""
    rig.backend.write_atomic(rig.path("repositories/app/_tags/v1"), b"x")
    folder = rig.path("repositories/app")
    assert not rig.backend.exists(folder)
    assert rig.backend.size(folder) is None
    assert rig.backend.mtime(folder) is None
    assert rig.backend.read(folder) is None
    assert rig.backend.remove(folder) is False
    with pytest.raises(FileNotFoundError):
        _read_all(rig, folder)
    assert rig.backend.read(rig.path("repositories/app/_tags/v1")) == b"x"


def test_remove(rig: Rig) -> None:
    small, large = rig.path("repositories/app/_tags/v1"), rig.path("blobs/sha256/ab/ab1")
    rig.backend.write_atomic(small, b"x")
    rig.backend.write_atomic(large, os.urandom(LARGE))
    rig.backend.touch(large)
    assert rig.backend.remove(small) is True
    assert rig.backend.remove(large) is True
    assert rig.backend.remove(small) is False
    assert rig.backend.remove(rig.path("never/was")) is False
    assert not rig.backend.exists(small) and not rig.backend.exists(large)
    assert list(rig.backend.files(rig.root / "blobs")) == []
    assert rig.residue() == []  # a large file's touch marker goes with it


# ---- listings -----------------------------------------------------------------------------


def _fill(rig: Rig, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        rig.backend.write_atomic(rig.path(relative), data)


def test_names_lists_files_and_folders_without_dot_names(rig: Rig) -> None:
    _fill(
        rig,
        {
            "repositories/app/_tags/v1": b"a",
            "repositories/app/_tags/v2": b"b",
            "repositories/app/_tags/.hidden": b"c",
            "repositories/app/_manifests/sha256/ab": b"d",
            "repositories/app/.dotfolder/x": b"e",
            "repositories/app/_pulled": b"",
        },
    )
    app = rig.path("repositories/app")
    assert sorted(rig.backend.names(app)) == ["_manifests", "_pulled", "_tags"]
    assert sorted(rig.backend.names(app / "_tags")) == ["v1", "v2"]
    assert rig.backend.names(rig.path("repositories/none")) == []
    assert rig.backend.names(app / "_pulled") == []  # a file has no entries


def test_files_walks_every_depth(rig: Rig) -> None:
    files = {
        "blobs/sha256/ab/ab1": os.urandom(10),
        "blobs/sha256/ab/ab2": b"",
        "blobs/sha256/cd/cd1": os.urandom(LARGE),
        "blobs/sha512/ef/ef1": os.urandom(3),
        "blobs/stray": b"s",
        "blobs/sha256/ab/.tmp-x": b"t",
        "blobs/.hidden/sha256/x": b"h",
    }
    before = time.time()
    _fill(rig, files)
    found = {e.name: e for e in rig.backend.files(rig.path("blobs"))}
    visible = {k.removeprefix("blobs/"): v for k, v in files.items() if "/." not in k}
    assert {name: e.size for name, e in found.items()} == {k: len(v) for k, v in visible.items()}
    for entry in found.values():
        assert before - rig.tick <= entry.mtime <= time.time() + 1
        assert entry.mtime == rig.backend.mtime(rig.path(f"blobs/{entry.name}"))
    assert {e.name for e in rig.backend.files(rig.path("blobs/sha256/ab"))} == {"ab1", "ab2"}
    assert list(rig.backend.files(rig.path("nothing/here"))) == []
    everything = {e.name for e in rig.backend.files(rig.root)}
    assert {f"blobs/{name}" for name in visible} <= everything


def test_listings_go_past_one_page(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "LIST_PAGE", 2)  # S3 answers listings two keys at a time
    names = [f"v{n}" for n in range(7)]
    _fill(rig, {f"repositories/app/_tags/{n}": n.encode() for n in names})
    _fill(rig, {f"repositories/app/_layers/sha256/{n}": b"" for n in names[:3]})
    app = rig.path("repositories/app")
    assert sorted(rig.backend.names(app / "_tags")) == names
    assert sorted(rig.backend.names(app)) == ["_layers", "_tags"]
    assert len(list(rig.backend.files(app))) == 10
    for _ in range(5):
        rig.leftover()
    assert rig.backend.sweep_leftovers(rig.root / "tmp", 0, time.time() + 10, True) == 5


# ---- large files --------------------------------------------------------------------------


def test_move_into_deletes_the_local_file(rig: Rig) -> None:
    data = os.urandom(LARGE)
    src = rig.source(data)
    dst = rig.path("blobs/sha256/ab/moved")
    rig.backend.move_into(src, dst)
    assert not src.exists()
    assert rig.backend.read(dst) == data
    again = rig.source(data)  # content-addressed: the same bytes a second time
    rig.backend.move_into(again, dst)
    assert not again.exists() and rig.backend.read(dst) == data
    assert rig.residue() == []


def test_move_into_a_big_file_goes_in_parts(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond `SINGLE_PUT_MAX` a multipart upload; no part under S3's 5 MiB but the last,
    even when `PART_SIZE` asks for less."""
    monkeypatch.setattr(s3, "SINGLE_PUT_MAX", 1 * MiB)
    monkeypatch.setattr(s3, "PART_SIZE", 1 * MiB)
    sizes: list[int] = []
    if isinstance(rig.backend, s3.S3Backend):
        send = rig.backend.client.upload_part

        def counted(**kwargs: Any) -> Any:
            sizes.append(len(kwargs["Body"]))
            return send(**kwargs)

        monkeypatch.setattr(rig.backend.client, "upload_part", counted)
    data = os.urandom(11 * MiB + 123)
    src = rig.source(data)
    dst = rig.path("blobs/sha256/ef/big")
    rig.backend.move_into(src, dst)
    assert not src.exists()
    assert rig.backend.size(dst) == len(data)
    assert hashlib.sha256(_read_all(rig, dst)).digest() == hashlib.sha256(data).digest()
    if isinstance(rig.backend, s3.S3Backend):
        assert sorted(sizes, reverse=True) == [5 * MiB, 5 * MiB, 1 * MiB + 123]
    assert rig.residue() == []


def test_upload_keeps_the_source_and_creates_once(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3, "SINGLE_PUT_MAX", 1 * MiB)
    for size in (LARGE, 6 * MiB):  # one PUT; in parts
        dst = rig.path(f"blobs/sha256/ab/up{size}")
        first, second = rig.source(os.urandom(size)), rig.source(os.urandom(size))
        assert rig.backend.upload(first, dst) is True
        assert first.exists()
        assert rig.backend.upload(second, dst) is False
        assert second.exists()
        assert _read_all(rig, dst) == first.read_bytes()
    assert rig.residue() == []  # a refused multipart upload is aborted, not left open


def test_move_within_the_store(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "COPY_MAX", 5 * MiB)  # a 6 MiB object is copied in parts
    monkeypatch.setattr(s3, "PART_SIZE", 5 * MiB)
    for data in (b"small", os.urandom(LARGE), os.urandom(6 * MiB)):
        src = rig.path(f"blobs/sha256/ab/{len(data)}")
        dst = rig.path(f"quarantine/sha256/{len(data)}")
        rig.backend.write_atomic(src, data)
        rig.backend.touch(src)
        rig.backend.move(src, dst)
        assert not rig.backend.exists(src)
        assert _read_all(rig, dst) == data
    assert rig.residue() == []  # touch markers move along


def test_open_read_whole_and_ranged(rig: Rig) -> None:
    data = os.urandom(LARGE)
    path = rig.path("blobs/sha256/ab/read")
    rig.backend.write_atomic(path, data)
    assert _read_all(rig, path) == data
    assert _read_all(rig, path, 10) == data[10:]
    assert _read_all(rig, path, 10, 20) == data[10:20]
    assert _read_all(rig, path, 0, 1) == data[:1]
    assert _read_all(rig, path, LARGE - 5, LARGE + 100) == data[-5:]
    assert _read_all(rig, path, 7, 7) == b""
    assert _read_all(rig, path, LARGE + 10, LARGE + 20) == b""
    stream = rig.backend.open_read(path, 100)
    try:  # read in pieces, as the server relays a blob
        pieces = iter(lambda: stream.read(4096), b"")
        assert b"".join(pieces) == data[100:]
    finally:
        stream.close()
    for start, end in ((0, None), (5, 10), (3, 3)):
        with pytest.raises(FileNotFoundError):
            rig.backend.open_read(rig.path("blobs/sha256/ab/none"), start, end)


def test_local_path_or_presigned_url(rig: Rig) -> None:
    """A file is reachable without relaying it: on local disk (sendfile), else by URL."""
    data = os.urandom(1000)
    path = rig.path("blobs/sha256/ab/served")
    rig.backend.write_atomic(path, data)
    local = rig.backend.local_path(path)
    url = rig.backend.presign(path, 60)
    if rig.backend.local:
        assert local is not None and local.read_bytes() == data
        assert url is None
    else:
        assert local is None and url is not None
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert answer.read() == data


def test_plain_http_url_serves_a_socket_of_our_own(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a splice relay fetches itself: a plain-HTTP URL needing no proxy (None on
    disk, and when a proxy would be in the way), whose ranged answer is the file's bytes."""
    data = os.urandom(3000)
    path = rig.path("blobs/sha256/ab/plain")
    rig.backend.write_atomic(path, data)
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    url = rig.backend.plain_http_url(path, 60)
    if rig.backend.local:
        assert url is None
        return
    assert url is not None and url.startswith("http://")
    source = splice_relay.open_source(url, 5, 2005, 5.0, 5.0)
    got = b""
    try:
        while len(got) < 2000 and (more := source.read(4096)):
            got += more
    finally:
        source.close()
    assert got == data[5:2005]
    host = urllib.parse.urlsplit(url).hostname or ""
    for name in ("HTTP_PROXY", "http_proxy"):  # a proxy for everything: not by ourselves
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    assert rig.backend.plain_http_url(path, 60) is None
    for name in ("NO_PROXY", "no_proxy"):  # unless the endpoint bypasses it
        monkeypatch.setenv(name, host)
    assert rig.backend.plain_http_url(path, 60) is not None


# ---- clocks and clean-up ------------------------------------------------------------------


def test_prune_removes_empty_folders_up_to_stop(rig: Rig) -> None:
    _fill(rig, {"repositories/app/_referrers/sha256/ab/x": b"", "repositories/app/keep": b""})
    _fill(rig, {"repositories/app/_layers/sha256/ab": b"", "repositories/app/_layers/other": b""})
    rig.backend.remove(rig.path("repositories/app/_referrers/sha256/ab/x"))
    rig.backend.prune(rig.path("repositories/app/_referrers/sha256/ab"), rig.path("repositories"))
    assert sorted(rig.backend.names(rig.path("repositories/app"))) == ["_layers", "keep"]
    rig.backend.remove(rig.path("repositories/app/_layers/sha256/ab"))
    rig.backend.prune(rig.path("repositories/app/_layers/sha256"), rig.path("repositories"))
    assert rig.backend.names(rig.path("repositories/app/_layers")) == ["other"]
    assert rig.backend.names(rig.path("repositories")) == ["app"]


def test_touch_moves_the_clock_forward(rig: Rig) -> None:
    small, large = rig.path("repositories/app/_tags/v1"), rig.path("blobs/sha256/ab/big")
    rig.backend.write_atomic(small, b"sha256:abc")
    rig.backend.write_atomic(large, os.urandom(LARGE))
    written = {p: rig.backend.mtime(p) for p in (small, large)}
    time.sleep(rig.tick)
    touched_at = time.time()
    rig.backend.touch(small)
    rig.backend.touch(large)
    for path, before in written.items():
        after = rig.backend.mtime(path)
        assert before is not None and after is not None
        assert after > before and after >= touched_at - 1
    assert rig.backend.read(small) == b"sha256:abc"
    listed = {e.name: e.mtime for e in rig.backend.files(rig.root)}
    assert listed["repositories/app/_tags/v1"] == rig.backend.mtime(small)
    assert listed["blobs/sha256/ab/big"] == rig.backend.mtime(large)
    rig.backend.touch(rig.path("blobs/sha256/ab/none"))  # nothing there: nothing made
    assert not rig.backend.exists(rig.path("blobs/sha256/ab/none"))


def test_sweep_leftovers_takes_the_old_and_keeps_the_young(rig: Rig) -> None:
    """An interrupted write (a temp file; an unfinished multipart upload) older than the
    age goes; a younger one may belong to a write in progress. A dry run only counts."""
    tmp = rig.root / "tmp"
    gap = rig.leftover_gap
    rig.leftover()
    time.sleep(gap)
    rig.leftover()
    now, age = time.time(), 0.7 * gap
    assert rig.backend.sweep_leftovers(tmp, age, now, dry_run=True) == 1
    assert rig.leftovers() == 2
    assert rig.backend.sweep_leftovers(tmp, age, now, dry_run=False) == 1
    assert rig.leftovers() == 1
    assert rig.backend.sweep_leftovers(tmp, age, now + gap, dry_run=False) == 1
    assert rig.leftovers() == 0


# ---- the store lock -----------------------------------------------------------------------


class Holders:
    """Who holds the lock right now; records every overlap of an exclusive holder."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.shared = 0
        self.exclusive = 0
        self.overlaps: list[str] = []
        self.entries = {"shared": 0, "exclusive": 0}

    @contextmanager
    def inside(self, exclusive: bool) -> Iterator[None]:
        with self.lock:
            if self.exclusive or (exclusive and self.shared):
                self.overlaps.append(f"{self.shared} shared, {self.exclusive} exclusive")
            if exclusive:
                self.exclusive += 1
            else:
                self.shared += 1
            self.entries["exclusive" if exclusive else "shared"] += 1
        try:
            yield
        finally:
            with self.lock:
                if exclusive:
                    self.exclusive -= 1
                else:
                    self.shared -= 1


def _lock(backend: Backend, rig: Rig, exclusive: bool) -> AbstractContextManager[None]:
    lock = rig.root / "lock"
    return backend.exclusive_lock(lock) if exclusive else backend.shared_lock(lock)


def test_shared_and_exclusive_never_overlap(rig: Rig) -> None:
    """Commits (shared) and sweeps (exclusive) from threads of two processes at once."""
    backends = [rig.backend, rig.twin()]
    holders = Holders()

    def work(n: int, exclusive: bool, rounds: int) -> None:
        for _ in range(rounds):
            with _lock(backends[n % 2], rig, exclusive), holders.inside(exclusive):
                time.sleep(0.02)

    jobs = [(n, False, 6) for n in range(4)] + [(n, True, 2) for n in range(2)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        for done in [pool.submit(work, *job) for job in jobs]:
            done.result()
    assert holders.overlaps == []
    assert holders.entries == {"shared": 24, "exclusive": 4}
    assert rig.residue() == []


def _acquire_in_thread(
    backend: Backend, rig: Rig, exclusive: bool, release: threading.Event
) -> tuple[threading.Event, threading.Thread]:
    acquired = threading.Event()

    def hold() -> None:
        with _lock(backend, rig, exclusive):
            acquired.set()
            release.wait(30)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    return acquired, thread


@pytest.mark.parametrize("held_exclusive", [False, True], ids=["shared-held", "exclusive-held"])
def test_a_holder_makes_the_other_kind_wait(rig: Rig, held_exclusive: bool) -> None:
    """An exclusive waits for a shared holder (a commit in progress), and a shared waits
    while the exclusive is held (a sweep); each from another process."""
    release = threading.Event()
    with _lock(rig.backend, rig, held_exclusive):
        acquired, thread = _acquire_in_thread(rig.twin(), rig, not held_exclusive, release)
        assert not acquired.wait(0.4)
    assert acquired.wait(10)
    release.set()
    thread.join(10)
    assert rig.residue() == []


@pytest.mark.parametrize("dead_exclusive", [False, True], ids=["dead-shared", "dead-exclusive"])
def test_a_dead_holder_is_outlived(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, dead_exclusive: bool
) -> None:
    """A holder that died holding the lock does not hold it forever: the kernel drops a
    flock; on S3 an expired lease is taken over and a stale shared marker ignored."""
    monkeypatch.setattr(s3, "LEASE_SECONDS", 1.5)
    monkeypatch.setattr(s3, "SHARED_STALE", 1.5)
    rig.dead_holder(rig.root / "lock", dead_exclusive)
    began = time.monotonic()
    for exclusive in (True, False):
        release = threading.Event()
        release.set()
        acquired, thread = _acquire_in_thread(rig.twin(), rig, exclusive, release)
        assert acquired.wait(10)
        thread.join(10)
    if not rig.backend.local:
        assert time.monotonic() - began >= 0.3  # the lease or marker counted while fresh
    assert rig.residue() == []  # the dead one's lease or marker is cleared away


def test_a_stalled_holder_does_not_free_its_successor(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder whose lease expired under it (renewals lost, a process paused) and was
    taken over must not, on leaving, free the lock of the one that took over."""
    if rig.backend.local:
        pytest.skip("a live process never loses its flock: there is no lease to expire")
    assert isinstance(rig.backend, s3.S3Backend)
    monkeypatch.setattr(s3, "LEASE_SECONDS", 1.0)
    stalled = rig.backend
    put = stalled.client.put_object

    def lost_renewals(**kwargs: Any) -> Any:
        if kwargs["Key"].endswith("/exclusive") and "IfMatch" in kwargs:
            raise TimeoutError("renewal lost")
        return put(**kwargs)

    monkeypatch.setattr(stalled.client, "put_object", lost_renewals)
    release_b, release_c = threading.Event(), threading.Event()
    with _lock(stalled, rig, True):
        time.sleep(1.2)  # the lease expires while its holder still works
        b_in, b = _acquire_in_thread(rig.twin(), rig, True, release_b)
        assert b_in.wait(10)
    c_in, c = _acquire_in_thread(rig.twin(), rig, True, release_c)
    assert not c_in.wait(0.5), "the stalled holder freed its successor's lease"
    release_b.set()
    b.join(10)
    assert c_in.wait(10)
    release_c.set()
    c.join(10)
    assert rig.residue() == []
