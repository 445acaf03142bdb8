"""The one thread hop: disk work and hashing run here, in a bounded thread pool.

Coroutines never call `open()`, `os.*` or hash large buffers themselves; they
`await offload.run(store.method, …)`. The only calls made inline on the event
loop are the cheap metadata reads named in `INLINE_SAFE` (a tag file, a
revision link, a cached manifest: a few hundred bytes from the page cache),
where a thread hop would cost more than the read.

One other pool exists: `regproxy.sockbody` reads large request and upstream bodies
straight from their sockets on threads of its own, so a client that stalls mid-body
never holds a storage thread; the writes and hashing it drives go through the same
storage calls (`Uploads.appender`, `BlobFlight.write_sync`) from those threads.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

#: Store methods the server and the proxy may call on the event loop for a local store
#: (`Offload.metadata`): small metadata reads (a stat or two, a tag file, a cached manifest)
#: and `blob_path` (no I/O at all). Everything else goes through `Offload.run`;
#: tests/storage/test_aio.py holds the code to this list.
INLINE_SAFE = frozenset(
    {
        "blob_path",
        "blob_size",
        "cached_tags",
        "get_manifest",
        "has_blob",
        "repository_exists",
        "tag_age",
    }
)


class Offload:
    """A bounded thread pool for blocking storage work."""

    def __init__(self, workers: int = 16, name: str = "regproxy-io") -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, **kwargs) if kwargs else functools.partial(fn, *args)
        return await loop.run_in_executor(self._executor, call)

    async def metadata(
        self, local: bool, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """A small metadata read of a store (one of `INLINE_SAFE`): inline on the event loop
        when the store is `local` (a stat costs less than a thread hop), on a thread when
        it is a network round trip away (an object store)."""
        if local:
            return fn(*args, **kwargs)
        return await self.run(fn, *args, **kwargs)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
