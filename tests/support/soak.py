"""A soak: pushers and gc loops running together against a live registry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def soak(
    tasks: list[asyncio.Task[None]],
    stop: asyncio.Event,
    *,
    seconds: float,
    enough: Callable[[], bool],
    longest: float,
) -> None:
    """Let `tasks` run for `seconds`, then on until `enough()` says the run proved
    something (a loaded machine pushes and collects less per second), up to `longest`.
    A task that fails fails the test at once; on the way out `stop` is set and every
    task is awaited."""
    started = time.monotonic()
    try:
        while (elapsed := time.monotonic() - started) < seconds or (
            not enough() and elapsed < longest
        ):
            await asyncio.sleep(0.2)
            for task in tasks:
                if task.done():
                    task.result()  # a failed pusher or gc fails the test now
    finally:
        stop.set()
        await asyncio.gather(*tasks)
