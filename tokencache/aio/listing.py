"""Listings of the asyncio store: async iterators that can also be awaited whole.

No sync twin: a sync listing is a plain iterator. ``async for token in
store.tokens()`` reads the index a page at a time, as the sync ``for`` does;
``await store.tokens()`` gives the whole list, which is what the asyncio
``tokens()`` returned before it was paged, so callers written for that keep
working.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator
from typing import Any, ParamSpec, TypeVar

__all__ = ["Listing", "listing"]

T = TypeVar("T")
P = ParamSpec("P")


class Listing(AsyncIterator[T]):
    """The items of an async iterator, one at a time (``async for``) or as a list (``await``)."""

    __slots__ = ("_items",)

    def __init__(self, items: AsyncIterator[T]) -> None:
        self._items = items

    def __aiter__(self) -> Listing[T]:
        return self

    async def __anext__(self) -> T:
        return await anext(self._items)

    def __await__(self) -> Generator[Any, None, list[T]]:
        return self._all().__await__()

    async def _all(self) -> list[T]:
        return [item async for item in self._items]

    async def aclose(self) -> None:
        """Stop early: let the listing's generator clean up now rather than when it is collected."""
        if isinstance(self._items, AsyncGenerator):
            await self._items.aclose()


def listing(method: Callable[P, AsyncIterator[T]]) -> Callable[P, Listing[T]]:
    """Make an async generator function return a :class:`Listing` (its signature is kept)."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Listing[T]:
        return Listing(method(*args, **kwargs))

    return wrapper
