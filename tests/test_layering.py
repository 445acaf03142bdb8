"""Each layer imports nothing from the layers above it (cli → server → proxy → storage → leaves).

Checked in a fresh interpreter per module, so one test's imports cannot hide another's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: what each layer must not pull in
ABOVE_LEAVES = ["regproxy.storage", "regproxy.proxy", "regproxy.server", "regproxy.cli"]
ABOVE_STORAGE = ["regproxy.proxy", "regproxy.server", "regproxy.cli", "aiohttp", "click", "rich"]
ABOVE_ACCESS = ["regproxy.storage", "regproxy.proxy", "regproxy.server", "aiohttp"]
ABOVE_PROXY = ["regproxy.server", "regproxy.cli", "click", "rich"]

LAYERS = {
    # module: packages it must not pull in
    "regproxy.errors": [*ABOVE_LEAVES, "aiohttp"],
    # large HTTP bodies off aiohttp: a leaf used by both server and proxy, duck-typed
    "regproxy.sockbody": [*ABOVE_LEAVES, "aiohttp"],
    "regproxy.digest": ABOVE_LEAVES,
    "regproxy.reference": ABOVE_LEAVES,
    "regproxy.manifest": ABOVE_LEAVES,
    "regproxy.config": [*ABOVE_LEAVES, "aiohttp"],
    "regproxy.storage.store": ABOVE_STORAGE,
    "regproxy.storage.gc": ABOVE_STORAGE,
    "regproxy.storage.uploads": ABOVE_STORAGE,
    "regproxy.storage.verify": ABOVE_STORAGE,
    "regproxy.storage.inventory": ABOVE_STORAGE,
    "regproxy.access.policy": ABOVE_ACCESS,
    "regproxy.access.tokens": ABOVE_ACCESS,
    "regproxy.proxy.prefetch": ABOVE_PROXY,
    "regproxy.proxy.cache": ABOVE_PROXY,
    "regproxy.server.app": ["regproxy.cli", "click", "rich"],
}


def modules_loaded_by(code: str) -> set[str]:
    """Every module a fresh interpreter has loaded after running `code`."""
    probe = f"import sys, json; {code}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_layer_imports_nothing_above_it(module: str) -> None:
    loaded = modules_loaded_by(f"import {module}")
    for forbidden in LAYERS[module]:
        offenders = [m for m in loaded if m == forbidden or m.startswith(forbidden + ".")]
        assert not offenders, f"{module} pulls in {offenders}"


def test_serve_loads_no_offline_command() -> None:
    """`regproxy serve` imports neither rich nor the offline commands' modules (RSS)."""
    loaded = modules_loaded_by("from regproxy.cli import main; main.get_command(None, 'serve')")
    assert "regproxy.cli.serve" in loaded
    for module in ("rich", "regproxy.cli.gc", "regproxy.cli.ls", "regproxy.cli.verify"):
        assert module not in loaded, f"serve pulls in {module}"
