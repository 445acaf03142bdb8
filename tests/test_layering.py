"""Each layer imports nothing from the layers above it (cli → server → proxy → storage → leaves).

Checked in a fresh interpreter per module, so one test's imports cannot hide another's.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

#: what each layer must not pull in
ABOVE_LEAVES = ["regproxy.storage", "regproxy.proxy", "regproxy.server", "regproxy.cli"]
ABOVE_STORAGE = ["regproxy.proxy", "regproxy.server", "regproxy.cli", "aiohttp", "click", "rich"]
ABOVE_ACCESS = ["regproxy.storage", "regproxy.proxy", "regproxy.server", "aiohttp"]
ABOVE_PROXY = ["regproxy.server", "regproxy.cli", "click", "rich"]
ABOVE_SERVER = ["regproxy.cli", "click", "rich"]

LAYERS = {
    # module: packages it must not pull in
    "regproxy.errors": [*ABOVE_LEAVES, "aiohttp"],
    # large HTTP bodies off aiohttp: a leaf used by both server and proxy, duck-typed
    "regproxy.sockbody": [*ABOVE_LEAVES, "aiohttp"],
    # body senders on threads: leaves, no aiohttp (asyncio_tls fences asyncio's internals)
    "regproxy.direct_send": [*ABOVE_LEAVES, "aiohttp"],
    "regproxy.splice_relay": [*ABOVE_LEAVES, "aiohttp"],
    "regproxy.tls_sender": [*ABOVE_LEAVES, "aiohttp"],
    "regproxy.asyncio_tls": [*ABOVE_LEAVES, "aiohttp"],
    "regproxy.server.tls_suites": [*ABOVE_SERVER, "aiohttp"],
    # aiohttp's internals fenced in: a leaf over aiohttp and sockbody, for server and proxy
    "regproxy.aiohttp_adapter": [*ABOVE_LEAVES, "click", "rich"],
    "regproxy.digest": ABOVE_LEAVES,
    "regproxy.reference": ABOVE_LEAVES,
    "regproxy.manifest": ABOVE_LEAVES,
    "regproxy.config": [*ABOVE_LEAVES, "aiohttp"],
    "regproxy.storage.layout": ABOVE_STORAGE,
    "regproxy.storage.fs": ABOVE_STORAGE,
    "regproxy.storage.aio": ABOVE_STORAGE,
    "regproxy.storage.runs": ABOVE_STORAGE,
    "regproxy.storage.store": ABOVE_STORAGE,
    "regproxy.storage.gc": ABOVE_STORAGE,
    "regproxy.storage.uploads": ABOVE_STORAGE,
    "regproxy.storage.verify": ABOVE_STORAGE,
    "regproxy.storage.inventory": ABOVE_STORAGE,
    "regproxy.storage.intake": ABOVE_STORAGE,
    "regproxy.storage.replicas": ABOVE_STORAGE,
    # boto3 only when a client is built: a store is on S3
    "regproxy.storage.s3client": [*ABOVE_STORAGE, "boto3", "botocore"],
    "regproxy.storage.s3": [*ABOVE_STORAGE, "boto3", "botocore"],
    "regproxy.storage.stores": [*ABOVE_STORAGE, "boto3", "botocore"],
    "regproxy.access.policy": ABOVE_ACCESS,
    "regproxy.access.tokens": ABOVE_ACCESS,
    "regproxy.access.htpasswd": ABOVE_ACCESS,
    "regproxy.access.throttle": ABOVE_ACCESS,
    "regproxy.proxy.prefetch": ABOVE_PROXY,
    "regproxy.proxy.cache": ABOVE_PROXY,
    "regproxy.proxy.upstream": ABOVE_PROXY,
    # the ops listener uses health and metrics; they know neither it nor each other
    "regproxy.server.health": [*ABOVE_SERVER, "regproxy.server.metrics", "regproxy.server.ops"],
    "regproxy.server.metrics": [*ABOVE_SERVER, "regproxy.server.health", "regproxy.server.ops"],
    "regproxy.server.ops": ABOVE_SERVER,
    "regproxy.server.app": ABOVE_SERVER,
    "regproxy.server.budget": ABOVE_SERVER,
    "regproxy.server.peer": ABOVE_SERVER,
    # the web page sits beside the API handlers: server keys and stores, never the CLI
    "regproxy.ui": ABOVE_SERVER,
}
#: the only package that imports inside functions (each command's module when it runs)
LAZY_IMPORTS = "cli"


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
    """`regproxy serve` imports neither rich, boto3 (only for stores on S3) nor the offline
    commands' modules (RSS)."""
    loaded = modules_loaded_by("from regproxy.cli import main; main.get_command(None, 'serve')")
    assert "regproxy.cli.serve" in loaded
    for module in ("rich", "boto3", "regproxy.cli.gc", "regproxy.cli.ls", "regproxy.cli.verify"):
        assert module not in loaded, f"serve pulls in {module}"


def test_no_import_hidden_in_a_function() -> None:
    """A function-local import of a regproxy module hides a cycle from the checks above."""
    package = Path(__file__).resolve().parents[1] / "regproxy"
    hidden = []
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).parts[0] == LAZY_IMPORTS:
            continue
        for function in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                if any(n == "regproxy" or n.startswith("regproxy.") for n in names):
                    hidden.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    assert not hidden, f"imports inside functions: {hidden}"
