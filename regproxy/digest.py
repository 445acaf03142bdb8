"""Content digests: parse and validate `algorithm:hex`, and hash streams."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Protocol

from regproxy.errors import DigestInvalid

#: Supported algorithms and the length of their lowercase hex encoding.
HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")
_GENERIC = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated digest; `str()` gives the canonical `algorithm:hex` form."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse `text`, raising `DigestInvalid` for anything we cannot verify."""
        algorithm, sep, encoded = text.partition(":")
        if not sep or not _GENERIC.fullmatch(text):
            raise DigestInvalid("invalid digest format", detail={"digest": text[:200]})
        length = HEX_LENGTHS.get(algorithm)
        if length is None:
            raise DigestInvalid(
                f"unsupported digest algorithm {algorithm!r}", detail={"digest": text[:200]}
            )
        if len(encoded) != length or not _HEX.fullmatch(encoded):
            raise DigestInvalid("invalid digest encoding", detail={"digest": text[:200]})
        return cls(algorithm, encoded)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> Hasher:
        """A fresh hasher of this digest's algorithm."""
        return new_hasher(self.algorithm)


def is_digest(text: str) -> bool:
    """True when `text` has the shape of a digest (a tag never contains ':')."""
    return ":" in text


def new_hasher(algorithm: str = "sha256") -> Hasher:
    return hashlib.new(algorithm)


def of_bytes(data: bytes, algorithm: str = "sha256") -> Digest:
    """The digest of a small in-memory buffer (manifests); blobs are hashed off-loop."""
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())
