"""How a Token and its bookkeeping are laid out in the token's Redis hash.

The hash reads as the token under ``redis-cli HGETALL``: the Token's own fields
(``token type scope sub account expires``; ``sub``/``account`` empty for None)
followed by bookkeeping that tells an operator how its refreshes are going.

Bookkeeping is kept to what someone reads, because every field of a hash that
holds a ~200-byte token costs about 60 bytes per token: ``refresh_at``, and
``refreshed_at`` once the token was fetched. ``failures``, ``last_error``,
``last_error_at`` and ``gave_up_at`` appear while refreshes fail (no
``failures`` field means none); ``rejected_at`` once an API rejected the token
and the fleet evicted it (``invalidate()``): the hash stays, so that repair and
the refresh job still see the token, but nobody is handed it. A successful
write drops them all. The refresh
job's id is not stored: it is derived from the key (:meth:`Keys.job_id`).

With encryption on (:mod:`tokencache.crypto`), the ``token`` field holds the access token encrypted
under the hash's own Redis key, and only it: every other field stays readable. So every write and
read here takes that key and the process's :class:`~tokencache.crypto.Keyring`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tokencache.crypto import Keyring
from tokencache.errors import EncryptionError
from tokencache.token import Token

__all__ = [
    "REJECTED",
    "UNREADABLE",
    "Bookkeeping",
    "MalformedRecord",
    "field_number",
    "from_fields",
    "read_fields",
    "to_fields",
]

TOKEN_FIELDS = ("token", "type", "scope", "sub", "account", "expires")
REJECTED = b"rejected_at"
"""The field that marks an evicted token (see the module docstring); readers test for it on the hot path."""


class MalformedRecord(ValueError):
    """A token hash that cannot be read back as a Token (hand-edited, or written by something else)."""


def field_number(raw: bytes | None) -> float | None:
    """A numeric hash field as repair and status read it: None when absent or not a number (a hand-edited
    hash is reported elsewhere; these readers judge it as if the field were missing)."""
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def to_fields(
    token: Token, *, redis_key: str, ring: Keyring, refresh_at: int, refreshed_at: int | None
) -> dict[str, str]:
    """The hash of a token being written to ``redis_key``, bookkeeping reset (``refreshed_at``: when it
    was fetched); the access token encrypted if ``ring`` writes encrypted."""
    fields = {
        "token": ring.seal(token.token, redis_key),
        "type": token.type,
        "scope": token.scope,
        "sub": token.sub or "",
        "account": token.account or "",
        "expires": str(token.expires),
        "refresh_at": str(refresh_at),
    }
    if refreshed_at is not None:
        fields["refreshed_at"] = str(refreshed_at)
    return fields


def _text(raw: Mapping[bytes, bytes], name: str) -> str:
    value = raw.get(name.encode())
    if value is None:
        raise MalformedRecord(f"field {name!r} is missing")
    try:
        return value.decode()
    except UnicodeDecodeError as e:
        raise MalformedRecord(f"field {name!r} is not UTF-8") from e


UNREADABLE = "undecryptable"
"""What the Token of a record this process cannot decrypt holds in place of its ``token`` field."""


def from_fields(raw: Mapping[bytes, bytes], *, redis_key: str, ring: Keyring) -> Token:
    """The Token stored in ``raw`` (an HGETALL reply of ``redis_key``), decrypted; MalformedRecord saying
    what is wrong, or EncryptionError naming the key id if ``ring`` cannot decrypt it."""
    values = _values(raw)
    values["token"] = ring.open(values["token"], redis_key)
    return _token(values)


def read_fields(
    raw: Mapping[bytes, bytes], *, redis_key: str, ring: Keyring
) -> tuple[Token, EncryptionError | None]:
    """As :func:`from_fields`, for readers that need every other field even when ``ring`` cannot decrypt
    the token (listings, the refresh job): then the Token holds :data:`UNREADABLE` in place of the
    stored field (which is no b64token: ``enc:`` has a colon, and a refused plaintext may be anything,
    or a planted token no listing must show), and the error says why. MalformedRecord as from_fields."""
    values = _values(raw)
    try:
        values["token"] = ring.open(values["token"], redis_key)
    except EncryptionError as e:
        values["token"] = UNREADABLE
        return _token(values), e
    return _token(values), None


def _values(raw: Mapping[bytes, bytes]) -> dict[str, str]:
    return {name: _text(raw, name) for name in TOKEN_FIELDS}


def _token(values: dict[str, str]) -> Token:
    try:
        expires = int(values["expires"])
    except ValueError:
        raise MalformedRecord(f"field 'expires' is not whole seconds: {values['expires']!r}") from None
    try:
        return Token(
            token=values["token"],
            type=values["type"],
            scope=values["scope"],
            expires=expires,
            sub=values["sub"] or None,
            account=values["account"] or None,
        )
    except (TypeError, ValueError) as e:
        raise MalformedRecord(str(e)) from e


@dataclass(frozen=True, slots=True)
class Bookkeeping:
    """What the hash says about a token's refreshes (for ``ls``/``status`` and the refresh job)."""

    refresh_at: int | None
    refreshed_at: int | None
    failures: int
    last_error: str | None
    rejected_at: int | None = None
    """When an API's rejection evicted the token (``invalidate()``); None while it may be handed out."""

    @classmethod
    def of(cls, raw: Mapping[bytes, bytes]) -> Bookkeeping:
        def number(name: str) -> int | None:
            value = raw.get(name.encode())
            try:
                return int(value) if value is not None else None
            except ValueError:
                return None

        error = raw.get(b"last_error")
        return cls(
            refresh_at=number("refresh_at"),
            refreshed_at=number("refreshed_at"),
            failures=number("failures") or 0,
            last_error=error.decode(errors="replace") if error else None,
            rejected_at=number("rejected_at"),
        )
