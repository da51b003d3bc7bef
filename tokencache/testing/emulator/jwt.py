"""RS256 JWT-bearer assertions, verified the way Google's token endpoint does.

Strict by design: a lenient decoder would accept the malformed or mis-signed assertions that
a real endpoint refuses, and tests would pass against the emulator and fail against Google.
The signature is checked before any claim is trusted; every refusal is a ``_GrantError`` with
Google's error code.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from .messages import _GrantError
from .registry import _Key

CLOCK_SKEW = 30  # seconds of iat/exp leeway: Google allows a little clock drift, and so does the emulator
MAX_ASSERTION_LIFETIME = 3600  # Google refuses assertions valid for more than an hour
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _b64url_decode(segment: str) -> bytes:
    """Decode unpadded base64url strictly: lenient decoders skip junk and hide malformed JWTs."""
    if not _B64URL.fullmatch(segment):
        raise _GrantError("invalid_grant", "Invalid JWT: a segment is not base64url")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise _GrantError("invalid_grant", "Invalid JWT: a segment is not base64url") from exc


def _json_segment(segment: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64url_decode(segment))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _GrantError("invalid_grant", "Invalid JWT: a segment is not JSON") from exc
    if not isinstance(value, dict):
        raise _GrantError("invalid_grant", "Invalid JWT: header and claims must be JSON objects")
    return value


def _decode_jwt(assertion: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """Split a compact JWS into header, claims, signing input and signature (none verified yet)."""
    parts = assertion.split(".")
    if len(parts) != 3:
        raise _GrantError("invalid_grant", "Invalid JWT: expected three dot-separated segments")
    header, claims = _json_segment(parts[0]), _json_segment(parts[1])
    signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
    return header, claims, signing_input, _b64url_decode(parts[2])


def _verify_signature(keys: list[_Key], signing_input: bytes, signature: bytes) -> _Key:
    """Return the key whose RS256 signature matches; claims are only trusted after this."""
    if not keys:
        raise _GrantError("invalid_grant", "Invalid JWT Signature: unknown key id (kid)")
    for key in keys:
        try:
            key.public_key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            continue
        return key
    raise _GrantError("invalid_grant", "Invalid JWT Signature: signature does not match the key")


def _check_claims(claims: dict[str, Any], email: str, audiences: tuple[str, ...], now: float) -> str:
    """Check iss, aud, iat/exp and scope of a signed assertion; return the requested scope."""
    if claims.get("iss") != email:
        raise _GrantError("invalid_grant", f"Invalid JWT: iss must be the key's client_email {email}")
    if claims.get("aud") not in audiences:
        raise _GrantError("invalid_grant", f"Invalid JWT: wrong audience; expected {audiences[0]}")
    _check_times(claims.get("iat"), claims.get("exp"), now)
    scope = claims.get("scope")
    if not isinstance(scope, str) or not scope.strip():
        raise _GrantError("invalid_scope", "Invalid OAuth scope: the assertion has no scope claim")
    return scope


def _check_times(iat: Any, exp: Any, now: float) -> None:
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (iat, exp))
    if not numbers:
        raise _GrantError("invalid_grant", "Invalid JWT: iat and exp must be numeric")
    if exp + CLOCK_SKEW < now:
        raise _GrantError("invalid_grant", "Invalid JWT: assertion expired (exp is in the past)")
    if iat - CLOCK_SKEW > now:
        raise _GrantError("invalid_grant", "Invalid JWT: iat is in the future")
    if exp - iat > MAX_ASSERTION_LIFETIME:
        raise _GrantError("invalid_grant", "Invalid JWT: assertion lifetime exceeds 60 minutes")
