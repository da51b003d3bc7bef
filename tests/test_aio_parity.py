"""The asyncio API is the sync API awaited: the twins' public signatures are compared, so they cannot drift.

Compared: every public method, classmethod, property and class attribute of
``tokencache.TokenStore`` and ``tokencache.aio.TokenStore`` (and the public
attributes an instance sets), and the module-level calls of ``tokencache`` and
``tokencache.aio``. Parameter names, kinds, defaults and annotations must match;
an annotation counts as the same modulo the asyncio spelling of a result
(``Awaitable[X]`` is ``X``; ``AsyncIterator[X]`` and ``Listing[X]`` are
``Iterator[X]``). Intended differences are the few in :data:`RENAMED`.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Callable
from functools import cached_property
from typing import Any

import fakeredis
import pytest

import tokencache
from tokencache import aio

RENAMED = {
    # sync name -> its asyncio name: the same call, spelled the asyncio way
    "close": "aclose",  # redis.asyncio's own spelling; a close() to await would read like the sync one
    "__enter__": "__aenter__",  # `async with store:` closes the store, as `with store:` does
    "__exit__": "__aexit__",
    "reset_default_store": "aclose_default",  # asyncio keeps a default store per event loop, closed with it
}

MODULE_CALLS = (
    "store",
    "find",
    "for_scope",
    "delete",
    "invalidate",
    "tokens",
    "default_store",
    "reset_default_store",
)
"""The module-level calls both packages offer (``tokencache`` exports more: the model, errors, adapters)."""

DUNDERS = {"__init__", "__enter__", "__exit__", "__aenter__", "__aexit__"}

_ASYNC_RESULT = [
    (re.compile(r"^Awaitable\[(.*)\]$"), r"\1"),
    (re.compile(r"\b(AsyncIterator|Listing)\["), "Iterator["),
]


def normalize(annotation: Any) -> Any:
    """An annotation with the asyncio spelling of a result mapped to the sync one."""
    if not isinstance(annotation, str):
        return annotation
    for pattern, replacement in _ASYNC_RESULT:
        annotation = pattern.sub(replacement, annotation)
    return annotation


def function_of(member: object) -> Callable[..., Any] | None:
    if isinstance(member, classmethod | staticmethod):
        return member.__func__  # type: ignore[no-any-return]
    if isinstance(member, property):
        return member.fget
    if isinstance(member, cached_property):
        return member.func  # type: ignore[no-any-return]
    return member if callable(member) else None


def kind(member: object) -> str:
    if isinstance(member, classmethod | staticmethod):
        return type(member).__name__
    if isinstance(member, property | cached_property):
        return "property"
    return "function" if callable(member) else "attribute"


def shape(member: object) -> str:
    """What a caller relies on: the kind, and the signature with its annotations normalized."""
    func = function_of(member)
    if func is None:
        return f"{kind(member)} = {member!r}"
    sig = inspect.signature(func)
    params = [p.replace(annotation=normalize(p.annotation)) for p in sig.parameters.values()]
    sig = sig.replace(parameters=params, return_annotation=normalize(sig.return_annotation))
    return f"{kind(member)} {sig}"


def public_members(cls: type) -> dict[str, object]:
    names = {n for n in dir(cls) if not n.startswith("_")} | (DUNDERS & set(vars(cls)))
    return {name: inspect.getattr_static(cls, name) for name in names}


SYNC = public_members(tokencache.TokenStore)
ASYNC = public_members(aio.TokenStore)


def test_the_twins_have_the_same_public_members() -> None:
    expected = {RENAMED.get(name, name) for name in SYNC}
    only_sync, only_async = expected - set(ASYNC), set(ASYNC) - expected
    assert (only_sync, only_async) == (set(), set()), "(only in the sync store, only in the asyncio store)"


@pytest.mark.parametrize("name", sorted(SYNC))
def test_a_store_member_has_the_same_signature(name: str) -> None:
    twin = RENAMED.get(name, name)
    if twin not in ASYNC:
        pytest.fail(f"aio.TokenStore has no {twin}")
    assert shape(ASYNC[twin]) == shape(SYNC[name])


@pytest.mark.parametrize("name", MODULE_CALLS)
def test_a_module_level_call_has_the_same_signature(name: str) -> None:
    twin = RENAMED.get(name, name)
    assert twin in aio.__all__ and name in tokencache.__all__
    assert shape(getattr(aio, twin)) == shape(getattr(tokencache, name))


def is_awaited(func: Callable[..., Any]) -> bool:
    """An ``async def``, or a function that returns a listing (``async for`` it, or ``await`` it)."""
    returns = str(inspect.signature(func).return_annotation)
    return inspect.iscoroutinefunction(func) or returns.startswith("AsyncIterator[") or "Listing[" in returns


def test_what_does_io_is_awaited_on_asyncio() -> None:
    """Every method the asyncio store defines itself (its I/O) is awaited there, and not in the sync store."""
    own = {name for name in vars(aio.TokenStore) if name in ASYNC} - {"__init__", "from_url"}
    assert own, "the asyncio store defines its I/O itself"
    for name in own:
        assert is_awaited(vars(aio.TokenStore)[name]), f"aio.TokenStore.{name} is not awaited"
        sync = {v: k for k, v in RENAMED.items()}.get(name, name)
        assert not is_awaited(vars(tokencache.TokenStore)[sync]), f"TokenStore.{sync} is awaited"
    calls = [getattr(aio, RENAMED.get(n, n)) for n in MODULE_CALLS if n != "default_store"]
    assert all(is_awaited(call) for call in calls)


def test_instances_set_the_same_public_attributes() -> None:
    server = fakeredis.FakeServer()
    sync = tokencache.TokenStore(fakeredis.FakeRedis(server=server))
    twin = aio.TokenStore(fakeredis.FakeAsyncRedis(server=server))
    try:
        assert sorted(n for n in vars(twin) if not n.startswith("_")) == sorted(
            n for n in vars(sync) if not n.startswith("_")
        )
    finally:
        sync.close()
        asyncio.run(twin.aclose())


def test_the_check_sees_drift() -> None:
    """A parameter added on one side, or a default changed, changes the shape (the test can fail)."""

    def find(self: object, info: object, sub: str | None = None) -> None: ...
    def find_more(self: object, info: object, sub: str | None = None, *, fresh: bool = False) -> None: ...
    def find_other(self: object, info: object, sub: str | None = "me") -> None: ...

    assert shape(find) != shape(find_more) and shape(find) != shape(find_other)
    assert normalize("AsyncIterator[Token]") == normalize("Iterator[Token]") == normalize("Listing[Token]")
