"""Failed sign-ins cannot starve storage (issue 11, item 5).

bcrypt once ran on the storage thread pool: 24 clients sending wrong passwords
raised a legitimate push from 16 ms to 6.8 s. Now password checks run on a pool
of their own, at most `MAX_PENDING_CHECKS` wait at once, and each client address
has a budget of failures.
"""

from __future__ import annotations

import asyncio
import base64
import os
import statistics
import threading
import time
from pathlib import Path

import bcrypt

from regproxy.access.throttle import FailureThrottle
from regproxy.server import auth
from tests.support.auth import auth_config
from tests.support.digests import sha256
from tests.support.inprocess import make_config, start_client


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_throttle_allows_a_burst_then_one_per_refill() -> None:
    throttle = FailureThrottle(burst=3, refill=10.0, max_clients=2)
    for _ in range(3):
        assert throttle.retry_after("a", now=0.0) == 0
        throttle.failed("a", now=0.0)
    assert 9.9 < throttle.retry_after("a", now=0.0) <= 10.0
    assert throttle.retry_after("a", now=10.0) == 0
    assert throttle.retry_after("b", now=0.0) == 0  # another client is not affected
    throttle.failed("b", now=0.0)
    throttle.failed("c", now=0.0)  # bounded memory: the oldest bucket goes
    assert len(throttle._buckets) == 2


async def test_wrong_passwords_are_throttled_per_client(tmp_path: Path) -> None:
    config = make_config(tmp_path, auth=auth_config(tmp_path, "basic"))
    client = await start_client(config)
    try:
        statuses = []
        for _ in range(auth.FailureThrottle().burst + 3):
            async with client.get("/v2/", headers=basic("alice", "wrong")) as resp:
                statuses.append(resp.status)
                if resp.status == 429:
                    assert int(resp.headers["Retry-After"]) >= 1
                    assert (await resp.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert statuses[: auth.FailureThrottle().burst] == [401] * auth.FailureThrottle().burst
        assert statuses[-1] == 429
    finally:
        await client.close()


async def test_password_floods_leave_storage_alone(tmp_path: Path) -> None:
    """24 addresses guess passwords of a costly entry while root pushes: the checks run on
    the bcrypt threads only, never more than the cap at once, and pushes stay quick."""
    cost = 10  # a few tens of milliseconds per check, like a real htpasswd -B entry
    htpasswd = tmp_path / "htpasswd"
    lines = [
        f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=rounds)).decode()}"
        for user, pw, rounds in (("victim", "right", cost), ("root", "root-secret", 4))
    ]
    htpasswd.write_text("\n".join(lines) + "\n")
    config = make_config(
        tmp_path,
        auth=auth_config(tmp_path, "basic", htpasswd=str(htpasswd)),
        server={"trust_forwarded_headers": True},
    )
    client = await start_client(config)
    authenticator = client.app[auth.AUTH]
    threads: set[str] = set()
    peak = 0
    check = authenticator.htpasswd.check

    def spying_check(user: str, password: str) -> bool:
        nonlocal peak
        threads.add(threading.current_thread().name)
        peak = max(peak, authenticator.pending_checks)
        return check(user, password)

    authenticator.htpasswd.check = spying_check  # type: ignore[method-assign]
    stop = asyncio.Event()
    answers: list[int] = []

    async def attacker(number: int) -> None:
        headers = {**basic("victim", f"guess{number}"), "X-Forwarded-For": f"10.9.0.{number}"}
        while not stop.is_set():
            async with client.get("/v2/", headers=headers) as resp:
                answers.append(resp.status)
                if resp.status == 429:
                    await asyncio.sleep(0.05)

    async def push_once() -> float:
        blob = os.urandom(2048)
        started = time.perf_counter()
        url = f"/v2/misc/app/blobs/uploads/?digest={sha256(blob)}"
        async with client.post(url, data=blob, headers=basic("root", "root-secret")) as resp:
            assert resp.status == 201
        return time.perf_counter() - started

    try:
        await push_once()  # root's check is remembered from here on
        attackers = [asyncio.create_task(attacker(n)) for n in range(24)]
        await asyncio.sleep(0.5)
        latencies = [await push_once() for _ in range(10)]
        stop.set()
        await asyncio.gather(*attackers)
    finally:
        await client.close()
    assert threads and all(name.startswith("regproxy-bcrypt") for name in threads), threads
    assert peak <= auth.MAX_PENDING_CHECKS
    assert 401 in answers and 429 in answers
    # measured, not timed: the old code took seconds per push under this flood
    assert statistics.median(latencies) < 1.0, latencies
