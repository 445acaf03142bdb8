"""regproxy: a container registry and a pull-through cache in one process."""

from __future__ import annotations

__all__ = ["__version__"]

try:  # a frozen binary carries its version in _version.py (written by the build script)
    # the module exists only in a frozen binary, never in the source tree mypy checks
    from regproxy._version import __version__  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on how it was installed
    try:
        from importlib.metadata import PackageNotFoundError, version

        __version__ = version("regproxy")
    except PackageNotFoundError:
        __version__ = "0.0.0+unknown"
