"""`S3Backend`: a store on any S3-compatible object store (a bucket and a key prefix).

The same invariants as on disk, without rename, flock or a local filesystem:
- content is written whole or not at all: a PUT is atomic, a multipart upload is
  invisible until it is completed;
- blobs and manifests are created once, with `If-None-Match: *` (`create`, and the
  completion of `move_into`'s multipart upload); a second writer of the same digest
  finds them there;
- a clock an object store cannot set (`touch`) is kept in a marker object beside it:
  small files (tags, links) are rewritten with compare-and-swap instead, large ones
  (blobs) get an empty `_touched/<key>` object whose time counts as theirs;
- the store lock is a lease protocol on two kinds of objects under `<lock>.d/`
  (see `LeaseLock`), safe across processes and hosts with nothing else to run;
- a multipart upload in progress is marked live by an object its writer keeps
  rewriting (`_uploading/<hash of key>.<token>`, see `_marked`): gc aborts a dead
  writer's upload once it is older than the grace period, and never a live one's.

Every method is blocking (one or a few S3 requests): the server calls them through
the storage thread pool (`local` is False), never on the event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from regproxy.storage.backend import Entry
from regproxy.storage.s3client import crc32_header

#: files up to this size are uploaded with one PUT; larger ones in parts
SINGLE_PUT_MAX = 64 * 1024 * 1024
#: multipart part size; grown for blobs that would need more than `MAX_PARTS` parts
PART_SIZE = 16 * 1024 * 1024
#: S3's smallest part but the last (smaller ones fail the completion: EntityTooSmall)
MIN_PART = 5 * 1024 * 1024
MAX_PARTS = 9_000
#: the largest object one CopyObject may copy (AWS); larger ones are copied in parts
COPY_MAX = 5 * 1024 * 1024 * 1024
#: keys (or uploads) asked for per listing request; S3's own maximum
LIST_PAGE = 1000
#: parts of one upload sent at once
PART_THREADS = 4
#: files this small are touched by rewriting them (compare-and-swap), larger by a marker
SMALL_FILE = 64 * 1024
#: where touch markers of large files live, under the store's prefix
TOUCHED = "_touched"
#: where multipart uploads in progress are marked live, under the store's prefix
UPLOADING = "_uploading"
#: a live upload's marker is rewritten this often…
MARK_RENEW = 30.0
#: …and one not rewritten for this long is a dead (or cut off) writer's: its upload may go
MARK_STALE = 120.0
#: top-level folders of this backend's bookkeeping, left out of listings of the root
HIDDEN = (TOUCHED, UPLOADING)
#: the lease of gc's exclusive phase, renewed while held; taken over once expired
LEASE_SECONDS = 120.0
#: a shared holder's marker older than this belongs to a process that died mid-commit
SHARED_STALE = 60.0
#: how long a lock is waited for before giving up
LOCK_WAIT = 120.0
_CONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _status(exc: Exception) -> int:
    response = getattr(exc, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _client_error() -> type[Exception]:
    from botocore.exceptions import ClientError  # a store on S3 has loaded botocore

    return ClientError


def mark_id(relative: str) -> str:
    """What names the live-upload markers of the key `<prefix>/<relative>`: a hash of it
    (markers sit side by side in one folder: a folder per key would stay behind on
    engines that keep folders, such as SeaweedFS)."""
    return hashlib.sha256(relative.encode()).hexdigest()[:32]


class S3Backend:
    """Implements `Backend` for the keys `<prefix>/<path relative to root>` in `bucket`."""

    local = False

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str,
        root: PurePath,
        presigner: Any | None = None,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.root = PurePosixPath(root)
        self.presigner = presigner or client
        self.client_error = _client_error()

    # ---- names --------------------------------------------------------------------------

    def key(self, path: Path | PurePosixPath) -> str:
        relative = PurePosixPath(path).relative_to(self.root).as_posix()
        if relative == ".":
            return self.prefix
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def _folder_key(self, path: Path | PurePosixPath) -> str:
        key = self.key(path)
        return f"{key}/" if key else ""

    def _touch_key(self, key: str) -> str:
        relative = key[len(self.prefix) + 1 :] if self.prefix else key
        return self._join(TOUCHED, relative)

    def _join(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts] if self.prefix else list(parts))

    def _is_root(self, path: Path | PurePosixPath) -> bool:
        return PurePosixPath(path) == self.root

    # ---- whole objects ------------------------------------------------------------------

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except self.client_error as exc:
            if _code(exc) in _MISSING or _status(exc) == 404:
                return None
            raise

    def describe(self, root: Path) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def prepare(self, folders: list[Path]) -> None:
        """Nothing to create: an object store has no folders."""

    def read(self, path: Path) -> bytes | None:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key(path))
        except self.client_error as exc:
            if _code(exc) in _MISSING or _status(exc) == 404:
                return None
            raise
        with contextlib.closing(answer["Body"]) as body:
            return body.read()

    def _put(self, key: str, data: bytes, **conditions: str) -> dict[str, Any]:
        return self.client.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ContentType="application/octet-stream",
            **conditions,
        )

    def write_atomic(self, path: Path, data: bytes) -> None:
        self._put(self.key(path), data)

    def create(self, path: Path, data: bytes) -> bool:
        try:
            self._put(self.key(path), data, IfNoneMatch="*")
        except self.client_error as exc:
            if _code(exc) in _CONDITION_FAILED or _status(exc) in (409, 412):
                return False
            raise
        return True

    def ensure(self, path: Path) -> None:
        self.create(path, b"")

    def exists(self, path: Path) -> bool:
        return self._head(self.key(path)) is not None

    def size(self, path: Path) -> int | None:
        head = self._head(self.key(path))
        return None if head is None else int(head["ContentLength"])

    def version(self, path: Path) -> Hashable | None:
        """The object's ETag; None for a folder (an object store cannot tell when the keys
        below a prefix changed, so listings are not cached by it)."""
        head = self._head(self.key(path))
        return None if head is None else str(head["ETag"])

    def mtime(self, path: Path) -> float | None:
        key = self.key(path)
        head = self._head(key)
        if head is None:
            return None
        when = head["LastModified"].timestamp()
        if int(head["ContentLength"]) > SMALL_FILE:
            marker = self._head(self._touch_key(key))
            if marker is not None:
                when = max(when, marker["LastModified"].timestamp())
        return when

    def remove(self, path: Path) -> bool:
        key = self.key(path)
        head = self._head(key)
        if head is None:
            return False
        self.client.delete_object(Bucket=self.bucket, Key=key)
        if int(head["ContentLength"]) > SMALL_FILE:
            self.client.delete_object(Bucket=self.bucket, Key=self._touch_key(key))
        return True

    def touch(self, path: Path) -> None:
        key = self.key(path)
        head = self._head(key)
        if head is None:
            return
        if int(head["ContentLength"]) > SMALL_FILE:
            self._put(self._touch_key(key), b"")
            return
        try:  # rewrite the same bytes, unless somebody replaced them meanwhile (theirs is newer)
            answer = self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=head["ETag"])
            with contextlib.closing(answer["Body"]) as body:
                data = body.read()
            self._put(key, data, IfMatch=head["ETag"])
        except self.client_error as exc:
            if _code(exc) in _CONDITION_FAILED | _MISSING or _status(exc) in (404, 409, 412):
                return
            raise

    # ---- listings -----------------------------------------------------------------------

    def _pages(self, prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": LIST_PAGE}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        while True:
            page = self.client.list_objects_v2(**kwargs)
            yield page
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def names(self, folder: Path) -> list[str]:
        """The store's own `_touched` and `_uploading` folders are not listed: they are
        this backend's bookkeeping, not the store's files."""
        prefix = self._folder_key(folder)
        hidden = HIDDEN if self._is_root(folder) else ()
        found: list[str] = []
        for page in self._pages(prefix, "/"):
            for common in page.get("CommonPrefixes", []):
                found.append(common["Prefix"][len(prefix) :].rstrip("/"))
            for item in page.get("Contents", []):
                found.append(item["Key"][len(prefix) :])
        return [name for name in found if name and not name.startswith(".") and name not in hidden]

    def files(self, folder: Path) -> Iterator[Entry]:
        """One listing of the folder's keys, and one of its touch markers (whose times
        count as their files'); `_touched` and `_uploading` themselves are not listed."""
        prefix = self._folder_key(folder)
        markers = self._join(TOUCHED, prefix[len(self._folder_key(self.root)) :])
        markers = markers if markers.endswith("/") else f"{markers}/"
        touched: dict[str, float] = {}
        for page in self._pages(markers):
            for item in page.get("Contents", []):
                touched[item["Key"][len(markers) :]] = item["LastModified"].timestamp()
        hidden = tuple(f"{name}/" for name in HIDDEN) if self._is_root(folder) else None
        for page in self._pages(prefix):
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix) :]
                if not name or any(part.startswith(".") for part in name.split("/")):
                    continue
                if hidden is not None and name.startswith(hidden):
                    continue
                when = item["LastModified"].timestamp()
                yield Entry(name, int(item["Size"]), max(when, touched.get(name, when)))

    # ---- large files --------------------------------------------------------------------

    def move_into(self, src: Path, dst: Path) -> None:
        """Upload a finished local file to `dst` (once: an existing `dst` is the same
        content, as callers only move content-addressed files), then delete `src`."""
        self.upload(src, dst)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(src)

    def upload(self, src: Path, dst: Path) -> bool:
        """Create `dst` from a local file without deleting it; False when it existed."""
        key = self.key(dst)
        size = os.stat(src).st_size
        if size <= SINGLE_PUT_MAX:
            with open(src, "rb") as handle:
                try:
                    self.client.put_object(
                        Bucket=self.bucket,
                        Key=key,
                        Body=handle,
                        ContentLength=size,
                        ContentType="application/octet-stream",
                        IfNoneMatch="*",
                    )
                except self.client_error as exc:
                    if _code(exc) in _CONDITION_FAILED or _status(exc) in (409, 412):
                        return False
                    raise
            return True
        return self._multipart(src, key, size)

    def _multipart(self, src: Path, key: str, size: int) -> bool:
        with self._marked(key):
            return self._multipart_marked(src, key, size)

    def _multipart_marked(self, src: Path, key: str, size: int) -> bool:
        part = max(PART_SIZE, MIN_PART, math.ceil(size / MAX_PARTS))
        upload = self.client.create_multipart_upload(
            Bucket=self.bucket,
            Key=key,
            ContentType="application/octet-stream",
            ChecksumAlgorithm="CRC32",  # each part's is checked by S3 (see s3client)
        )["UploadId"]
        try:

            def send(number: int) -> dict[str, Any]:
                start = (number - 1) * part
                count = min(part, size - start)
                with open(src, "rb") as handle:
                    handle.seek(start)
                    data = handle.read(count)
                crc = crc32_header(data)
                answer = self.client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=number, Body=data,
                    ChecksumCRC32=crc,
                )  # fmt: skip
                return {"PartNumber": number, "ETag": answer["ETag"], "ChecksumCRC32": crc}

            numbers = range(1, math.ceil(size / part) + 1)
            with ThreadPoolExecutor(PART_THREADS, thread_name_prefix="regproxy-s3part") as pool:
                parts = list(pool.map(send, numbers))
            try:
                self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                )
            except self.client_error as exc:
                if _code(exc) in _CONDITION_FAILED or _status(exc) in (409, 412):
                    self._abort(key, upload)  # refused uploads stay open until aborted
                    return False
                raise
        except BaseException:
            with contextlib.suppress(Exception):
                self._abort(key, upload)
            raise
        return True

    def _abort(self, key: str, upload: str) -> None:
        self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)

    def _mark_id(self, key: str) -> str:
        return mark_id(key[len(self.prefix) + 1 :] if self.prefix else key)

    @contextlib.contextmanager
    def _marked(self, key: str) -> Iterator[None]:
        """Mark multipart uploads of `key` started inside as live, for as long as this runs.

        The marker `<prefix>/_uploading/<hash of key>.<token>` (holding the key, for
        people) is written before the upload is
        created, rewritten every `MARK_RENEW` seconds by a thread, and deleted only after
        the upload was completed or aborted. `sweep_leftovers` lists uploads first, then
        markers: an upload it saw already existed, so its marker was already written,
        and S3 lists what was written before (strong consistency). It aborts an upload
        of a key only when no marker of that key was rewritten within `MARK_STALE`
        seconds, which a running writer cannot fail unless it could not reach S3 for
        that long (and then its completion fails with an error: nothing half-written
        shows). A token per writer: two processes committing the same digest each keep
        their own marker, and the first to finish does not unmark the other.
        """
        marker = self._join(UPLOADING, f"{self._mark_id(key)}.{uuid.uuid4().hex}")
        self.client.put_object(Bucket=self.bucket, Key=marker, Body=key.encode())
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(MARK_RENEW):
                with contextlib.suppress(Exception):  # tried again at the next beat
                    self.client.put_object(Bucket=self.bucket, Key=marker, Body=key.encode())

        renewer = threading.Thread(target=renew, name="regproxy-s3mark", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            with contextlib.suppress(Exception):  # a leftover marker is swept when stale
                self.client.delete_object(Bucket=self.bucket, Key=marker)

    def move(self, src: Path, dst: Path) -> None:
        """A server-side copy (in parts beyond `COPY_MAX`), then the source and its touch
        marker are deleted; the copy's clock starts now."""
        source = self.key(src)
        head = self._head(source)
        if head is None:
            raise FileNotFoundError(str(src))
        size = int(head["ContentLength"])
        if size > COPY_MAX:
            self._copy_in_parts(source, self.key(dst), size)
        else:
            self.client.copy_object(
                Bucket=self.bucket,
                Key=self.key(dst),
                CopySource={"Bucket": self.bucket, "Key": source},
                ContentType="application/octet-stream",
                MetadataDirective="REPLACE",
            )
        self.client.delete_object(Bucket=self.bucket, Key=source)
        if size > SMALL_FILE:
            self.client.delete_object(Bucket=self.bucket, Key=self._touch_key(source))

    def _copy_in_parts(self, source: str, key: str, size: int) -> None:
        """CopyObject stops at 5 GiB on AWS: a larger object is copied by UploadPartCopy."""
        with self._marked(key):
            self._copy_in_parts_marked(source, key, size)

    def _copy_in_parts_marked(self, source: str, key: str, size: int) -> None:
        part = max(PART_SIZE, MIN_PART, math.ceil(size / MAX_PARTS))
        upload = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType="application/octet-stream"
        )["UploadId"]
        try:
            parts = []
            for number in range(1, math.ceil(size / part) + 1):
                start = (number - 1) * part
                last = min(start + part, size) - 1
                answer = self.client.upload_part_copy(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload,
                    PartNumber=number,
                    CopySource={"Bucket": self.bucket, "Key": source},
                    CopySourceRange=f"bytes={start}-{last}",
                )
                parts.append({"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]})
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self._abort(key, upload)
            raise

    def open_read(self, path: Path, start: int = 0, end: int | None = None) -> BinaryIO:
        """A ranged GET. An empty range, or one starting past the end, reads as empty (as
        on disk), not as the whole object (S3 ignores a range `bytes=5-4`) or an error
        (416)."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(path)}
        if end is not None and end <= start:
            if self._head(kwargs["Key"]) is None:
                raise FileNotFoundError(str(path))
            return io.BytesIO(b"")
        if start or end is not None:
            last = "" if end is None else str(end - 1)
            kwargs["Range"] = f"bytes={start}-{last}"
        try:
            return self.client.get_object(**kwargs)["Body"]
        except self.client_error as exc:
            if _code(exc) in _MISSING or _status(exc) == 404:
                raise FileNotFoundError(str(path)) from None
            if _code(exc) == "InvalidRange" or _status(exc) == 416:
                return io.BytesIO(b"")
            raise

    def local_path(self, path: Path) -> Path | None:
        return None

    def presign(self, path: Path, seconds: int) -> str | None:
        return self.presigner.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.bucket,
                "Key": self.key(path),
                "ResponseContentType": "application/octet-stream",
            },
            ExpiresIn=seconds,
        )

    def plain_http_url(self, path: Path, seconds: int) -> str | None:
        """Presigned for the endpoint this process uses (not `public_endpoint`), when that
        is plain HTTP reached without a proxy (botocore would take `HTTP_PROXY` unless
        `NO_PROXY` names the host)."""
        endpoint = urlsplit(self.client.meta.endpoint_url)
        if endpoint.scheme != "http" or not endpoint.hostname:
            return None
        import urllib.request  # here: a filesystem-only `serve` need not load it

        if "http" in urllib.request.getproxies() and not urllib.request.proxy_bypass(
            endpoint.hostname
        ):
            return None
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key(path)}, ExpiresIn=seconds
        )

    def prune(self, folder: Path, stop: Path) -> None:
        """AWS lists no folder without an object below it, but an engine that keeps keys
        as a filesystem (SeaweedFS) lists an emptied folder until the folder itself is
        deleted (measured: still listed a minute later). So, as `rmdir` would, delete the
        folder key `<key>/` of `folder` and of each parent up to `stop` while no object is
        below it (on AWS, a delete of a key never written). SeaweedFS refuses to delete a
        folder that is not empty, so a write landing meanwhile stays."""
        path, end = PurePosixPath(folder), PurePosixPath(stop)
        while path != end and end in path.parents:
            below = self._folder_key(path)
            page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=below, MaxKeys=1)
            if page.get("Contents"):
                return
            self.client.delete_object(Bucket=self.bucket, Key=below)
            path = path.parent

    def sweep_leftovers(self, tmp: Path, age: float, now: float, dry_run: bool) -> int:
        """Abort multipart uploads under the prefix started more than `age` seconds
        before `now` whose writer is gone: no marker of their key rewritten within
        `MARK_STALE` seconds of `now` (see `_marked`); markers that stale are deleted
        (a writer that was only cut off writes its marker again). The uploads are listed
        before the markers: that order is what makes a live upload's marker visible.
        Stale lock markers are dropped by the next exclusive holder (`LeaseLock`), which
        lists them anyway."""
        old: list[tuple[str, str]] = []
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self._folder_key(self.root),
            "MaxUploads": LIST_PAGE,
        }
        while True:
            page = self.client.list_multipart_uploads(**kwargs)
            for upload in page.get("Uploads", []):
                if now - upload["Initiated"].timestamp() > age:
                    old.append((upload["Key"], upload["UploadId"]))
            if not page.get("IsTruncated"):
                break
            # SeaweedFS pages by upload id alone (and gives no NextKeyMarker)
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker")
            if page.get("NextKeyMarker"):
                kwargs["KeyMarker"] = page["NextKeyMarker"]
        live = self._live_marks(now, dry_run)
        removed = 0
        for key, upload_id in old:
            if self._mark_id(key) in live:
                continue  # a running commit's
            removed += 1
            if not dry_run:
                with contextlib.suppress(Exception):
                    self._abort(key, upload_id)
        return removed

    def _live_marks(self, now: float, dry_run: bool) -> set[str]:
        """The keys (`_mark_id`) of markers younger than `MARK_STALE`; older markers are
        deleted unless `dry_run`."""
        live: set[str] = set()
        folder = self._join(UPLOADING) + "/"
        for page in self._pages(folder):
            for item in page.get("Contents", []):
                name = item["Key"][len(folder) :]
                if "." not in name or "/" in name:
                    continue  # not a marker
                if now - item["LastModified"].timestamp() < MARK_STALE:
                    live.add(name.split(".", 1)[0])
                elif not dry_run:
                    with contextlib.suppress(Exception):
                        self.client.delete_object(Bucket=self.bucket, Key=item["Key"])
        return live

    # ---- the store lock -----------------------------------------------------------------

    def shared_lock(self, path: Path) -> contextlib.AbstractContextManager[None]:
        return LeaseLock(self, self.key(path)).shared()

    def exclusive_lock(self, path: Path) -> contextlib.AbstractContextManager[None]:
        return LeaseLock(self, self.key(path)).exclusive()


class LeaseLock:
    """The store lock on an object store: commits share it, gc's sweep holds it alone.

    A shared holder writes `<lock>.d/shared/<id>`, then checks for `<lock>.d/exclusive`;
    the exclusive holder creates `<lock>.d/exclusive` (put-if-absent, with its owner and
    expiry), then waits until no live shared marker is listed. S3 is strongly
    consistent (a read or list sees every write acknowledged before it), so of a commit
    and a sweep starting together at least one sees the other: the commit steps back
    (and retries after the sweep) or the sweep waits for the commit. Markers and leases
    of processes that died expire (`SHARED_STALE`, `LEASE_SECONDS`); a live exclusive
    holder renews its lease while it works, and deletes only its own lease when done
    (a conditional delete: a holder stalled past its lease must not free the lease of
    the one that took it over). Stale shared markers are deleted by the next exclusive
    holder, which lists them anyway.
    """

    def __init__(self, backend: S3Backend, key: str) -> None:
        self.backend = backend
        self.client = backend.client
        self.bucket = backend.bucket
        self.folder = f"{key}.d"
        self.exclusive_key = f"{self.folder}/exclusive"

    def _exclusive_alive(self) -> bool:
        raw = self._read(self.exclusive_key)
        if raw is None:
            return False
        try:
            return float(json.loads(raw[0])["expires"]) > time.time()
        except (ValueError, KeyError, TypeError):
            return True  # a lease we cannot read is honoured until it is replaced

    def _read(self, key: str) -> tuple[bytes, str] | None:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
        except self.backend.client_error as exc:
            if _code(exc) in _MISSING or _status(exc) == 404:
                return None
            raise
        with contextlib.closing(answer["Body"]) as body:
            return body.read(), str(answer["ETag"])

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        marker = f"{self.folder}/shared/{uuid.uuid4().hex}"
        deadline = time.monotonic() + LOCK_WAIT
        pause = 0.05
        while True:
            self.client.put_object(Bucket=self.bucket, Key=marker, Body=b"")
            try:
                alive = self._exclusive_alive()
            except BaseException:
                with contextlib.suppress(Exception):  # no marker left to stall a gc
                    self.client.delete_object(Bucket=self.bucket, Key=marker)
                raise
            if not alive:
                break
            self.client.delete_object(Bucket=self.bucket, Key=marker)
            if time.monotonic() > deadline:
                raise TimeoutError("the store is being garbage-collected; try again later")
            time.sleep(pause * (1 + random.random()))
            pause = min(pause * 2, 1.0)
        try:
            yield
        finally:
            self.client.delete_object(Bucket=self.bucket, Key=marker)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        owner = uuid.uuid4().hex
        etag = self._take(owner)
        stop = threading.Event()
        renewer = threading.Thread(
            target=self._renew, args=(owner, etag, stop), name="regproxy-lease", daemon=True
        )
        renewer.start()
        try:
            self._wait_for_shared_holders()
            yield
        finally:
            stop.set()
            renewer.join()
            with contextlib.suppress(Exception):  # 412: the lease is somebody else's now
                self.client.delete_object(
                    Bucket=self.bucket, Key=self.exclusive_key, IfMatch=etag[0]
                )

    def _lease(self, owner: str) -> bytes:
        return json.dumps({"owner": owner, "expires": time.time() + LEASE_SECONDS}).encode()

    def _take(self, owner: str) -> list[str]:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                answer = self.client.put_object(
                    Bucket=self.bucket, Key=self.exclusive_key, Body=self._lease(owner),
                    IfNoneMatch="*",
                )  # fmt: skip
                return [str(answer["ETag"])]
            except self.backend.client_error as exc:
                if not (_code(exc) in _CONDITION_FAILED or _status(exc) in (409, 412)):
                    raise
            current = self._read(self.exclusive_key)
            if current is not None and not self._exclusive_alive():
                try:  # an expired lease is taken over, by exactly one contender
                    answer = self.client.put_object(
                        Bucket=self.bucket, Key=self.exclusive_key, Body=self._lease(owner),
                        IfMatch=current[1],
                    )  # fmt: skip
                    return [str(answer["ETag"])]
                except self.backend.client_error as exc:
                    if not (_code(exc) in _CONDITION_FAILED or _status(exc) in (409, 412)):
                        raise
            if time.monotonic() > deadline:
                raise TimeoutError("another gc holds the store lock")
            time.sleep(0.5)

    def _renew(self, owner: str, etag: list[str], stop: threading.Event) -> None:
        while not stop.wait(LEASE_SECONDS / 4):
            with contextlib.suppress(Exception):
                answer = self.client.put_object(
                    Bucket=self.bucket, Key=self.exclusive_key, Body=self._lease(owner),
                    IfMatch=etag[0],
                )  # fmt: skip
                etag[0] = str(answer["ETag"])

    def _wait_for_shared_holders(self) -> None:
        deadline = time.monotonic() + LOCK_WAIT
        prefix = f"{self.folder}/shared/"
        while True:
            now = time.time()
            live = []
            for page in self.backend._pages(prefix):
                for item in page.get("Contents", []):
                    if now - item["LastModified"].timestamp() < SHARED_STALE:
                        live.append(item)
                    else:  # a commit that died holding it: ignored, and cleared away
                        with contextlib.suppress(Exception):
                            self.client.delete_object(Bucket=self.bucket, Key=item["Key"])
            if not live:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("commits kept the store lock shared too long")
            time.sleep(0.02)
