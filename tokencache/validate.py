"""Argument checks shared by the public calls: each raises TypeError or ValueError naming the argument.

One home, so that ``TokenStore``, its asyncio twin and the adapters refuse bad
input with the same words, before anything is sent to Redis.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "NAMESPACE_PATTERN",
    "check_access_token",
    "check_count",
    "check_flag",
    "check_name",
    "check_namespace",
    "check_refresh_before",
    "check_scopes",
    "check_timeout",
]


NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""What a namespace may be: a short label without ``:`` (so no namespace's keys can be another's), glob
characters (``* ? [ ] \\``: ACL key patterns and SCAN MATCH would read them as patterns) or whitespace."""

RESERVED_NAMESPACES = frozenset({"rq"})
"""RQ's own prefix: a namespace ``rq`` would put tokens among RQ's jobs and queues (``rq:*`` ACL rules)."""


def check_namespace(value: object) -> str:
    """A namespace: ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``, not ``rq`` (TypeError/ValueError naming it).

    Every key of a namespace starts with ``{namespace}:``; with no ``:`` in any namespace, two namespaces
    never share a key, however their accounts, scopes and subjects are spelled.
    """
    if not isinstance(value, str):
        raise TypeError(f"namespace must be a string, not {type(value).__name__}")
    if not NAMESPACE_PATTERN.fullmatch(value) or value in RESERVED_NAMESPACES:
        raise ValueError(
            f"namespace {value!r} is not allowed: use 1 to 64 letters, digits, '_', '.' or '-', starting "
            "with a letter or digit, and not 'rq' (no ':', glob characters or spaces, so that no namespace "
            "can reach into another's keys)"
        )
    return value


def check_refresh_before(value: object) -> int:
    """``refresh_before``: whole, non-negative seconds."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"refresh_before must be whole seconds (int), not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"refresh_before must not be negative, got {value}")
    return value


def check_timeout(timeout: object) -> float:
    """A wait's ``timeout``: a positive number of seconds."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    return float(timeout)


def check_count(name: str, value: object) -> int:
    """A number of things to start (``num_workers``): a whole number, at least 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number (int), not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def check_flag(name: str, value: object) -> bool:
    """An on/off option (``near_cache``): True or False, not merely truthy."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {type(value).__name__}")
    return value


def check_name(name: str, value: object) -> str | None:
    """An optional account or subject: None, or a non-empty string (TypeError/ValueError naming it)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string or None, not {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{name} must be a non-empty string or None")
    return value


def check_access_token(value: object) -> str:
    """The ``token`` an API rejected: the access-token string (a ``Token`` is unwrapped by the caller)."""
    if not isinstance(value, str):
        raise TypeError(
            f"token must be a tokencache.Token or an access-token string, not {type(value).__name__}"
        )
    if not value.strip():
        raise ValueError("token must be a non-empty access token")
    return value


def check_scopes(scopes: object, name: str = "scopes") -> list[str] | None:
    """Scopes as google-auth keeps them: a list of strings, or None when there are none."""
    if scopes is None:
        return None
    if isinstance(scopes, str):
        parts = scopes.replace(",", " ").split()
    elif isinstance(scopes, Sequence) and not isinstance(scopes, bytes | bytearray):
        parts = list(scopes)
        for part in parts:
            if not isinstance(part, str):
                raise TypeError(f"{name} must be strings, got {type(part).__name__} {part!r}")
            if not part.strip():
                raise ValueError(f"{name} must not contain empty scopes, got {scopes!r}")
    else:
        raise TypeError(f"{name} must be a string or a sequence of strings, not {type(scopes).__name__}")
    return parts or None
