"""RQ on redis.asyncio: record RQ's pipeline commands, replay them in one asyncio transaction.

No sync twin: the sync store hands RQ its own ``redis.Redis`` and a real
pipeline. RQ is synchronous, so the asyncio store gives RQ a :class:`Recorder`
where RQ expects a pipeline, and RQ's ``connection`` is an :func:`offline_client`
that builds commands but refuses to connect: a future RQ code path that tries to
send a command through it fails loudly instead of talking to localhost:6379.
"""

from __future__ import annotations

from typing import Any

from redis import ConnectionPool, Redis
from redis.asyncio import Redis as AsyncRedis

__all__ = ["OFFLINE", "Recorder", "offline_client"]

OFFLINE = (
    "this redis.Redis client only lets RQ build the commands that tokencache.aio replays on "
    "redis.asyncio; it never connects, and a command sent through it means RQ took a code path "
    "the asyncio store does not support (a tokencache bug: please report it)"
)
"""What the offline client says when something tries to use it."""


class _OfflinePool(ConnectionPool):
    """A connection pool that hands out no connection."""

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(OFFLINE)

    def make_connection(self) -> Any:
        raise RuntimeError(OFFLINE)


def offline_client() -> Redis:
    """A ``redis.Redis`` for RQ's ``connection`` argument that raises RuntimeError instead of connecting."""
    return Redis(connection_pool=_OfflinePool())


class Recorder:
    """Stands in for a redis-py pipeline: records the commands RQ (or we) issue, replays them on ``redis``.

    ``with Recorder(redis) as pipe: ...; await pipe.execute()`` reads like the sync
    store's ``with redis.pipeline(transaction=True) as pipe: ...; pipe.execute()``.
    """

    explicit_transaction = True  # RQ checks this before starting a MULTI of its own

    def __init__(self, redis: AsyncRedis) -> None:
        self.redis = redis
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.calls.clear()

    def multi(self) -> None:
        """The replaying pipeline is already a transaction."""

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> Recorder:
            self.calls.append((name, args, kwargs))
            return self

        return record

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send the recorded commands in one MULTI/EXEC; their replies (a command's error among them
        with ``raise_on_error=False``, as redis-py's pipeline)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for name, args, kwargs in self.calls:
                getattr(pipe, name)(*args, **kwargs)
            return await pipe.execute(raise_on_error=raise_on_error)
