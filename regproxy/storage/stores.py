"""Open the store a configuration names: a local folder, or a bucket and prefix on S3.

The one place that turns `registry_storage` / `proxy_storage` into a `Store`, for
`serve` and every offline command alike. boto3 is imported only when a store is on S3
(inside `s3client.build_client` and `s3._client_error`), and one client per process
serves every S3 store.
"""

from __future__ import annotations

import threading
from pathlib import Path, PurePosixPath
from typing import Any

from regproxy.config import S3Config, S3Location, StorageLocation
from regproxy.storage import s3client
from regproxy.storage.s3 import S3Backend
from regproxy.storage.store import Store

#: the root of an S3 store's paths: never a real folder, only the origin of its keys
S3_ROOT = Path("/regproxy-s3")

#: keyed by the settings' value: an id() could be reused by another configuration's
#: settings once the first is freed (tests build many), handing it the wrong endpoint
_clients: dict[tuple[S3Config, bool], Any] = {}
_clients_lock = threading.Lock()


def s3_client(settings: S3Config, public: bool = False) -> Any:
    """The process's S3 client for `settings` (`public`: the one that presigns URLs for
    `public_endpoint`)."""
    key = (settings, public)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = s3client.build_client(settings, public=public)
        return client


def store_root(location: StorageLocation) -> Path:
    """Where a store's paths start: the folder, or a stand-in root for an S3 location."""
    if isinstance(location, S3Location):
        return S3_ROOT / location.bucket / (location.prefix or "_")
    return Path(location)


def open_store(location: StorageLocation, settings: S3Config) -> Store:
    """The store at `location` (created on first use for a folder)."""
    if not isinstance(location, S3Location):
        return Store(Path(location))
    client = s3_client(settings)
    presigner = s3_client(settings, public=True) if settings.public_endpoint else client
    root = store_root(location)
    backend = S3Backend(client, location.bucket, location.prefix, PurePosixPath(root), presigner)
    return Store(root, backend, metadata_ttl=settings.metadata_ttl)


def probe_stores(locations: list[StorageLocation], settings: S3Config) -> None:
    """Check every S3 store before it is used: `ConfigError` with one line naming the
    cause (unreachable endpoint, missing bucket, credentials, no conditional writes)."""
    for location in locations:
        if isinstance(location, S3Location):
            s3client.probe(s3_client(settings), location.bucket, location.prefix)
