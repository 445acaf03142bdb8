"""A soak: pushers and gc loops running together against a live registry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sized
from typing import Protocol


class SoakLedger(Protocol):
    """What a soak's pushers and gc loops record: the gc runs and the acknowledged images."""

    @property
    def gc_runs(self) -> Sized: ...

    @property
    def acked(self) -> Sized: ...


async def soak(
    tasks: list[asyncio.Task[None]],
    stop: asyncio.Event,
    ledger: SoakLedger,
    seconds: float,
    gc_runs: int,
    acked: int,
    longest: float,
) -> None:
    """Let `tasks` run for `seconds`, then on until `ledger` holds `gc_runs` gc runs and
    more than `acked` acknowledged images (a loaded machine pushes and collects less per
    second), up to `longest`. A task that fails fails the test at once; on the way out
    `stop` is set and every task is awaited."""
    started = time.monotonic()
    try:
        while (elapsed := time.monotonic() - started) < seconds or (
            (len(ledger.gc_runs) < gc_runs or len(ledger.acked) <= acked) and elapsed < longest
        ):
            await asyncio.sleep(0.2)
            for task in tasks:
                if task.done():
                    task.result()  # a failed pusher or gc fails the test now
    finally:
        stop.set()
        await asyncio.gather(*tasks)
