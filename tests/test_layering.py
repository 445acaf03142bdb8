"""Each layer imports nothing from the layers above it (cli → server → proxy → storage → leaves).

Checked in a fresh interpreter per module, so one test's imports cannot hide another's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LAYERS = {
    # module: packages it must not pull in
    "regproxy.errors": [
        "regproxy.storage",
        "regproxy.proxy",
        "regproxy.server",
        "regproxy.cli",
        "aiohttp",
    ],
    # large HTTP bodies off aiohttp: a leaf used by both server and proxy, duck-typed
    "regproxy.sockbody": [
        "regproxy.storage",
        "regproxy.proxy",
        "regproxy.server",
        "regproxy.cli",
        "aiohttp",
    ],
    "regproxy.digest": ["regproxy.storage", "regproxy.proxy", "regproxy.server", "regproxy.cli"],
    "regproxy.reference": ["regproxy.storage", "regproxy.proxy", "regproxy.server", "regproxy.cli"],
    "regproxy.manifest": ["regproxy.storage", "regproxy.proxy", "regproxy.server", "regproxy.cli"],
    "regproxy.config": [
        "regproxy.storage",
        "regproxy.proxy",
        "regproxy.server",
        "regproxy.cli",
        "aiohttp",
    ],
    "regproxy.storage.store": [
        "regproxy.proxy",
        "regproxy.server",
        "regproxy.cli",
        "aiohttp",
        "click",
        "rich",
    ],
    "regproxy.storage.gc": [
        "regproxy.proxy",
        "regproxy.server",
        "regproxy.cli",
        "aiohttp",
        "click",
        "rich",
    ],
    "regproxy.storage.uploads": [
        "regproxy.proxy",
        "regproxy.server",
        "regproxy.cli",
        "aiohttp",
        "click",
        "rich",
    ],
    "regproxy.storage.verify": [
        "regproxy.proxy",
        "regproxy.server",
        "regproxy.cli",
        "aiohttp",
        "click",
        "rich",
    ],
    "regproxy.storage.inventory": [
        "regproxy.proxy",
        "regproxy.server",
        "regproxy.cli",
        "aiohttp",
        "click",
        "rich",
    ],
    "regproxy.access.policy": ["regproxy.storage", "regproxy.proxy", "regproxy.server", "aiohttp"],
    "regproxy.access.tokens": ["regproxy.storage", "regproxy.proxy", "regproxy.server", "aiohttp"],
    "regproxy.proxy.prefetch": ["regproxy.server", "regproxy.cli", "click", "rich"],
    "regproxy.proxy.cache": ["regproxy.server", "regproxy.cli", "click", "rich"],
    "regproxy.server.app": ["regproxy.cli", "click", "rich"],
}


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_layer_imports_nothing_above_it(module: str) -> None:
    code = f"import sys, json; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    for forbidden in LAYERS[module]:
        offenders = [m for m in loaded if m == forbidden or m.startswith(forbidden + ".")]
        assert not offenders, f"{module} pulls in {offenders}"


def test_serve_loads_no_offline_command() -> None:
    """`regproxy serve` imports neither rich nor the offline commands' modules (RSS)."""
    code = (
        "import sys, json; from regproxy.cli import main; "
        "main.get_command(None, 'serve'); print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert "regproxy.cli.serve" in loaded
    for module in ("rich", "regproxy.cli.gc", "regproxy.cli.ls", "regproxy.cli.verify"):
        assert module not in loaded, f"serve pulls in {module}"
