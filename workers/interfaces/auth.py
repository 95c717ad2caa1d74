"""Tokens bound to institutions, shared by the REST API and the web console.

``SPRIM_API_TOKENS`` (JSON ``{"token": "institution"}``, ``"*"`` = all institutions) is the one
token table. The console keeps no token in the browser: its session cookie holds the SHA-256 of
the token, when it was issued, a nonce, and an HMAC of them under ``SPRIM_CONSOLE_SECRET`` (a random key
per process when unset). Every request looks the digest up in the token table again, so a token
removed from the table ends its sessions at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from functools import lru_cache

from workers.core.config import settings

#: A DICOM UID as sprim looks it up (digits and dots, at most 64 characters).
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
#: Request priorities of a reprocess -> job priority (2 urgent: a radiologist is waiting).
PRIORITIES = {"urgent": 2, "normal": 1, "low": 0}
#: A console session lasts this long after login.
SESSION_S = 12 * 3600


def tokens() -> dict[str, str]:
    """The token table: token -> institution (``"*"``: all)."""
    raw = settings().api_tokens
    return json.loads(raw) if raw else {}


def institution_for(token: str) -> str | None:
    """The institution a token is bound to; None for an unknown token (constant-time compare)."""
    found = None
    for tok, inst in tokens().items():
        if hmac.compare_digest(tok.encode(), token.encode()):
            found = inst
    return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@lru_cache
def _key() -> bytes:
    configured = settings().console_secret
    return configured.encode() if configured else secrets.token_bytes(32)


def _mac(*parts: str) -> str:
    msg = "|".join(parts).encode()
    return base64.urlsafe_b64encode(hmac.new(_key(), msg, hashlib.sha256).digest()).decode()


def session_cookie(token: str, now: float | None = None) -> str:
    """The cookie value of a session for ``token`` (which must be in the table)."""
    d = base64.urlsafe_b64encode(_digest(token)).decode()
    issued = str(int(now if now is not None else time.time()))
    nonce = secrets.token_urlsafe(12)  # each login its own session (and CSRF token)
    return f"{d}.{issued}.{nonce}.{_mac('session', d, issued, nonce)}"


def session_institution(cookie: str | None, now: float | None = None) -> str | None:
    """The institution of a valid, unexpired session cookie whose token is still in the table."""
    if not cookie or cookie.count(".") != 3 or len(cookie) > 256:
        return None
    d, issued, nonce, mac = cookie.split(".")
    if not hmac.compare_digest(mac, _mac("session", d, issued, nonce)) or not issued.isdigit():
        return None
    if (now if now is not None else time.time()) - int(issued) > SESSION_S:
        return None
    found = None
    for tok, inst in tokens().items():
        if hmac.compare_digest(base64.urlsafe_b64encode(_digest(tok)).decode(), d):
            found = inst
    return found


def csrf_token(cookie: str) -> str:
    """The form token bound to one session (synchronizer token, no server-side state)."""
    return _mac("csrf", cookie)[:32]


def csrf_ok(cookie: str | None, given: str | None) -> bool:
    if not cookie or not given:
        return False
    return hmac.compare_digest(csrf_token(cookie), given)
