"""How `LineWriter` writes its batches: whole lines, one write to a regular file, writes
of at most PIPE_BUF bytes to a pipe (so processes sharing it never mix lines)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from select import PIPE_BUF

from regproxy.server import logs


def _lines(count: int, width: int = 150) -> list[str]:
    return [f"{i:06d} " + "x" * (width - 7) for i in range(count)]


def test_a_regular_file_gets_each_batch_in_one_write(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "log"
    writes: list[int] = []
    real = os.write

    def counting(fd: int, data) -> int:
        writes.append(len(data))
        return real(fd, data)

    monkeypatch.setattr(os, "write", counting)
    with open(path, "a") as stream:
        writer = logs.LineWriter(stream)
        lines = _lines(500)
        writer._queue.extend(lines)
        writer.flush()
        writer.close()
    assert path.read_text() == "".join(line + "\n" for line in lines)
    assert writes == [sum(len(line) + 1 for line in lines)]


def test_a_pipe_gets_whole_lines_at_most_pipe_buf_at_a_time(monkeypatch) -> None:
    read_end, write_end = os.pipe()
    writes: list[bytes] = []
    real = os.write

    def recording(fd: int, data) -> int:
        writes.append(bytes(data))
        return real(fd, data)

    monkeypatch.setattr(os, "write", recording)
    received = bytearray()

    def drain() -> None:
        while chunk := os.read(read_end, 65536):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    long_line = "L" * (3 * PIPE_BUF)  # longer than PIPE_BUF: written on its own
    lines = [*_lines(200), long_line, *_lines(50, width=90), "ünïcödé"]
    with os.fdopen(write_end, "w", encoding="utf-8") as stream:
        writer = logs.LineWriter(stream)
        writer._queue.extend(lines)
        writer.flush()
        writer.close()
    reader.join(10)
    os.close(read_end)
    assert received.decode() == "".join(line + "\n" for line in lines)
    for data in writes:
        assert data.endswith(b"\n")  # whole lines only
        assert len(data) <= PIPE_BUF or data == long_line.encode() + b"\n"
    assert len(writes) < 20  # not a write per line
