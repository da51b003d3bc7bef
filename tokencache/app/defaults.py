"""Module-level ``tokencache.store/find/for_scope/delete/invalidate/tokens`` on a store from the environment.

Built lazily on first use (so importing tokencache never connects anywhere)
and shared by every thread of the process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from rq.job import Job

from tokencache import env
from tokencache.app.tokenstore import TokenStore
from tokencache.token import Token

__all__ = [
    "default_store",
    "delete",
    "find",
    "for_scope",
    "invalidate",
    "reset_default_store",
    "store",
    "tokens",
]

_store: TokenStore | None = None
_lock = threading.Lock()


def default_store() -> TokenStore:
    """The process's TokenStore, built from ``TOKENCACHE_*`` on first use."""
    global _store
    with _lock:
        if _store is None:
            _store = TokenStore.from_url(None, near_cache=env.near_cache())
        return _store


def reset_default_store() -> None:
    """Drop the default store so the next call reads the environment again."""
    global _store
    with _lock:
        if _store is not None:
            _store.close()
        _store = None


def store(token: Token, info: object = None, sub: str | None = None) -> Job | None:
    """:meth:`TokenStore.store` on the default store."""
    return default_store().store(token, info, sub)


def find(info: object, sub: str | None = None) -> Token | None:
    """:meth:`TokenStore.find` on the default store."""
    return default_store().find(info, sub)


def for_scope(info: object, sub: str | None = None, timeout: float = 30.0) -> Token:
    """:meth:`TokenStore.for_scope` on the default store."""
    return default_store().for_scope(info, sub, timeout)


def delete(info: object, sub: str | None = None) -> bool:
    """:meth:`TokenStore.delete` on the default store."""
    return default_store().delete(info, sub)


def invalidate(info: object, token: Token | str, sub: str | None = None) -> bool:
    """:meth:`TokenStore.invalidate` on the default store."""
    return default_store().invalidate(info, token, sub)


def tokens() -> Iterator[Token]:
    """:meth:`TokenStore.tokens` on the default store."""
    return default_store().tokens()
