"""Loaded by the server `access_log.py --toggle` starts (this folder is on its PYTHONPATH):
switches the access log off and on every `BENCH_LOG_TOGGLE` seconds and writes, for
each phase, whether the log was on, the requests answered, the server's CPU seconds and
the wall-clock time, to `BENCH_LOG_TOGGLE_OUT` (JSON lines). Nothing else changes:
one process, one heap, so the two phases differ only by the access log."""

from __future__ import annotations

import json
import logging
import os
import threading
import time

_PHASE = float(os.environ.get("BENCH_LOG_TOGGLE", "0") or 0)
_OUT = os.environ.get("BENCH_LOG_TOGGLE_OUT", "")


def _install() -> None:
    from regproxy.server import logs

    answered = [0]
    account = logs._account

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        answered[0] += 1
        return account(*args, **kwargs)

    logs._account = counting
    access = logging.getLogger("regproxy.access")

    def toggle() -> None:
        on = False
        with open(_OUT, "a", buffering=1) as out:
            while True:
                access.disabled = not on
                time.sleep(0.1)  # lines queued in the last phase are written by now
                count, cpu, wall = answered[0], time.process_time(), time.time()
                time.sleep(_PHASE)
                row = {
                    "on": on,
                    "requests": answered[0] - count,
                    "cpu": time.process_time() - cpu,
                    "start": wall,
                    "end": time.time(),
                }
                out.write(json.dumps(row) + "\n")
                on = not on

    threading.Thread(target=toggle, name="bench-log-toggle", daemon=True).start()


if _PHASE > 0 and _OUT:
    _install()
