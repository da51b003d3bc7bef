"""tokencache for asyncio: the same store on ``redis.asyncio``.

Same keys, same hash layout, same refresh job and the same wake-up channel as
the synchronous :class:`tokencache.TokenStore`, so async and sync processes of
one fleet share tokens and single-flight fetches::

    from tokencache import aio

    store = aio.TokenStore.from_url("redis://localhost:6379/0")
    token = await store.for_scope("https://www.googleapis.com/auth/cloud-platform")
    token = await aio.find(scope)          # a default store from the environment
    async for token in aio.tokens(): ...   # or: await aio.tokens() for a list

The package mirrors :mod:`tokencache.app` file for file (``tokenstore``,
``fleet``, ``defaults``), as redis-py's ``redis.asyncio`` mirrors ``redis``: a
diff of two twins shows little more than ``async`` and ``await``, because the
decisions live in the I/O-free :mod:`tokencache.app.core` and
:class:`tokencache.app.fleet.FleetFetchCore`. What has no sync twin has a
module of its own that says why (``recorder``, ``listing``, ``locks``).
tests/test_aio_parity.py fails when the public signatures of the twins drift.
"""

from __future__ import annotations

from tokencache.aio.defaults import (
    aclose_default,
    default_store,
    delete,
    find,
    for_scope,
    invalidate,
    store,
    tokens,
)
from tokencache.aio.tokenstore import TokenStore

__all__ = [  # noqa: RUF022 - in the order of tokencache.__all__
    # the store
    "TokenStore",
    # module-level calls on this event loop's default store
    "store",
    "find",
    "for_scope",
    "delete",
    "invalidate",
    "tokens",
    "default_store",
    "aclose_default",
]
