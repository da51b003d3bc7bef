"""The pipeline-like writer that the store's and the refresh queue's ``*_commands`` write into.

The sync store passes a redis-py pipeline; the asyncio store passes a recorder
that it replays on ``redis.asyncio`` (RQ is synchronous). :class:`Pipeline`
names the commands they rely on: a writer that lacks one fails the type check
(the asyncio recorder takes any command by ``__getattr__``, so for it the guard is
``tests/test_pipeline.py``, which records every call and compares it with this
list). It lists what is really called, and nothing more:

* by :class:`~tokencache.app.core.StoreCore` and :class:`~tokencache.core.queue.RefreshQueue`:
  ``delete hset expireat pexpire zadd zrem lrem set publish``, and ``xadd`` (the audit trail,
  :mod:`tokencache.core.audit`);
* by :class:`~tokencache.core.queue.RefreshJob` ``.save``: ``hdel hset``;
* by RQ 3 itself, inside ``Queue.schedule_job`` and ``Queue.enqueue_job`` for our jobs (no
  dependencies, no rate limit, no ``ttl``): ``sadd`` (the queues set), ``hset`` (``set_status``),
  ``zadd`` (the scheduled registry), ``rpush`` (the queue), and ``multi()`` unless
  ``explicit_transaction`` says the caller already started the transaction. A job with a ``ttl``
  would add ``expire``, one with dependencies ``watch``: ours have neither.

Every command's reply comes from ``execute()``, so the methods return ``object``. Lua scripts are
not part of it: they run only on real redis-py pipelines, which load them before the transaction
(see :mod:`tokencache.core.scripts`).

A pipeline that reads the same few things for each of many entries gets its replies back as one
NamedTuple per entry (:func:`per_entry`), whose fields are named in the order the commands were
queued, next to the code that queues them: no ``replies[4 * i + 3]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

from redis.typing import EncodableT

__all__ = ["Pipeline", "per_entry"]

Entry = TypeVar("Entry", bound=NamedTuple)


class Pipeline(Protocol):
    """The writer commands are queued into: a redis-py pipeline, or the asyncio store's recorder."""

    explicit_transaction: bool
    """True once ``multi()`` was called (RQ checks it before starting a transaction of its own)."""

    def multi(self) -> object: ...

    def delete(self, *names: str) -> object: ...

    # Any key: redis-py types the keys as a union of its own, which (Mapping keys being invariant)
    # no dict[str, str] matches.
    def hset(
        self,
        name: str,
        key: str | None = None,
        value: str | None = None,
        mapping: Mapping[Any, EncodableT] | None = None,
    ) -> object: ...

    def hdel(self, name: str, *keys: str) -> object: ...

    def expireat(self, name: str, when: int) -> object: ...

    def pexpire(self, name: str, time: int) -> object: ...

    def persist(self, name: str) -> object: ...

    def zadd(
        self, name: str, mapping: Mapping[str, float], *, nx: bool = False, xx: bool = False
    ) -> object: ...

    def zrem(self, name: str, *values: str) -> object: ...

    def sadd(self, name: str, *values: str) -> object: ...

    def rpush(self, name: str, *values: str) -> object: ...

    def lrem(self, name: str, count: int, value: str) -> object: ...

    def set(self, name: str, value: str, *, px: int | None = None) -> object: ...

    def publish(self, channel: str, message: str) -> object: ...

    # redis-py types the fields as an invariant Dict of its own unions, which no dict[str, str] matches.
    def xadd(
        self, name: str, fields: dict[Any, Any], *, maxlen: int | None = None, approximate: bool = True
    ) -> object: ...


def per_entry(shape: type[Entry], replies: Sequence[Any]) -> list[Entry]:
    """A pipeline's replies as one ``shape`` per entry, for a pipeline that queued one command per field
    of ``shape``, in the order of its fields, for each entry in turn."""
    width = len(shape._fields)
    if len(replies) % width:
        raise ValueError(f"{len(replies)} replies do not split into entries of {width} ({shape.__name__})")
    return [shape(*replies[start : start + width]) for start in range(0, len(replies), width)]
