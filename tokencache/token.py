"""The Token value and how to talk about its life (fresh, stale, invalid).

A Token is what Goth's ``%Goth.Token{}`` is: an access token with its scope,
absolute expiry in whole Unix seconds, and the account and subject it was
issued for. It validates itself at construction so a bad value never reaches
Redis, and it never shows the access token in its ``repr``.
"""

from __future__ import annotations

import enum
import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Any

from tokencache.constants import EXPIRY_SKEW, FINGERPRINT_LENGTH, MAX_EXPIRES

__all__ = ["Freshness", "Token", "fingerprint", "mask", "scrub"]


class Freshness(enum.Enum):
    """google-auth's three states of a token's life."""

    FRESH = "fresh"  # usable, no refresh due
    STALE = "stale"  # usable, but inside the refresh margin: a refresh is due
    INVALID = "invalid"  # expired (or about to): never handed out


def mask(secret: str) -> str:
    """Show enough of a token to tell two apart in a log, never enough to use it."""
    if len(secret) <= 12:
        return "…"
    return f"{secret[:7]}…{secret[-3:]}"


_SECRET_SHAPED = re.compile(r"\bya29\.[\w.-]+|\beyJ[\w-]+\.[\w-]+\.[\w-]*")
"""A Google access token (``ya29.``) or a JWT (a signed assertion, an ID token) inside free text."""


def scrub(text: str) -> str:
    """Free text (an endpoint's error) with anything shaped like an access token or a JWT masked.

    The errors tokencache keeps hold none that we know of; this is for the one we do not know yet."""
    return _SECRET_SHAPED.sub(lambda found: mask(found.group()), text)


def fingerprint(secret: str) -> str:
    """A name for an access token that the audit trail and a log may show: a sha256 prefix, never the token.

    Compare it with ``fingerprint(token)`` of a token in hand to tell which one an entry is about.
    """
    return hashlib.sha256(secret.encode()).hexdigest()[:FINGERPRINT_LENGTH]


def _require_text(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        kind = "a string or None" if optional else "a string"
        raise TypeError(f"Token.{name} must be {kind}, not {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"Token.{name} must not be empty")


_B64TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
"""RFC 6750's b64token, what an access token in an ``Authorization: Bearer`` header is made of."""


def _require_b64token(value: str) -> None:
    """Refuse an access token outside RFC 6750's alphabet, naming where, never showing the value:
    printed by ``tokencache token`` or sent in a header, a control character in it would do harm."""
    if _B64TOKEN.fullmatch(value):
        return
    bad = next(i for i, char in enumerate(value) if not _B64TOKEN.fullmatch(char))  # '=' inside counts
    raise ValueError(
        "Token.token must be an RFC 6750 b64token ([A-Za-z0-9._~+/-]+ then '=' padding); "
        f"character {bad + 1} of {len(value)} is not"
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Token:
    """An OAuth2 access token as cached for the whole fleet."""

    token: str = field(repr=False)
    type: str = "Bearer"
    scope: str
    expires: int
    sub: str | None = None
    account: str | None = None

    def __post_init__(self) -> None:
        _require_text("token", self.token)
        _require_b64token(self.token)
        _require_text("type", self.type)
        _require_text("scope", self.scope)
        _require_text("sub", self.sub, optional=True)
        _require_text("account", self.account, optional=True)
        if isinstance(self.expires, bool) or not isinstance(self.expires, int):
            raise TypeError(
                f"Token.expires must be whole Unix seconds (int), not {type(self.expires).__name__}"
            )
        if not 0 <= self.expires <= MAX_EXPIRES:
            raise ValueError(
                f"Token.expires must be a Unix time from 0 to {MAX_EXPIRES} (year 9999), not {self.expires}"
            )

    def __repr__(self) -> str:
        return (
            f"Token(token={mask(self.token)!r}, type={self.type!r}, scope={self.scope!r}, "
            f"expires={self.expires}, sub={self.sub!r}, account={self.account!r})"
        )

    def expires_in(self, now: float | None = None) -> float:
        """Seconds of life left (negative once expired)."""
        return self.expires - (time.time() if now is None else now)

    def freshness(self, refresh_before: float, now: float | None = None) -> Freshness:
        """Where this token stands in its life, given the refresh margin."""
        left = self.expires_in(now)
        if left <= EXPIRY_SKEW:
            return Freshness.INVALID
        if left <= refresh_before:
            return Freshness.STALE
        return Freshness.FRESH

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data (the access token included: handle with care)."""
        return {
            "token": self.token,
            "type": self.type,
            "scope": self.scope,
            "expires": self.expires,
            "sub": self.sub,
            "account": self.account,
        }
