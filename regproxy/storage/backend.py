"""The `Backend` protocol: everything a store does to its files, shaped like object storage.

Two backends implement it: `fs.FsBackend` (a local folder) and `s3.S3Backend` (a bucket
and prefix on any S3-compatible store). `Store`, uploads, gc, verify, inventory and
eviction speak only to it; nothing above it touches a store path with `os.*`.

Paths are `Path`s under the store root (`layout.Layout` makes every one of them); an
object store maps them to keys. What each operation promises on both backends:

- content is written whole or not at all (`write_atomic`, `create`, `move_into`);
- `create` is put-if-absent: of two concurrent creators exactly one gets True;
- `touch` restarts an object's clock (`mtime`), which gc grace periods and LRU read;
- listings (`names`, `files`) are of what exists at the time, in no particular order,
  and leave out dot-names and the backend's own bookkeeping;
- a folder is no file: it exists only through the files below it (`exists`, `size`,
  `mtime`, `read`, `remove` and `open_read` treat it as absent), as on an object store;
- `shared_lock` / `exclusive_lock` exclude each other across processes (and hosts for
  a shared store): commits hold the shared one, gc's sweep the exclusive one; a holder
  that dies does not hold it forever.

`tests/storage/test_backend_contract.py` runs every promise against both backends.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol


@dataclass(frozen=True, slots=True)
class Entry:
    """A file found by `Backend.files`: its path relative to the listed folder."""

    name: str
    size: int
    mtime: float


class Backend(Protocol):
    #: metadata reads (exists, read of a tag, size) cost a syscall, not a network round
    #: trip: the server may make them on the event loop; large files can be sendfile'd
    local: bool

    def describe(self, root: Path) -> str:
        """The store at `root` as a person names it (a folder, `s3://bucket/prefix`)."""

    def prepare(self, folders: list[Path]) -> None:
        """Make the store usable (create its top folders; nothing for an object store)."""

    def read(self, path: Path) -> bytes | None:
        """The whole (small) file, or None when it does not exist."""

    def write_atomic(self, path: Path, data: bytes) -> None:
        """Replace `path` with `data`, whole or not at all, durably."""

    def create(self, path: Path, data: bytes) -> bool:
        """Write `path` only if it does not exist; True when this call created it."""

    def ensure(self, path: Path) -> None:
        """Create an empty marker file if missing (durably)."""

    def exists(self, path: Path) -> bool: ...

    def size(self, path: Path) -> int | None:
        """File size, or None when it does not exist."""

    def version(self, path: Path) -> Hashable | None:
        """A value that changes whenever the file's content is replaced (an object
        store's ETag may stay when the same bytes are written again), or a folder's
        entries change, where the backend can tell; None when it does not exist or, for
        a folder, when the backend cannot tell (then callers must not cache by it)."""

    def mtime(self, path: Path) -> float | None:
        """When the file was written or last touched, or None when it does not exist."""

    def remove(self, path: Path) -> bool:
        """Delete a file; False when it was not there."""

    def names(self, folder: Path) -> list[str]:
        """Names directly inside `folder`, files and folders (no dot-names); empty when
        it does not exist or is a file. A folder emptied without `prune` may still be
        listed (on disk, and on object stores that keep folders, such as SeaweedFS)."""

    def files(self, folder: Path) -> Iterator[Entry]:
        """Every file below `folder`, at any depth (none below a dot-name), with its size
        and `mtime` (touches included): the walk of gc, verify, inventory and eviction.
        A part of the tree that cannot be read fails the walk; it is never skipped."""

    def move_into(self, src: Path, dst: Path) -> None:
        """A finished local file (`src`, in temporary storage) becomes `dst`, and `src` is
        gone: a rename on disk, an upload to an object store."""

    def upload(self, src: Path, dst: Path) -> bool:
        """Create `dst` from a local file, keeping the file; False when `dst` existed (its
        content is kept)."""

    def move(self, src: Path, dst: Path) -> None:
        """Move a file within the store (verify's quarantine), replacing `dst`. Its clock
        may restart (an object store copies)."""

    def touch(self, path: Path) -> None:
        """Restart the file's clock (a blob's gc grace period, a cached blob's LRU age)."""

    def open_read(self, path: Path, start: int = 0, end: int | None = None) -> BinaryIO:
        """A stream of the file's bytes `[start, end)` (empty when the range is, or starts
        past the end); `FileNotFoundError` when absent. Both backends' streams have
        `readinto`, so large reads can go into one reused buffer."""

    def local_path(self, path: Path) -> Path | None:
        """The file on local disk (to sendfile it), or None when it is not on one."""

    def presign(self, path: Path, seconds: int) -> str | None:
        """A URL that serves the file to anybody for `seconds`; None when not supported."""

    def plain_http_url(self, path: Path, seconds: int) -> str | None:
        """A presigned `http://` URL this process can fetch the file from with a plain
        socket of its own (for a zero-copy relay: `regproxy.splice_relay`); None when
        there is none (local disk, an HTTPS endpoint, a proxy in the way)."""

    def prune(self, folder: Path, stop: Path) -> None:
        """Remove `folder` and its parents up to (not including) `stop` while empty, so
        listings no longer name them."""

    def sweep_leftovers(self, tmp: Path, age: float, now: float, dry_run: bool) -> int:
        """Remove what interrupted writes left behind, older than `age` seconds before
        `now` (entries of the store's `tmp/`; unfinished multipart uploads); return how
        many (a dry run only counts them)."""

    def shared_lock(self, path: Path) -> AbstractContextManager[None]: ...

    def exclusive_lock(self, path: Path) -> AbstractContextManager[None]: ...
