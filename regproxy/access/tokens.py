"""Short-lived signed bearer tokens (compact JWS, HS256) for the Docker token flow.

A token names its subject (user or empty for anonymous), the service it is for,
its expiry, the repository actions it grants and a stamp of the subject's
password entry (so a removed user or a changed password ends its tokens). Signatures are compared in
constant time; anything malformed, expired, for another service or tampered
with is rejected as a whole.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_HEADER = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())


@dataclass(frozen=True, slots=True)
class Grant:
    subject: str | None
    access: dict[str, frozenset[str]]  # repository name → actions
    expires: float
    stamp: str | None = None  # the subject's password-entry stamp when it was issued

    def permits(self, name: str, action: str) -> bool:
        return action in self.access.get(name, frozenset())


class TokenSigner:
    def __init__(self, key: bytes | None, service: str, ttl: float) -> None:
        self.key = key or secrets.token_bytes(32)
        self.service = service
        self.ttl = ttl

    def _sign(self, message: bytes) -> str:
        return _b64(hmac.new(self.key, message, hashlib.sha256).digest())

    def issue(
        self,
        subject: str | None,
        access: dict[str, list[str]],
        now: float | None = None,
        stamp: str | None = None,
    ) -> tuple[str, int]:
        """A token and its lifetime in seconds."""
        now = time.time() if now is None else now
        lifetime = int(self.ttl)
        claims = {
            "iss": self.service,
            "aud": self.service,
            "sub": subject or "",
            "iat": int(now),
            "exp": int(now) + lifetime,
            "jti": secrets.token_hex(8),
            "access": [
                {"type": "repository", "name": name, "actions": sorted(actions)}
                for name, actions in access.items()
            ],
        }
        if stamp is not None:
            claims["stm"] = stamp
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{_HEADER}.{payload}"
        return f"{signing_input}.{self._sign(signing_input.encode())}", lifetime

    def verify(self, token: str, now: float | None = None) -> Grant | None:
        """The grant of a valid token, or None."""
        if not token.isascii():  # header bytes beyond ASCII: never one of ours
            return None
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != _HEADER:
            return None
        expected = self._sign(f"{parts[0]}.{parts[1]}".encode())
        if not hmac.compare_digest(expected.encode(), parts[2].encode()):
            return None
        try:
            claims = json.loads(_unb64(parts[1]))
        except ValueError:
            return None
        now = time.time() if now is None else now
        if not isinstance(claims, dict) or claims.get("aud") != self.service:
            return None
        exp = claims.get("exp")
        if not isinstance(exp, int) or exp <= now:
            return None
        access: dict[str, frozenset[str]] = {}
        for entry in claims.get("access") or []:
            if isinstance(entry, dict) and entry.get("type") == "repository":
                name, actions = entry.get("name"), entry.get("actions")
                if isinstance(name, str) and isinstance(actions, list):
                    access[name] = frozenset(a for a in actions if isinstance(a, str))
        subject = claims.get("sub") or None
        stamp = claims.get("stm")
        return Grant(
            subject if isinstance(subject, str) else None,
            access,
            float(exp),
            stamp if isinstance(stamp, str) else None,
        )
