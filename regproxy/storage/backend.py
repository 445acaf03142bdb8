"""The `Backend` protocol: the file operations a `Store` needs.

It is the seam for another backend (an S3-compatible one) later; today the
filesystem backend in `fs.py` is the only implementation.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol


class Backend(Protocol):
    def read(self, path: Path) -> bytes | None:
        """The whole (small) file, or None when it does not exist."""

    def write_atomic(self, path: Path, data: bytes) -> None:
        """Replace `path` with `data`: temp file, fsync, rename, fsync the folder."""

    def ensure(self, path: Path) -> None:
        """Create an empty marker file if missing (durably)."""

    def exists(self, path: Path) -> bool: ...

    def size(self, path: Path) -> int | None:
        """File size, or None when it does not exist."""

    def version(self, path: Path) -> tuple[int, int, int] | None:
        """(inode, mtime in ns, size): changes whenever the file is replaced or a folder's
        entries change; None when it does not exist."""

    def mtime(self, path: Path) -> float | None:
        """Modification time, or None when it does not exist."""

    def remove(self, path: Path) -> bool:
        """Delete a file; False when it was not there."""

    def names(self, folder: Path) -> list[str]:
        """Entries of a folder (no dot-files); empty when it does not exist."""

    def move_into(self, src: Path, dst: Path, tmp_dir: Path) -> None:
        """Move a finished temp file into place, across filesystems if need be."""

    def touch(self, path: Path) -> None:
        """Set mtime to now (restarts a blob's gc grace period)."""

    def shared_lock(self, path: Path) -> AbstractContextManager[None]: ...

    def exclusive_lock(self, path: Path) -> AbstractContextManager[None]: ...
