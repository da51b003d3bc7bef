"""Memos for the hot read path: what ``find()`` would otherwise redo on every call.

``find()`` sits on every outgoing request of every web worker, so it should
cost the Redis round trip and little more. Two things dominate the rest:
turning ``(info, sub)`` into a validated, normalized, escaped key, and turning
the HGETALL reply into a validated :class:`Token`. Both give the same answer
for the same input, so each is remembered: the key per ``(info, sub)``, the
token per hash key for as long as Redis returns the very same fields.
Validation still runs once for every new input, and a malformed hash is
never remembered.
"""

from __future__ import annotations

from collections.abc import Mapping

from tokencache.constants import MEMO_LIMIT
from tokencache.core.record import from_fields
from tokencache.keys import Keys, TokenKey, parse_info
from tokencache.token import Token

__all__ = ["KeyMemo", "TokenMemo"]


class KeyMemo:
    """``(info, sub)`` -> ``(TokenKey, Redis key)``."""

    def __init__(self, keys: Keys, limit: int = MEMO_LIMIT) -> None:
        self._keys = keys
        self._limit = limit
        self._memo: dict[tuple[object, object], tuple[TokenKey, str]] = {}

    def get(self, info: object, sub: object) -> tuple[TokenKey, str]:
        """The key for ``info``/``sub``; TypeError/ValueError naming a bad argument, as parse_info."""
        try:
            found = self._memo.get((info, sub))
        except TypeError:  # unhashable: parse_info says what is wrong with it
            key = parse_info(info, sub)  # type: ignore[arg-type]
            return key, self._keys.token(key)
        if found is None:
            key = parse_info(info, sub)  # type: ignore[arg-type]
            found = (key, self._keys.token(key))
            if len(self._memo) >= self._limit:
                self._memo.clear()
            self._memo[(info, sub)] = found
        return found


class TokenMemo:
    """Hash key -> (the HGETALL reply it was parsed from, the Token)."""

    def __init__(self, limit: int = MEMO_LIMIT) -> None:
        self._limit = limit
        self._memo: dict[str, tuple[Mapping[bytes, bytes], Token]] = {}

    def parse(self, redis_key: str, raw: Mapping[bytes, bytes]) -> Token:
        """The Token in ``raw``, or MalformedRecord (see :func:`tokencache.core.record.from_fields`)."""
        hit = self._memo.get(redis_key)
        if hit is not None and hit[0] == raw:
            return hit[1]
        token = from_fields(raw)
        if len(self._memo) >= self._limit:
            self._memo.clear()
        self._memo[redis_key] = (raw, token)
        return token
