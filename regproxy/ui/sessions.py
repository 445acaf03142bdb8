"""Signed session cookies and CSRF tokens of the web page (only with `[auth]` on).

A session is `v1.<payload>.<signature>`: the payload (base64url JSON) names the
user, the expiry, a random nonce and the stamp of the user's htpasswd entry, so a
session dies with the password like a token does (`Authenticator.still_valid`).
The signature is an HMAC-SHA256 under a key derived from the token signer's key
(`[auth] signing_key_*`, or the per-process random one): the same key material as
tokens, but never a valid token nor the other way round.

CSRF: every state-changing form carries `HMAC(key, purpose:nonce)`. Signing in
binds it to a random pre-session cookie set with the form, signing out to the
session's nonce; both cookies are HttpOnly and SameSite=Strict, and the handlers
also refuse a foreign `Origin`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

SESSION_COOKIE = "regproxy_session"
LOGIN_COOKIE = "regproxy_login"
#: how long a sign-in lasts
SESSION_SECONDS = 12 * 3600
#: how long a login form may wait before it is posted
LOGIN_SECONDS = 3600
_MAX_COOKIE = 4096


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Session:
    user: str
    expires: float
    nonce: str
    stamp: str | None


class SessionSigner:
    def __init__(self, token_key: bytes) -> None:
        self.key = hmac.new(token_key, b"regproxy web page sessions v1", hashlib.sha256).digest()

    def _mac(self, message: str) -> str:
        return _b64(hmac.new(self.key, message.encode(), hashlib.sha256).digest())

    def issue(self, user: str, stamp: str | None, now: float | None = None) -> str:
        now = time.time() if now is None else now
        claims = {"u": user, "e": int(now) + SESSION_SECONDS, "n": secrets.token_hex(16)}
        if stamp is not None:
            claims["s"] = stamp
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"v1.{payload}.{self._mac('session:' + payload)}"

    def verify(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session of a valid, unexpired cookie; None for anything else."""
        if not cookie or len(cookie) > _MAX_COOKIE or not cookie.isascii():
            return None
        parts = cookie.split(".")
        if len(parts) != 3 or parts[0] != "v1":
            return None
        if not hmac.compare_digest(self._mac("session:" + parts[1]), parts[2]):
            return None
        try:
            claims = json.loads(_unb64(parts[1]))
        except ValueError:
            return None
        if not isinstance(claims, dict):
            return None
        user, expires = claims.get("u"), claims.get("e")
        nonce, stamp = claims.get("n"), claims.get("s")
        now = time.time() if now is None else now
        if not isinstance(user, str) or not user or not isinstance(nonce, str):
            return None
        if not isinstance(expires, int) or expires <= now:
            return None
        return Session(user, float(expires), nonce, stamp if isinstance(stamp, str) else None)

    # ---- CSRF ---------------------------------------------------------------------------

    def csrf(self, purpose: str, nonce: str) -> str:
        return self._mac(f"csrf:{purpose}:{nonce}")

    def csrf_ok(self, purpose: str, nonce: str | None, token: str | None) -> bool:
        if not nonce or not token or not token.isascii() or len(token) > 128:
            return False
        return hmac.compare_digest(self.csrf(purpose, nonce), token)

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_hex(16)
