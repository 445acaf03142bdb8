"""`storage.fs.DirectWriter` and `Uploads.appender`: blocks written at increasing offsets,
past the page cache (`O_DIRECT`) when offset and length are page multiples, normally
otherwise; the file always ends up as the concatenation of the blocks."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from regproxy.digest import Digest
from regproxy.storage import fs
from regproxy.storage import uploads as uploads_mod
from regproxy.storage.fs import DIRECT_ALIGN, DirectWriter
from regproxy.storage.store import Store
from regproxy.storage.uploads import Uploads

MIB = 1024 * 1024


@pytest.fixture(params=["disk", "tmpfs"])
def folder(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """The test's temp folder, and a folder in /dev/shm (tmpfs: O_DIRECT rules differ)."""
    if request.param == "disk":
        yield tmp_path
        return
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = Path(tempfile.mkdtemp(prefix="regproxy-direct-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def direct_writer_or_skip(path: Path, offset: int = 0, **kwargs: int) -> DirectWriter:
    """A writer with its O_DIRECT descriptor open, or skip: tmpfs before Linux 6.6 has none."""
    writer = DirectWriter(path, offset, **kwargs)
    if writer._direct < 0:
        writer.close()
        pytest.skip("this filesystem cannot open files with O_DIRECT")
    return writer


def aligned_block(data: bytes) -> memoryview:
    """`data` in page-aligned memory, as `sockbody.pump` hands blocks over."""
    buffer = mmap.mmap(-1, max(len(data), 1))
    buffer[: len(data)] = data
    return memoryview(buffer)[: len(data)]


def write_all(path: Path, offset: int, blocks: list[memoryview | bytes]) -> int:
    writer = DirectWriter(path, offset)
    try:
        for block in blocks:
            offset = writer.write(block)  # type: ignore[arg-type]
            assert writer.offset == offset
    finally:
        writer.close()
    return offset


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_aligned_mib_blocks_from_one_reused_buffer(folder: Path) -> None:
    """Like the pump: one mmap'd buffer refilled per block; each block lands in place."""
    path = folder / "data"
    path.touch()
    buffer = mmap.mmap(-1, MIB)
    view = memoryview(buffer)
    blocks = [os.urandom(MIB) for _ in range(4)]
    writer = DirectWriter(path, 0)
    try:
        for i, block in enumerate(blocks):
            view[:] = block
            assert writer.write(view) == (i + 1) * MIB
    finally:
        writer.close()
        view.release()
        buffer.close()
    assert path.read_bytes() == b"".join(blocks)


def test_unaligned_first_block_then_aligned_ones(folder: Path) -> None:
    """A session already holding 1000 bytes: the first block brings it to 1 MiB."""
    path = folder / "data"
    start = os.urandom(1000)
    path.write_bytes(start)
    blocks = [os.urandom(MIB - 1000), os.urandom(MIB), os.urandom(MIB)]
    end = write_all(path, 1000, [aligned_block(b) for b in blocks])
    assert end == 1000 + sum(len(b) for b in blocks)
    assert path.read_bytes() == start + b"".join(blocks)


def test_aligned_blocks_from_an_unaligned_offset(folder: Path) -> None:
    """Page-multiple lengths at an odd offset cannot go direct: written normally."""
    path = folder / "data"
    path.write_bytes(b"x" * 37)
    blocks = [os.urandom(2 * DIRECT_ALIGN), os.urandom(DIRECT_ALIGN)]
    assert write_all(path, 37, [aligned_block(b) for b in blocks]) == 37 + 3 * DIRECT_ALIGN
    assert path.read_bytes() == b"x" * 37 + b"".join(blocks)


def test_odd_sized_tail(folder: Path) -> None:
    path = folder / "data"
    path.touch()
    blocks = [os.urandom(MIB), os.urandom(MIB), os.urandom(12345), os.urandom(1)]
    assert write_all(path, 0, [aligned_block(b) for b in blocks]) == 2 * MIB + 12346
    assert path.read_bytes() == b"".join(blocks)


def test_bytes_blocks_in_unaligned_memory(folder: Path) -> None:
    """`bytes` objects are not page-aligned: O_DIRECT may refuse them (EINVAL); the
    bytes must be written all the same, and blocks after them too."""
    path = folder / "data"
    path.touch()
    blocks = [os.urandom(MIB), os.urandom(MIB), os.urandom(DIRECT_ALIGN), os.urandom(999)]
    mixed: list[memoryview | bytes] = [
        blocks[0],
        memoryview(blocks[1]),
        aligned_block(blocks[2]),
        blocks[3],
    ]
    assert write_all(path, 0, mixed) == sum(len(b) for b in blocks)
    assert path.read_bytes() == b"".join(blocks)


def test_a_view_into_the_middle_of_a_buffer(folder: Path) -> None:
    """A block that starts 100 bytes into a page: unaligned memory, aligned length."""
    path = folder / "data"
    path.touch()
    data = os.urandom(100 + 2 * DIRECT_ALIGN)
    buffer = aligned_block(data)
    assert write_all(path, 0, [buffer[100:]]) == 2 * DIRECT_ALIGN
    assert path.read_bytes() == data[100:]


def test_rewrites_from_the_given_offset(folder: Path) -> None:
    """The writer writes at `offset`, not at the end of the file (a rewound session)."""
    path = folder / "data"
    path.write_bytes(b"a" * (3 * DIRECT_ALIGN))
    block = os.urandom(DIRECT_ALIGN)
    write_all(path, DIRECT_ALIGN, [aligned_block(block)])
    assert path.read_bytes() == b"a" * DIRECT_ALIGN + block + b"a" * DIRECT_ALIGN


def test_the_result_is_readable_at_once_and_survives_fsync(folder: Path) -> None:
    """Direct and buffered writes to one file stay coherent for readers and for fsync."""
    path = folder / "data"
    path.touch()
    blocks = [os.urandom(5000), os.urandom(MIB - 5000), os.urandom(MIB), os.urandom(77)]
    writer = DirectWriter(path, 0)
    try:
        for i, block in enumerate(blocks):
            writer.write(aligned_block(block))
            assert path.read_bytes() == b"".join(blocks[: i + 1])
    finally:
        writer.close()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(b"".join(blocks)).digest()


def test_close_releases_both_descriptors(folder: Path) -> None:
    path = folder / "data"
    path.touch()
    before = open_fds()
    writer = DirectWriter(path, 0)
    writer.write(aligned_block(os.urandom(DIRECT_ALIGN)))
    writer.close()
    assert open_fds() == before
    writer.close()  # a second close is harmless
    assert open_fds() == before


# ---- which path a block takes --------------------------------------------------------------


class PwriteSpy:
    """Records the descriptor of every `os.pwrite`; can refuse direct writes with EINVAL."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, refuse: set[int] | None = None) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.refuse = refuse if refuse is not None else set()
        self.real = os.pwrite
        monkeypatch.setattr(fs.os, "pwrite", self)

    def __call__(self, fd: int, data: memoryview, offset: int) -> int:
        self.calls.append((fd, len(data), offset))
        if fd in self.refuse:
            raise OSError(errno.EINVAL, "Invalid argument")
        return self.real(fd, data, offset)


def test_aligned_blocks_go_direct_and_others_do_not(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = folder / "data"
    path.write_bytes(b"h" * 100)
    spy = PwriteSpy(monkeypatch)
    writer = direct_writer_or_skip(path, 100)
    direct, normal = writer._direct, writer._fd
    blocks = [
        os.urandom(DIRECT_ALIGN - 100),  # brings the offset to a page boundary
        os.urandom(MIB),
        os.urandom(2 * DIRECT_ALIGN),
        os.urandom(10),  # odd tail
    ]
    try:
        for block in blocks:
            writer.write(aligned_block(block))
    finally:
        writer.close()
    assert [fd for fd, _n, _at in spy.calls] == [normal, direct, direct, normal]
    offsets = [100, DIRECT_ALIGN, DIRECT_ALIGN + MIB, 3 * DIRECT_ALIGN + MIB]
    assert [at for _fd, _n, at in spy.calls] == offsets
    assert path.read_bytes() == b"h" * 100 + b"".join(blocks)


@pytest.mark.parametrize("direct_from", [2 * MIB, 2 * MIB + 100])
def test_bytes_before_direct_from_are_written_normally(
    folder: Path, monkeypatch: pytest.MonkeyPatch, direct_from: int
) -> None:
    """The first `direct_from` bytes stay in the page cache; aligned blocks that start at
    or past it go direct."""
    path = folder / "data"
    path.touch()
    spy = PwriteSpy(monkeypatch)
    writer = direct_writer_or_skip(path, 0, direct_from=direct_from)
    direct, normal = writer._direct, writer._fd
    blocks = [os.urandom(MIB) for _ in range(5)]
    try:
        for block in blocks:
            writer.write(aligned_block(block))
    finally:
        writer.close()
    fds = [fd for fd, _n, _at in spy.calls]
    offsets = [at for _fd, _n, at in spy.calls]
    assert offsets == [i * MIB for i in range(5)]
    assert fds == [normal if at < direct_from else direct for at in offsets]
    assert path.read_bytes() == b"".join(blocks)


def test_einval_from_o_direct_falls_back_to_normal_writes(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = folder / "data"
    path.touch()
    writer = direct_writer_or_skip(path)
    spy = PwriteSpy(monkeypatch, refuse={writer._direct})
    normal = writer._fd
    blocks = [os.urandom(MIB), os.urandom(MIB), os.urandom(DIRECT_ALIGN)]
    try:
        for block in blocks:
            writer.write(aligned_block(block))
        assert writer._direct == -1, "a refused O_DIRECT is not tried again"
    finally:
        writer.close()
    assert path.read_bytes() == b"".join(blocks)
    # one refused direct try, then every block (the refused one too) written normally
    assert [fd for fd, _n, _at in spy.calls][1:] == [normal] * 3


def test_other_errors_from_o_direct_are_raised(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = folder / "data"
    path.touch()
    writer = direct_writer_or_skip(path)

    def full(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs.os, "pwrite", full)
    try:
        with pytest.raises(OSError) as caught:
            writer.write(aligned_block(os.urandom(DIRECT_ALIGN)))
        assert caught.value.errno == errno.ENOSPC
        assert writer.offset == 0
    finally:
        writer.close()


def test_short_direct_writes_are_completed(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A direct write that wrote only part of a block: the rest is written normally."""
    path = folder / "data"
    path.touch()
    writer = direct_writer_or_skip(path)
    direct = writer._direct
    real = os.pwrite

    def short(fd: int, data: memoryview, offset: int) -> int:
        if fd == direct:
            return real(fd, data[:DIRECT_ALIGN], offset)
        return real(fd, data[:1000], offset)  # short normal writes too

    monkeypatch.setattr(fs.os, "pwrite", short)
    block = os.urandom(4 * DIRECT_ALIGN)
    try:
        assert writer.write(aligned_block(block)) == len(block)
    finally:
        writer.close()
    assert path.read_bytes() == block


# ---- Uploads.appender ----------------------------------------------------------------------


def test_appender_updates_the_session_offset(folder: Path) -> None:
    uploads = Uploads(folder / "tmp")
    session = uploads.create("team/app")
    head = os.urandom(1234)
    uploads.append(session, [head])  # what aiohttp buffered, written the usual way
    assert session.offset == 1234
    blocks = [os.urandom(MIB - 1234), os.urandom(MIB), os.urandom(4321)]
    before = open_fds()
    with uploads.appender(session) as append:
        offsets = []
        for block in blocks:
            view = aligned_block(block)
            append(view)
            uploads.sink(session).hash([view])
            offsets.append(session.offset)
    assert open_fds() == before, "the appender closes its descriptors"
    assert offsets == [MIB, 2 * MIB, 2 * MIB + 4321]
    data = head + b"".join(blocks)
    assert session.data_path.read_bytes() == data
    # the session finishes as a normal one: offset, file and running hash agree
    store = Store(folder / "registry")
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    assert uploads.finish(session, digest, store) == len(data)


def test_appender_keeps_the_first_direct_from_bytes_in_the_page_cache(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Uploads.appender` writes the start of a blob normally (a pull often follows a push),
    only what lies past `DIRECT_FROM` goes direct."""
    uploads = Uploads(folder / "tmp")
    session = uploads.create("team/app")
    probe = DirectWriter(session.data_path, 0)
    direct_possible = probe._direct >= 0
    probe.close()
    # an ordinary layer: every block through the page cache
    spy = PwriteSpy(monkeypatch)
    blocks = [os.urandom(MIB) for _ in range(3)]
    with uploads.appender(session) as append:
        for block in blocks:
            append(aligned_block(block))
    assert len({fd for fd, _n, _at in spy.calls}) == 1, "one descriptor: the normal one"
    assert uploads_mod.DIRECT_FROM > 3 * MIB
    # past the threshold (made small here) aligned blocks go direct
    uploads.direct_from = 4 * MIB
    spy.calls.clear()
    more = [os.urandom(MIB) for _ in range(3)]
    with uploads.appender(session) as append:
        for block in more:
            append(aligned_block(block))
    fds = [fd for fd, _n, _at in spy.calls]
    assert [at for _fd, _n, at in spy.calls] == [3 * MIB, 4 * MIB, 5 * MIB]
    if direct_possible:
        assert fds[1] == fds[2] != fds[0], "the blocks at 4 and 5 MiB go direct"
    assert session.offset == 6 * MIB
    assert session.data_path.read_bytes() == b"".join(blocks + more)


def test_direct_writes_off_never_opens_o_direct(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`server.direct_writes = false` (temporary storage on NFS, say): every block goes
    through the page cache, past `DIRECT_FROM` too."""
    uploads = Uploads(folder / "tmp", direct_writes=False)
    session = uploads.create("team/app")
    opened: list[int] = []
    real_open = fs.os.open

    def spy_open(path: object, flags: int, *args: object) -> int:
        opened.append(flags)
        return real_open(path, flags, *args)

    monkeypatch.setattr(fs.os, "open", spy_open)
    uploads.direct_from = None  # and even from offset 0
    blocks = [os.urandom(MIB) for _ in range(2)]
    with uploads.appender(session) as append:
        for block in blocks:
            append(aligned_block(block))
    assert opened and not any(flags & os.O_DIRECT for flags in opened)
    assert session.data_path.read_bytes() == b"".join(blocks)


def test_appender_continues_a_session_loaded_from_disk(folder: Path) -> None:
    """A session of an earlier process (offset = file size) is appended to at its end."""
    uploads = Uploads(folder / "tmp")
    session = uploads.create("team/app")
    first = os.urandom(3 * DIRECT_ALIGN)
    uploads.write(session, [first])
    again = Uploads(folder / "tmp")  # a fresh process
    loaded = again.get("team/app", session.id)
    assert loaded.offset == len(first)
    more = os.urandom(DIRECT_ALIGN + 5)
    with again.appender(loaded) as append:
        append(aligned_block(more))
    assert loaded.offset == len(first) + len(more)
    assert loaded.data_path.read_bytes() == first + more


def test_appender_closes_its_writer_when_a_block_fails(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uploads = Uploads(folder / "tmp")
    session = uploads.create("team/app")
    before = open_fds()

    def broken(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError), uploads.appender(session) as append:
        monkeypatch.setattr(fs.os, "pwrite", broken)
        append(aligned_block(os.urandom(DIRECT_ALIGN)))
    monkeypatch.undo()
    assert open_fds() == before
    assert session.offset == 0, "a failed block does not move the offset"
