"""Module-level ``tokencache.aio.store/find/for_scope/delete/invalidate/tokens``: a store per event loop.

The twin of :mod:`tokencache.app.defaults`. A ``redis.asyncio`` client belongs
to the event loop it first ran on, so each loop gets a store of its own, built
lazily from the environment on first use (importing never connects) and
dropped with its loop; :func:`aclose_default` closes the running loop's store
(the asyncio spelling of ``reset_default_store``).
"""

from __future__ import annotations

import asyncio
import weakref

from rq.job import Job

from tokencache import env
from tokencache.aio.listing import Listing
from tokencache.aio.tokenstore import TokenStore
from tokencache.token import Token

__all__ = [
    "aclose_default",
    "default_store",
    "delete",
    "find",
    "for_scope",
    "invalidate",
    "store",
    "tokens",
]

_stores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TokenStore] = weakref.WeakKeyDictionary()


def default_store() -> TokenStore:
    """The running event loop's TokenStore, built from ``TOKENCACHE_*`` on first use."""
    loop = asyncio.get_running_loop()
    if loop not in _stores:
        _stores[loop] = TokenStore.from_url(None, near_cache=env.near_cache())
    return _stores[loop]


async def aclose_default() -> None:
    """Close the running event loop's default store (call before the loop ends, e.g. at app shutdown)."""
    store = _stores.pop(asyncio.get_running_loop(), None)
    if store is not None:
        await store.aclose()


async def store(token: Token, info: object = None, sub: str | None = None) -> Job | None:
    """:meth:`TokenStore.store` on the default store."""
    return await default_store().store(token, info, sub)


async def find(info: object, sub: str | None = None) -> Token | None:
    """:meth:`TokenStore.find` on the default store."""
    return await default_store().find(info, sub)


async def for_scope(info: object, sub: str | None = None, timeout: float = 30.0) -> Token:
    """:meth:`TokenStore.for_scope` on the default store."""
    return await default_store().for_scope(info, sub, timeout)


async def delete(info: object, sub: str | None = None) -> bool:
    """:meth:`TokenStore.delete` on the default store."""
    return await default_store().delete(info, sub)


async def invalidate(info: object, token: Token | str, sub: str | None = None) -> bool:
    """:meth:`TokenStore.invalidate` on the default store."""
    return await default_store().invalidate(info, token, sub)


def tokens() -> Listing[Token]:
    """:meth:`TokenStore.tokens` on the default store (``async for`` it, or ``await`` it for a list)."""
    return default_store().tokens()
