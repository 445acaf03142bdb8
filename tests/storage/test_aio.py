"""`storage.aio.INLINE_SAFE` is what the code does: every Store call on the event loop is in it.

A static scan of `regproxy/server` and `regproxy/proxy`: each call of a `Store` method
on something that reads as a store (`store`, `self.cache.store`, `app[REGISTRY]`, …)
must be named in `INLINE_SAFE`, unless it sits in a function handed to `.run(…)` (the
thread pool). A new inline call of a blocking method fails here instead of stalling
every request in production; a list entry nobody calls inline any more fails too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from regproxy.storage.aio import INLINE_SAFE
from regproxy.storage.store import Store

PACKAGE = Path(__file__).resolve().parents[2] / "regproxy"
SCANNED = ("server", "proxy")
STORE_METHODS = frozenset(
    name for name, value in vars(Store).items() if callable(value) and not name.startswith("_")
)


def _looks_like_a_store(receiver: ast.expr) -> bool:
    text = ast.unparse(receiver)
    return "store" in text.lower() or "REGISTRY" in text


def _offloaded(tree: ast.Module) -> set[str]:
    """Names of functions passed to `<offload>.run(fn, …)`: they run in the thread pool."""
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "run"
            and node.args
        ):
            first = node.args[0]
            if isinstance(first, ast.Attribute):
                names.add(first.attr)
            elif isinstance(first, ast.Name):
                names.add(first.id)
    return names


def inline_store_calls(path: Path) -> Iterator[tuple[str, int, str]]:
    """(method, line, call) of every Store call not made from an offloaded function."""
    tree = ast.parse(path.read_text(), str(path))
    offloaded = _offloaded(tree)

    def visit(node: ast.AST, function: str | None) -> Iterator[tuple[str, int, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from visit(child, child.name)
                continue
            if (
                function not in offloaded
                and isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr in STORE_METHODS
                and _looks_like_a_store(child.func.value)
            ):
                yield child.func.attr, child.lineno, ast.unparse(child.func)
            # `offload.metadata(local, store.method, …)` runs the method inline on disk
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr == "metadata"
                and len(child.args) >= 2
                and isinstance(child.args[1], ast.Attribute)
                and child.args[1].attr in STORE_METHODS
                and _looks_like_a_store(child.args[1].value)
            ):
                yield child.args[1].attr, child.lineno, ast.unparse(child.args[1])
            yield from visit(child, function)

    yield from visit(tree, None)


def _scanned_files() -> list[Path]:
    return sorted(p for folder in SCANNED for p in (PACKAGE / folder).rglob("*.py"))


def test_every_inline_store_call_is_listed() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {call}"
        for path in _scanned_files()
        for method, line, call in inline_store_calls(path)
        if method not in INLINE_SAFE
    ]
    assert not offenders, "blocking Store calls on the event loop (use Offload.run):\n" + "\n".join(
        offenders
    )


def test_every_listed_method_exists_and_is_used_inline() -> None:
    unknown = INLINE_SAFE - STORE_METHODS
    assert not unknown, f"not Store methods: {sorted(unknown)}"
    used = {method for path in _scanned_files() for method, _, _ in inline_store_calls(path)}
    unused = INLINE_SAFE - used
    assert not unused, f"listed but never called inline: {sorted(unused)}"


def test_the_scan_sees_inline_and_offloaded_calls(tmp_path: Path) -> None:
    """The scanner itself: an inline call is found, one in an offloaded function is not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "async def handler(request, store):\n"
        "    store.put_manifest('a', b'', None, None)\n"
        "    await request.app[OFFLOAD].run(store.delete_tag, 'a', 'b')\n"
        "    await offload.run(_forget, store)\n"
        "    await offload.metadata(store.backend.local, store.has_blob, 'd')\n"
        "def _forget(store):\n"
        "    store.delete_tag('a', 'b')\n"
    )
    calls = [call for _, _, call in inline_store_calls(sample)]
    assert calls == ["store.put_manifest", "store.has_blob"]
