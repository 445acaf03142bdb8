"""A lean registry client for the benchmark: ``http.client`` over keep-alive connections.

The client must never be the bottleneck. Bodies are sent from memory (a memoryview of one
random buffer, no file reads) in 1 MiB ``sendall`` calls, and responses are read with
``readinto`` into one reused 1 MiB buffer and discarded; both release the GIL for the
syscall, so one Python thread moves several GB/s on loopback and concurrent transfers run in
threads.

Blob content: every blob is a slice of the shared random buffer with its last 16 bytes
replaced by a unique suffix, so there are as many distinct blobs as needed without
generating more data, and each digest costs one ``hasher.copy()`` after the slice's prefix
was hashed once (:class:`BlobSource`).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

MiB = 1024 * 1024
GiB = 1024 * MiB
SEND_BLOCK = MiB
SUFFIX_LEN = 16

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ACCEPT_MANIFESTS = ", ".join(
    [
        OCI_MANIFEST,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


class ClientError(AssertionError):
    """A request the benchmark depends on did not get the answer the spec promises."""


def random_buffer(size: int, tile: int = 64 * MiB) -> bytearray:
    """``size`` bytes of random data, made fast: random tiles, each with a distinct head.

    os.urandom runs at ~300 MB/s here; tiling 64 MiB of it keeps setup under a second.
    Nothing in a registry compresses blobs, so repeats are harmless.
    """
    buf = bytearray(size)
    piece = memoryview(os.urandom(min(tile, size)))
    for i, start in enumerate(range(0, size, len(piece))):
        end = min(start + len(piece), size)
        buf[start:end] = piece[: end - start]
        buf[start : min(start + 8, end)] = i.to_bytes(8, "little")[: end - start]
    return buf


class BlobSource:
    """Distinct blobs cut from one buffer: ``blob(offset, size, label)``."""

    def __init__(self, data: bytearray) -> None:
        self.data = data
        self.view = memoryview(data)
        self._prefix_hashes: dict[tuple[int, int], hashlib._Hash] = {}
        self._lock = threading.Lock()

    def blob(self, offset: int, size: int, label: str) -> Blob:
        if offset + size > len(self.data) or size < SUFFIX_LEN:
            raise ValueError(f"cannot cut {size} bytes at {offset} from {len(self.data)}")
        key = (offset, size)
        with self._lock:
            prefix = self._prefix_hashes.get(key)
            if prefix is None:
                prefix = hashlib.sha256(self.view[offset : offset + size - SUFFIX_LEN])
                self._prefix_hashes[key] = prefix
        suffix = hashlib.sha256(label.encode()).digest()[:SUFFIX_LEN]
        hasher = prefix.copy()
        hasher.update(suffix)
        head = self.view[offset : offset + size - SUFFIX_LEN]
        return Blob(head, suffix, "sha256:" + hasher.hexdigest())


@dataclass(frozen=True)
class Blob:
    """Blob bytes as a zero-copy head plus a 16-byte suffix."""

    head: memoryview
    suffix: bytes
    digest: str

    @property
    def size(self) -> int:
        return len(self.head) + len(self.suffix)

    def pieces(self, start: int = 0, end: int | None = None) -> Iterator[memoryview | bytes]:
        """Bytes ``[start, end)`` in blocks of at most ``SEND_BLOCK``."""
        end = self.size if end is None else end
        split = len(self.head)
        pos = start
        while pos < min(end, split):
            stop = min(pos + SEND_BLOCK, end, split)
            yield self.head[pos:stop]
            pos = stop
        if end > split:
            yield self.suffix[max(start, split) - split : end - split]

    def tobytes(self) -> bytes:
        return bytes(self.head) + self.suffix


def small_blob(data: bytes) -> Blob:
    return Blob(memoryview(data[:0]), data, "sha256:" + hashlib.sha256(data).hexdigest())


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    received: int


class Connection:
    """One keep-alive HTTP/1.1 connection to a registry at ``host:port``; an ``https://``
    base URL is verified against ``context`` (default: the system's CAs, which
    ``SSL_CERT_FILE`` replaces)."""

    def __init__(
        self, base_url: str, timeout: float = 300.0, context: ssl.SSLContext | None = None
    ) -> None:
        parts = urlsplit(base_url)
        self.base = base_url.rstrip("/")
        assert parts.hostname == "127.0.0.1", "the benchmark only talks to loopback"
        self.conn: http.client.HTTPConnection
        if parts.scheme == "https":
            self.conn = http.client.HTTPSConnection(
                parts.hostname,
                parts.port,
                timeout=timeout,
                blocksize=SEND_BLOCK,
                context=context or ssl.create_default_context(),
            )
        else:
            self.conn = http.client.HTTPConnection(
                parts.hostname, parts.port, timeout=timeout, blocksize=SEND_BLOCK
            )
        self._buf = bytearray(MiB)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _target(self, url: str) -> str:
        """A path (and query) on this server, from a path or an absolute Location."""
        parts = urlsplit(url)
        if parts.netloc and parts.netloc != urlsplit(self.base).netloc:
            raise ClientError(f"refusing to follow {url} off {self.base}")
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def request(
        self,
        method: str,
        url: str,
        *,
        body: Iterable[bytes | memoryview] | bytes | None = None,
        length: int | None = None,
        headers: dict[str, str] | None = None,
        keep_body: bool = True,
        chunked: bool = False,
    ) -> Response:
        """Send a request; the body is kept (``keep_body``) or counted and discarded.
        ``chunked``: the body goes with ``Transfer-Encoding: chunked``, one chunk per piece
        the iterable yields (as Go's clients send an unsized body: docker, containerd)."""
        hdrs = dict(headers or {})
        if chunked:
            hdrs["Transfer-Encoding"] = "chunked"
        elif body is not None or method in ("PUT", "PATCH", "POST"):
            if length is None:
                if body is not None and not isinstance(body, bytes):
                    raise TypeError("an iterable body needs its length")
                length = 0 if body is None else len(body)
            hdrs["Content-Length"] = str(length)
        try:
            self.conn.request(
                method, self._target(url), body=body, headers=hdrs, encode_chunked=chunked
            )
            resp = self.conn.getresponse()
        except (ConnectionError, http.client.HTTPException):
            # a server may close an idle keep-alive connection: one retry on a fresh one,
            # unless the body was a one-shot iterator
            self.conn.close()
            if not (body is None or isinstance(body, bytes)):
                raise
            self.conn.request(method, self._target(url), body=body, headers=hdrs)
            resp = self.conn.getresponse()
        received = 0
        chunks: list[bytes] = []
        if keep_body:
            data = resp.read()
            chunks.append(data)
            received = len(data)
        else:
            while n := resp.readinto(self._buf):
                received += n
        headers_out = {k.lower(): v for k, v in resp.getheaders()}
        if resp.will_close:
            self.conn.close()
        return Response(resp.status, headers_out, b"".join(chunks), received)

    def expect(self, status: int | tuple[int, ...], method: str, url: str, **kw) -> Response:
        resp = self.request(method, url, **kw)
        wanted = (status,) if isinstance(status, int) else status
        if resp.status not in wanted:
            raise ClientError(
                f"{method} {self.base}{self._target(url)}: {resp.status}, expected {status}: "
                f"{resp.body[:300]!r}"
            )
        return resp

    # ---- registry operations ---------------------------------------------------------

    def _start_upload(self, repo: str) -> str:
        resp = self.expect(202, "POST", f"/v2/{repo}/blobs/uploads/")
        return resp.headers["location"]

    @staticmethod
    def _with_digest(location: str, digest: str) -> str:
        return f"{location}{'&' if '?' in location else '?'}digest={digest}"

    def push_monolithic(self, repo: str, blob: Blob) -> None:
        """POST a session, then one PUT ``?digest=`` carrying the whole body."""
        location = self._start_upload(repo)
        self.expect(
            201,
            "PUT",
            self._with_digest(location, blob.digest),
            body=blob.pieces(),
            length=blob.size,
            headers={"Content-Type": "application/octet-stream"},
        )

    def push_chunked(self, repo: str, blob: Blob, chunk: int) -> None:
        """POST, one PATCH per ``chunk`` bytes (with Content-Range), then an empty PUT."""
        location = self._start_upload(repo)
        for start in range(0, blob.size, chunk):
            end = min(start + chunk, blob.size)
            resp = self.expect(
                202,
                "PATCH",
                location,
                body=blob.pieces(start, end),
                length=end - start,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{start}-{end - 1}",
                },
            )
            location = resp.headers["location"]
        self.expect(201, "PUT", self._with_digest(location, blob.digest))

    def push_chunked_encoding(self, repo: str, blob: Blob, piece: int) -> None:
        """docker's and containerd's push: POST, one PATCH whose body is sent with
        ``Transfer-Encoding: chunked`` in ``piece``-byte chunks (Go's io.Copy writes 32 KiB
        at a time), then an empty PUT ``?digest=``."""
        location = self._start_upload(repo)

        def pieces() -> Iterator[memoryview | bytes]:
            for start in range(0, blob.size, piece):
                yield from blob.pieces(start, min(start + piece, blob.size))

        resp = self.expect(
            202,
            "PATCH",
            location,
            body=pieces(),
            chunked=True,
            headers={"Content-Type": "application/octet-stream"},
        )
        self.expect(201, "PUT", self._with_digest(resp.headers["location"], blob.digest))

    def push_small(self, repo: str, data: bytes) -> str:
        """Monolithic push of a small blob; returns its digest."""
        blob = small_blob(data)
        self.push_monolithic(repo, blob)
        return blob.digest

    def pull(self, path: str, expected: int, byte_range: tuple[int, int] | None = None) -> int:
        """GET a blob, discarding the body; checks the byte count (and 206 for a Range)."""
        headers = {}
        status = 200
        if byte_range is not None:
            headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
            status = 206
        resp = self.expect(status, "GET", path, headers=headers, keep_body=False)
        if resp.received != expected:
            raise ClientError(f"GET {path}: got {resp.received} bytes, expected {expected}")
        return resp.received

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        resp = self.expect(
            201,
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            body=data,
            headers={"Content-Type": media_type},
        )
        return resp.headers.get("docker-content-digest", "")

    def tags(self, repo: str) -> list[str]:
        resp = self.expect(200, "GET", f"/v2/{repo}/tags/list")
        return list(json.loads(resp.body)["tags"] or [])


def image_manifest(config: Blob, layers: Sequence[Blob]) -> bytes:
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.digest, "size": config.size},
        "layers": [{"mediaType": OCI_LAYER, "digest": b.digest, "size": b.size} for b in layers],
    }
    return json.dumps(manifest, separators=(",", ":")).encode()


def timed_parallel(jobs: Sequence[Callable[[], object]]) -> float:
    """Run ``jobs`` in one thread each, released together; seconds until the last ends."""
    if len(jobs) == 1:
        started = time.perf_counter()
        jobs[0]()
        return time.perf_counter() - started
    barrier = threading.Barrier(len(jobs) + 1)

    def run(job: Callable[[], object]) -> None:
        barrier.wait()
        job()

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(run, job) for job in jobs]
        barrier.wait()
        started = time.perf_counter()
        for future in futures:
            future.result()
        return time.perf_counter() - started
