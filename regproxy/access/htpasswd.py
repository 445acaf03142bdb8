"""Users from an htpasswd file with bcrypt entries (`user:$2y$…`).

bcrypt is deliberately slow (tens of milliseconds), so successful checks are
remembered for a few minutes, keyed by the user, a hash of the password and the
user's entry in the file. Unknown users still pay one bcrypt check, so timing
does not tell which user names exist.

Any change to the file takes effect for the next request: every lookup stats
the file (one syscall) and re-reads it when its identity, size or times
changed, or when it was modified so recently that a second change within the
same timestamp tick could hide behind an unchanged stat. A removed user, or
one whose entry changed, no longer matches any remembered check. A file that
disappears or stops parsing admits nobody until it is mended (fail closed).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import bcrypt

from regproxy.errors import ConfigError

log = logging.getLogger("regproxy.auth")

CACHE_SECONDS = 300.0
#: bcrypt uses the first 72 bytes of a password (htpasswd -B too); bcrypt>=5 raises on more
MAX_PASSWORD_BYTES = 72
#: a file modified less than this long ago is re-read on every lookup (timestamps are coarse)
RACY_SECONDS = 2.0
_MAX_REMEMBERED = 10_000
_DUMMIES: dict[int, bytes] = {}
_DUMMY_LOCK = threading.Lock()


def _dummy_like(users: dict[str, bytes]) -> bytes:
    """A hash for unknown users that costs what the file's entries cost (no timing oracle).

    Blocking (it may run bcrypt once per cost): call it where `check` runs, off the loop.
    """
    cost = 10
    for hashed in users.values():
        parts = hashed.split(b"$")
        if len(parts) > 2 and parts[2].isdigit() and 4 <= int(parts[2]) <= 31:
            cost = int(parts[2])
            break
    with _DUMMY_LOCK:
        if cost not in _DUMMIES:
            _DUMMIES[cost] = bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds=cost))
        return _DUMMIES[cost]


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


def _secret(password: str) -> bytes | None:
    """The password's bytes, or None for text that no client can have typed (lone surrogates)."""
    try:
        return password.encode()
    except UnicodeEncodeError:
        return None


class Htpasswd:
    """A reloading htpasswd file with a cache of recent successful checks."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature: tuple[int, ...] | None = None
        self._racy_until = 0.0
        self._content: bytes | None = None
        self._users: dict[str, bytes] = {}
        #: (user, sha256(password)) → (expiry, the user's entry when it was checked)
        self._verified: dict[tuple[str, bytes], tuple[float, bytes]] = {}
        try:
            self._users = parse_htpasswd(self.path.read_text(encoding="utf-8"), str(self.path))
        except OSError as exc:
            raise ConfigError(f"auth.htpasswd: cannot read {self.path}: {exc.strerror}") from None
        self.refresh()

    # ---- keeping up with the file -------------------------------------------------------

    def _racy(self) -> bool:
        return time.time() <= self._racy_until

    def refresh(self) -> None:
        """Re-read the file if it may have changed since the last look (one stat otherwise)."""
        try:
            st = os.stat(self.path)
            signature = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:
            signature = None
        if signature is not None and signature == self._signature and not self._racy():
            return
        try:
            content = self.path.read_bytes()
            users = parse_htpasswd(content.decode("utf-8"), str(self.path))
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            content, users = None, {}
            if self._content is not None or self._signature != signature:
                log.warning("auth.htpasswd unusable, nobody can sign in until it is: %s", exc)
        with self._lock:
            if content != self._content:
                self._users = users
                self._verified.clear()
                self._content = content
            self._signature = signature
            mtime = st.st_mtime if signature is not None else 0.0
            self._racy_until = mtime + RACY_SECONDS

    def entry(self, user: str) -> bytes | None:
        """The user's current hash in the file (after a refresh), or None when absent."""
        self.refresh()
        with self._lock:
            return self._users.get(user)

    def stamp(self, user: str) -> str | None:
        """A short fingerprint of the user's entry: changes when the password does; None
        when the user is gone. Tokens carry it, so they die with the entry."""
        entry = self.entry(user)
        return None if entry is None else hashlib.sha256(entry).hexdigest()[:16]

    # ---- checking passwords -------------------------------------------------------------

    def check(self, user: str, password: str) -> bool:
        """True when `password` is `user`'s. Blocking (bcrypt): call it off the event loop."""
        secret = _secret(password)
        stored = self.entry(user)
        with self._lock:
            users = self._users
        against = stored if stored is not None else _dummy_like(users)
        try:
            ok = bcrypt.checkpw((secret or b"")[:MAX_PASSWORD_BYTES], against)
        except ValueError:  # a malformed entry in the file: nobody logs in with it
            ok = False
        ok = ok and stored is not None and secret is not None
        if ok:
            assert stored is not None and secret is not None
            key = (user, hashlib.sha256(secret).digest())
            with self._lock:
                if len(self._verified) >= _MAX_REMEMBERED:
                    self._verified.clear()
                self._verified[key] = (time.monotonic() + CACHE_SECONDS, stored)
        return ok

    def cached(self, user: str, password: str) -> bool:
        """A recent successful check of this very entry, answered without bcrypt (safe on
        the event loop: a stat, and a read of the small file only when it changed)."""
        secret = _secret(password)
        if secret is None:
            return False
        stored = self.entry(user)
        if stored is None:
            return False
        key = (user, hashlib.sha256(secret).digest())
        with self._lock:
            remembered = self._verified.get(key)
        return (
            remembered is not None and remembered[0] > time.monotonic() and remembered[1] == stored
        )
