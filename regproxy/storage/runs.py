"""Status files of offline runs (`gc`, `verify`) for the server's /metrics.

The commands run in their own processes, so they leave a small JSON file per
command in `<temporary_registry_storage>/status/`, with running totals, and the
server reads it when scraped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from regproxy.storage.layout import temp_name

log = logging.getLogger("regproxy.runs")

STATUS_DIR = "status"


def record_run(
    temp_root: Path, command: str, ok: bool, seconds: float, bytes_freed: int = 0
) -> None:
    """Note a finished `gc`/`verify` run for the server's /metrics (best effort, atomic).

    The file keeps running totals, so the scrape can show counters across runs.
    """
    folder = Path(temp_root) / STATUS_DIR
    path = folder / f"{command}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        previous = read_run(path) or {}
        status = {
            "runs": int(previous.get("runs", 0)) + 1,
            "failures": int(previous.get("failures", 0)) + (0 if ok else 1),
            "bytes_freed": int(previous.get("bytes_freed", 0)) + bytes_freed,
            "last_finished": time.time(),
            "last_seconds": seconds,
            "last_ok": ok,
        }
        tmp = temp_name(folder, command)
        tmp.write_text(json.dumps(status))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot record the %s run in %s: %s", command, folder, exc.strerror)


def read_run(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
