"""How many bytes of request bodies the server holds in memory at once, all requests together.

Manifests are read whole before they are checked, so 200 connections each sending a
4 MiB manifest once took 800 MiB. Each such body first reserves its size here (its
Content-Length, or the cap when the length is unknown); when the budget is spent the
request waits a moment for room and is then refused with 429, which clients retry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from regproxy.errors import TooManyRequests

#: how long a body may wait for room before it is refused
WAIT_SECONDS = 5.0


class MemoryBudget:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._room = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, size: int, wait: float = WAIT_SECONDS) -> AsyncIterator[None]:
        """Reserve `size` bytes (at most the whole budget) for the body of `with`."""
        size = min(size, self.capacity)
        async with self._room:
            try:
                async with asyncio.timeout(wait):
                    await self._room.wait_for(lambda: self.used + size <= self.capacity)
            except TimeoutError:
                raise TooManyRequests(
                    "the server holds as many request bodies as it can; retry shortly",
                    headers={"Retry-After": "1"},
                ) from None
            self.used += size
        try:
            yield
        finally:
            async with self._room:
                self.used -= size
                self._room.notify_all()
