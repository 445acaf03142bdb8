"""Failed sign-ins per client, limited by a token bucket with a bounded memory.

Each client (an address) may fail `burst` times at once, then once every
`refill` seconds. A client past its allowance is refused before any bcrypt
check runs, so guessing passwords costs the server nothing once the bucket is
empty. At most `max_clients` buckets are kept; the least recently used is
dropped first, and a dropped bucket is a full one, which errs towards letting a
forgotten client try again rather than towards locking anybody out.
"""

from __future__ import annotations

import time
from collections import OrderedDict


class FailureThrottle:
    def __init__(self, burst: int = 10, refill: float = 6.0, max_clients: int = 10_000) -> None:
        self.burst = burst
        self.refill = refill
        self.max_clients = max_clients
        #: client → (tokens left, when they were counted)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, client: str, now: float) -> float:
        tokens, since = self._buckets.get(client, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - since) / self.refill)

    def retry_after(self, client: str, now: float | None = None) -> float:
        """0 when `client` may try to sign in now, else the seconds until it may."""
        now = time.monotonic() if now is None else now
        tokens = self._tokens(client, now)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) * self.refill

    def failed(self, client: str, now: float | None = None) -> None:
        """Count one failed sign-in of `client`."""
        now = time.monotonic() if now is None else now
        tokens = max(0.0, self._tokens(client, now) - 1.0)
        self._buckets[client] = (tokens, now)
        self._buckets.move_to_end(client)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
