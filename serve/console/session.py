"""Who is signed in to the console: the key, sealed (encrypted and authenticated) into an HTTP-only,
same-site cookie, with the session's CSRF token beside it. Nothing is kept server-side, so any
gateway behind the same address reads any gateway's cookie (they share `console_secret`, or the
admin key it is derived from).

A cookie is only as good as its seal: Fernet (AES-CBC + HMAC-SHA256, a timestamp checked against the
session's lifetime) from `cryptography`; the key never reaches the URL, the page or the browser's
script-readable storage.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import secrets
from dataclasses import asdict, dataclass
from typing import Literal

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lorafleet.serve.settings import Settings

__all__ = ["SESSION_COOKIE", "LOGIN_COOKIE", "ConsoleUser", "Sealer", "sealer_for", "same_token"]

SESSION_COOKIE = "lorafleet_console"
# the sign-in form's own CSRF token (double submit), before any session
LOGIN_COOKIE = "lorafleet_console_login"

log = logging.getLogger("lorafleet.console")


@dataclass(frozen=True)
class ConsoleUser:
    """A signed-in console user: a tenant (its own things) or the admin (every tenant, limits,
    engines)."""

    role: Literal["tenant", "admin"]
    name: str  # the tenant's name, or "admin"
    key: str
    csrf: str  # sent back by every form as `csrf`

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    @classmethod
    def new(cls, role: Literal["tenant", "admin"], name: str, key: str) -> ConsoleUser:
        return cls(role, name, key, secrets.token_urlsafe(32))


class Sealer:
    """Seals a `ConsoleUser` into a cookie value and opens it again within `max_age_s`."""

    def __init__(self, secret: bytes, max_age_s: int) -> None:
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"lorafleet console session"
        ).derive(secret)
        self._fernet = Fernet(base64.urlsafe_b64encode(key))
        self.max_age_s = max_age_s

    def seal(self, user: ConsoleUser) -> str:
        return self._fernet.encrypt(json.dumps(asdict(user)).encode()).decode("ascii")

    def open(self, token: str | None) -> ConsoleUser | None:
        """The user of a cookie value; None for a missing, altered, foreign or expired one."""
        if not token:
            return None
        try:
            return ConsoleUser(
                **json.loads(self._fernet.decrypt(token.encode("ascii"), ttl=self.max_age_s))
            )
        except (InvalidToken, UnicodeEncodeError, ValueError, TypeError):
            return None


def sealer_for(settings: Settings) -> Sealer:
    secret = settings.console_secret or settings.admin_key
    if secret is None:
        log.warning(
            "console sessions are sealed with a random key: set LORAFLEET_CONSOLE_SECRET "
            "(or the admin key) for sessions that survive a restart and span gateways"
        )
        raw = secrets.token_bytes(32)
    else:
        raw = secret.get_secret_value().encode()
    return Sealer(raw, int(settings.console_session_hours * 3600))


def same_token(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison of CSRF tokens; a missing one never matches."""
    return (
        bool(expected)
        and bool(given)
        and hmac.compare_digest(str(expected).encode(), str(given).encode())
    )
