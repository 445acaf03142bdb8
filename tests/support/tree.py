"""What may exist on disk: the store trees drawn in `regproxy/storage/layout.py`.

`unexpected_paths` lists every file (and symlink) under a folder that is not where a
store, the upload area or the proxy spool keeps things; `bad_blobs` lists blob files
whose bytes do not hash to their name. Both are independent re-statements of the
layout, so a write that escapes it (path traversal, a stray temp file) shows up.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from regproxy.config import Config

_NAME = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
_TAG = r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}"
_DIGEST_PATH = r"(?:sha256/[0-9a-f]{64}|sha512/[0-9a-f]{128})"
STORE_FILE = re.compile(
    r"lock"
    r"|blobs/(?:sha256/([0-9a-f]{2})/([0-9a-f]{64})|sha512/([0-9a-f]{2})/([0-9a-f]{128}))"
    rf"|repositories/{_NAME}/(?:_tags/{_TAG}|_manifests/{_DIGEST_PATH}|_layers/{_DIGEST_PATH}"
    rf"|_referrers/{_DIGEST_PATH}/(?:sha256-[0-9a-f]{{64}}|sha512-[0-9a-f]{{128}})|_pulled)"
    r"|tmp/\.tmp-[0-9a-f]{32}"
    # replicas (`storage.replicas`): each one's record, claims on blob fetches
    r"|replicas/[0-9a-f]{8}|claims/(?:sha256/[0-9a-f]{64}|sha512/[0-9a-f]{128})"
)
TEMP_FILE = re.compile(
    r"uploads/[0-9a-f]{32}/(?:data|info)|spool/[0-9a-f]{16}-[0-9a-f]{32}|replica-id"
)


def all_files(root: Path) -> set[Path]:
    """Every non-directory entry below `root` (symlinks to directories included)."""
    found: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            found.add(Path(dirpath, name))
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                found.add(Path(dirpath, name))
    return found


def unexpected_paths(
    config: Config, top: Path, allowed: frozenset[Path] = frozenset()
) -> list[str]:
    """Files below `top` that are outside the store trees of `config`, or off their layout
    (`allowed`: files the test itself put there, such as the htpasswd file)."""
    stores = [Path(config.registry_storage), Path(config.proxy_storage)]
    temp = Path(config.temporary_registry_storage)
    bad = []
    for path in sorted(all_files(top)):
        if path.is_symlink():
            bad.append(f"symlink {path}")
            continue
        for root in stores:
            if path.is_relative_to(root):
                rel = path.relative_to(root).as_posix()
                if STORE_FILE.fullmatch(rel):
                    break
                bad.append(str(path))
                break
        else:
            if path.is_relative_to(temp):
                if not TEMP_FILE.fullmatch(path.relative_to(temp).as_posix()):
                    bad.append(str(path))
            elif path not in allowed:
                bad.append(str(path))
    return bad


def bad_blobs(root: Path) -> list[str]:
    """Blob files under `root/blobs` whose content does not hash to their name."""
    bad = []
    for algorithm in ("sha256", "sha512"):
        base = root / "blobs" / algorithm
        if not base.is_dir():
            continue
        for path in base.glob("*/*"):
            hasher = hashlib.new(algorithm)
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    hasher.update(block)
            if hasher.hexdigest() != path.name or path.parent.name != path.name[:2]:
                bad.append(str(path))
    return bad
