"""Replicas: several `serve` processes on different hosts sharing one store.

What a replica keeps only on its own host (`temporary_registry_storage`: upload session
bytes, proxy spool files) is reached through that replica: a request for it that lands
elsewhere is forwarded to the owner (`server.forward`). This module is the shared part,
small objects in the store:

```
<registry store>/replicas/<id>         JSON: {"id", "url", "name", "started"}: how to reach it
<proxy store>/claims/<alg>/<hex>       JSON: {"replica", "expires"}: who fetches a blob now
```

- A replica's `id` (8 hex) is made once per temporary folder (`local_id`), so it survives
  restarts, and every worker of one `serve` shares it (they share the folder, and reach
  each other's sessions through it). Upload session ids start with it (`owner_of`).
- A claim is taken with put-if-absent; the holder renews it while it fetches and removes
  it when done. A claim past `expires` (its holder died) is taken over. Two replicas that
  take over the same dead claim at once may both fetch: only after a crash, and both
  commits are of the same content-addressed bytes. `gc` removes claims not rewritten
  for an hour (`sweep_stale_claims`): a dead holder's, for a blob nobody pulled again.

Records are cached in memory for `RECORD_TTL` seconds: the lookup sits in the path of
every forwarded request, and a replica's address changes only when it restarts.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from regproxy.digest import Digest
from regproxy.storage.store import Store

ID_LENGTH = 8
ID_FILE = "replica-id"
#: seconds a replica record is remembered (a miss: `MISS_TTL`)
RECORD_TTL = 10.0
MISS_TTL = 1.0
#: seconds a blob claim lives without renewal; the holder renews every `CLAIM_RENEW`
CLAIM_TTL = 30.0
CLAIM_RENEW = 10.0
#: a claim not rewritten for this long was left by a replica that died mid-fetch (a live
#: holder rewrites it every `CLAIM_RENEW`): `gc` removes it
CLAIM_LITTER_AGE = 3600.0
#: where claims live, under the proxy store's root
CLAIMS = "claims"


@dataclass(frozen=True)
class Replica:
    id: str
    url: str | None
    name: str


def local_id(temp_root: Path) -> str:
    """This host's replica id: read from the temporary folder, made there the first time
    (of concurrent first workers, one creates it and the others read it)."""
    path = Path(temp_root) / ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(50):
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            text = ""
        if is_replica_id(text):
            return text
        if not text:
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(ID_LENGTH // 2) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                continue
            time.sleep(0.02)  # another worker is writing it
            continue
        path.unlink(missing_ok=True)  # not ours to keep: garbage in the file
    raise RuntimeError(f"cannot make a replica id in {path}")


def is_replica_id(text: str) -> bool:
    return len(text) == ID_LENGTH and all(c in "0123456789abcdef" for c in text)


def owner_of(upload_id: str) -> str:
    """The replica id an upload session id starts with."""
    return upload_id[:ID_LENGTH]


class Replicas:
    """This replica's record, the others', and blob claims (blocking: offload the calls)."""

    def __init__(self, own: Replica, registry: Store, proxy: Store) -> None:
        self.own = own
        self.registry = registry
        self.proxy = proxy
        self._records: dict[str, tuple[float, Replica | None]] = {}
        self._lock = threading.Lock()

    def _record_path(self, replica_id: str) -> Path:
        return self.registry.layout.root / "replicas" / replica_id

    def _claim_path(self, digest: Digest) -> Path:
        return self.proxy.layout.root / CLAIMS / digest.algorithm / digest.hex

    def register(self) -> None:
        """Publish how to reach this replica (at start-up; replaces its previous record)."""
        record = {
            "id": self.own.id,
            "url": self.own.url,
            "name": self.own.name,
            "started": time.time(),
        }
        self.registry.backend.write_atomic(self._record_path(self.own.id), _dump(record))

    def find(self, replica_id: str) -> Replica | None:
        """Another replica's record, or None when the id names none (or this one)."""
        if replica_id == self.own.id or not is_replica_id(replica_id):
            return None  # never a path made of what a client sent
        now = time.monotonic()
        with self._lock:
            cached = self._records.get(replica_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = _load_replica(self.registry.backend.read(self._record_path(replica_id)))
        with self._lock:
            if len(self._records) > 1024:
                self._records.clear()
            self._records[replica_id] = (now + (RECORD_TTL if found else MISS_TTL), found)
        return found

    def forget(self, replica_id: str) -> None:
        """Drop a cached record (its replica did not answer: it may have restarted)."""
        with self._lock:
            self._records.pop(replica_id, None)

    # ---- blob claims (proxy store) -----------------------------------------------------

    def claim_blob(self, digest: Digest) -> Replica | None:
        """Claim the fetch of `digest` for this replica; None when it is this replica's
        (now or already), else the live replica fetching it."""
        path = self._claim_path(digest)
        backend = self.proxy.backend
        mine = _dump({"replica": self.own.id, "expires": time.time() + CLAIM_TTL})
        if backend.create(path, mine):
            return None
        holder, expires = _load_claim(backend.read(path))
        if holder == self.own.id:
            return None
        if holder is not None and expires > time.time():
            found = self.find(holder)
            if found is not None and found.url:
                return found
        backend.write_atomic(path, mine)  # its holder died (or cannot be reached): take over
        return None

    def renew_blob(self, digest: Digest) -> None:
        """Keep this replica's claim alive while it fetches."""
        mine = _dump({"replica": self.own.id, "expires": time.time() + CLAIM_TTL})
        self.proxy.backend.write_atomic(self._claim_path(digest), mine)

    def release_blob(self, digest: Digest) -> None:
        """The fetch is over: remove the claim if it is still this replica's."""
        path = self._claim_path(digest)
        holder, _ = _load_claim(self.proxy.backend.read(path))
        if holder == self.own.id:
            self.proxy.backend.remove(path)


def _dump(data: dict) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _load(data: bytes | None) -> dict:
    if not data:
        return {}
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _load_replica(data: bytes | None) -> Replica | None:
    record = _load(data)
    replica_id, url, name = record.get("id"), record.get("url"), record.get("name")
    if not isinstance(replica_id, str) or not is_replica_id(replica_id):
        return None
    if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        url = None
    return Replica(replica_id, url, name if isinstance(name, str) else replica_id)


def _load_claim(data: bytes | None) -> tuple[str | None, float]:
    record = _load(data)
    holder, expires = record.get("replica"), record.get("expires")
    if not isinstance(holder, str) or not isinstance(expires, int | float):
        return None, 0.0
    return holder, float(expires)


def sweep_stale_claims(store: Store, now: float, dry_run: bool) -> int:
    """Remove the blob claims of `store` not rewritten for `CLAIM_LITTER_AGE` seconds
    before `now`: their holders died mid-fetch (a claim that merely expired is taken over
    by the next pull, but one for a blob nobody pulls again would stay). How many."""
    root = store.layout.root / CLAIMS
    removed = 0
    for entry in store.backend.files(root):
        if entry.mtime < now - CLAIM_LITTER_AGE:
            removed += 1
            if not dry_run:
                store.backend.remove(root / entry.name)
    return removed
