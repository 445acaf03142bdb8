"""`direct_send.Senders.run`: the thread that sends a body keeps what it uses until it
ends, however the request awaiting it ends.

Why it matters: aiohttp may cancel a request's task more than once as a server stops,
and close its connection right after; a thread still writing to a descriptor (or with a
connection's TLS state) that the event loop has meanwhile closed or reused would write
into another connection. So `release` runs only once the thread has ended, and the slot
is freed only after it.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from regproxy.direct_send import STOP_CHECK, Senders

pytestmark = pytest.mark.timeout(30)


#: how long the sender below takes to notice `stop` (longer than one in `poll` may: the
#: checks right after the cancellation must come well before the thread ends)
NOTICE = 1.0


def waiting(stop: threading.Event, ended: threading.Event) -> None:
    """A sender that waits for its client until told to stop, and notices it late."""
    try:
        while not stop.wait(STOP_CHECK):
            pass
        time.sleep(NOTICE)
        raise InterruptedError("told to stop")
    finally:
        ended.set()


async def test_run_gives_the_result_and_releases_once() -> None:
    senders = Senders(2, "test-direct-send")
    released: list[BaseException | None] = []
    assert senders.take()
    await senders.run(lambda: None, threading.Event(), released.append)
    assert released == [None]
    assert senders.take()
    assert senders.take()  # both free again
    senders.free()
    senders.free()


async def test_a_failing_sender_raises_and_is_released_with_its_error() -> None:
    senders = Senders(1, "test-direct-send")
    released: list[BaseException | None] = []

    def fail() -> None:
        raise ConnectionResetError("gone")

    assert senders.take()
    with pytest.raises(ConnectionResetError):
        await senders.run(fail, threading.Event(), released.append)
    assert len(released) == 1 and isinstance(released[0], ConnectionResetError)
    assert senders.take()
    senders.free()


@pytest.mark.parametrize("cancels", [1, 2])
async def test_a_cancelled_request_leaves_the_thread_its_things_until_it_ends(
    cancels: int,
) -> None:
    """Cancelled (once, or again while it would wait): the request ends at once with
    `stop` set; `release` and the slot's freeing come only after the thread ended."""
    senders = Senders(1, "test-direct-send")
    stop, ended = threading.Event(), threading.Event()
    released: list[tuple[BaseException | None, bool]] = []

    def release(error: BaseException | None) -> None:
        released.append((error, ended.is_set()))

    assert senders.take()
    task = asyncio.create_task(senders.run(lambda: waiting(stop, ended), stop, release))
    await asyncio.sleep(0.05)
    for _ in range(cancels):
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stop.is_set()
    # the request did not wait for the thread: it has not been released (`release` would
    # have run before the request ended, had it waited), and its slot is still taken
    assert not released
    assert not senders.take()
    async with asyncio.timeout(NOTICE * 4):
        while not released:
            await asyncio.sleep(0.01)
    error, thread_had_ended = released[0]
    assert isinstance(error, InterruptedError) and thread_had_ended
    assert senders.take()
    senders.free()
