"""Memos for the hot read path: what ``find()`` would otherwise redo on every call.

``find()`` sits on every outgoing request of every web worker, so it should
cost the Redis round trip and little more. Two things dominate the rest:
turning ``(info, sub)`` into a validated, normalized, escaped key, and turning
the HGETALL reply into a validated :class:`Token`. Both give the same answer
for the same input, so each is remembered: the key per ``(info, sub)``, the
token per hash key for as long as Redis returns the very same fields.
Validation still runs once for every new input, and a malformed hash is
never remembered. With encryption on, the same memo means a token is
decrypted once per write, not once per ``find()``.

A third memo remembers the opposite: the keys a read had to skip because they
are malformed or hold another Redis type (:data:`bad_keys`). Every read that
meets one (``find()`` on every request, repair every second) counts it in
``tokencache_bad_keys_total``, but the warning naming it is logged once per
process, until the key is seen good again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

from tokencache import metrics
from tokencache.constants import MEMO_LIMIT
from tokencache.core.record import from_fields
from tokencache.crypto import Keyring
from tokencache.keys import Keys, TokenKey, parse_info
from tokencache.token import Token

__all__ = ["WRONG_TYPE", "BadKeys", "KeyMemo", "TokenMemo", "bad_keys"]

log = logging.getLogger(__name__)

WRONG_TYPE = (
    "it holds another Redis type than tokencache writes there (WRONGTYPE): someone else's data, so it "
    "is left alone; look at it with redis-cli TYPE, and remove it (redis-cli DEL) to let tokencache "
    "use the key again"
)
"""Why a key of the wrong type is skipped, and what to do about it."""


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
    """Hash key -> (the HGETALL reply it was parsed from, the Token, decrypted with ``ring``)."""

    def __init__(self, ring: Keyring, limit: int = MEMO_LIMIT) -> None:
        self._ring = ring
        self._limit = limit
        self._memo: dict[str, tuple[Mapping[bytes, bytes], Token]] = {}

    def parse(self, redis_key: str, raw: Mapping[bytes, bytes]) -> Token:
        """The Token in ``raw``; MalformedRecord or EncryptionError (see
        :func:`tokencache.core.record.from_fields`)."""
        hit = self._memo.get(redis_key)
        if hit is not None and hit[0] == raw:
            return hit[1]
        token = from_fields(raw, redis_key=redis_key, ring=self._ring)
        bad_keys.good(redis_key)
        if len(self._memo) >= self._limit:
            self._memo.clear()
        self._memo[redis_key] = (raw, token)
        return token


class BadKeys:
    """Keys reads skipped (malformed, or of the wrong type): each counted every time, logged once.

    Per process, bounded: past ``limit`` keys it starts over (and may log a key again). A key seen
    good again (:meth:`good`) is forgotten, so it is logged again if it goes bad again.
    """

    def __init__(self, limit: int = MEMO_LIMIT) -> None:
        self._limit = limit
        self._reported: dict[str, str] = {}
        self._lock = threading.Lock()
        self._collectors: ContextVar[dict[str, str] | None] = ContextVar("tokencache_bad_keys", default=None)

    def skip(self, redis_key: str, why: str, where: metrics.Where) -> None:
        """Report that the read ``where`` skipped ``redis_key`` because of ``why``."""
        metrics.record_bad_key(where)
        collected = self._collectors.get()
        if collected is not None:
            collected.setdefault(redis_key, why)
        with self._lock:
            if redis_key in self._reported:
                return
            if len(self._reported) >= self._limit:
                self._reported.clear()
            self._reported[redis_key] = why
        log.warning("skipping %s (read by %s): %s", redis_key, where, why)

    def good(self, redis_key: str) -> None:
        """``redis_key`` was read fine: log it again if it goes bad again."""
        if self._reported:  # almost always empty: no lock, no lookup
            with self._lock:
                self._reported.pop(redis_key, None)

    @contextmanager
    def collect(self) -> Iterator[dict[str, str]]:
        """Within the block, every key skipped in this context (thread, task) -> why, logged or not."""
        collected: dict[str, str] = {}
        token = self._collectors.set(collected)
        try:
            yield collected
        finally:
            self._collectors.reset(token)


bad_keys = BadKeys()
"""This process's record of the bad keys its reads met."""
