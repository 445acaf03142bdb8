"""The one content-digest helper of the tests, so every module computes digests alike."""

from __future__ import annotations

import hashlib


def sha256(data: bytes) -> str:
    """`sha256:<hex>` of `data`: the digest a registry gives these bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()
