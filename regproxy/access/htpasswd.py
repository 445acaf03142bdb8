"""Users from an htpasswd file with bcrypt entries (`user:$2y$…`).

bcrypt is deliberately slow (tens of milliseconds), so successful checks are
remembered for a few minutes, keyed by a hash of the password, and the file is
re-read when it changes. Unknown users still pay one bcrypt check, so timing
does not tell which user names exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from pathlib import Path

import bcrypt

from regproxy.errors import ConfigError

CACHE_SECONDS = 300.0
_DUMMY_HASH = bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds=10))
#: bcrypt uses the first 72 bytes of a password (htpasswd -B too); bcrypt>=5 raises on more
MAX_PASSWORD_BYTES = 72
_DUMMIES: dict[int, bytes] = {}


def _dummy_like(users: dict[str, bytes]) -> bytes:
    """A hash for unknown users that costs what the file's entries cost (no timing oracle)."""
    for hashed in users.values():
        parts = hashed.split(b"$")
        cost = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
        if 4 <= cost <= 31:
            if cost not in _DUMMIES:
                _DUMMIES[cost] = bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds=cost))
            return _DUMMIES[cost]
    return _DUMMY_HASH


def parse_htpasswd(text: str, source: str = "htpasswd") -> dict[str, bytes]:
    """`user:hash` lines (comments and blank lines allowed); only bcrypt hashes are accepted."""
    users: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise ConfigError(f"{source}:{number}: expected user:hash")
        if not hashed.startswith(("$2y$", "$2b$", "$2a$")):
            raise ConfigError(f"{source}:{number}: only bcrypt entries are supported (htpasswd -B)")
        users[user] = hashed.encode()
    return users


class Htpasswd:
    """A reloading htpasswd file with a cache of recent successful checks."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._users: dict[str, bytes] = {}
        self._dummy = _DUMMY_HASH
        self._verified: dict[tuple[str, bytes], float] = {}
        self._reload()

    def _reload(self) -> None:
        try:
            stat = os.stat(self.path)
            if stat.st_mtime == self._mtime:
                return
            users = parse_htpasswd(self.path.read_text(encoding="utf-8"), str(self.path))
        except OSError as exc:
            raise ConfigError(f"auth.htpasswd: cannot read {self.path}: {exc.strerror}") from None
        dummy = _dummy_like(users)
        with self._lock:
            self._users = users
            self._dummy = dummy
            self._mtime = stat.st_mtime
            self._verified.clear()

    def check(self, user: str, password: str) -> bool:
        """True when `password` is `user`'s. Blocking (bcrypt): call it off the event loop."""
        with contextlib.suppress(ConfigError):
            self._reload()  # on failure keep the users we had; the file may be mid-rewrite
        secret = password.encode()
        key = (user, hashlib.sha256(secret).digest())
        now = time.monotonic()
        with self._lock:
            expires = self._verified.get(key)
            stored = self._users.get(user)
            dummy = self._dummy
        if expires is not None and expires > now and stored is not None:
            return True
        against = stored if stored is not None else dummy
        try:
            ok = bcrypt.checkpw(secret[:MAX_PASSWORD_BYTES], against)
        except ValueError:  # a malformed entry in the file: nobody logs in with it
            ok = False
        ok = ok and stored is not None
        if ok:
            with self._lock:
                if len(self._verified) > 10_000:
                    self._verified.clear()
                self._verified[key] = now + CACHE_SECONDS
        return ok

    def cached(self, user: str, password: str) -> bool:
        """A recent successful check, answered without bcrypt (safe on the event loop)."""
        key = (user, hashlib.sha256(password.encode()).digest())
        with self._lock:
            expires = self._verified.get(key)
        return expires is not None and expires > time.monotonic()
