"""The refresh's own writes: a refreshed token that must not undo a delete, a counted failure, a hold.

Only refresh jobs (and their batches) write these; apps write through
:meth:`tokencache.app.tokenstore.TokenStore.write`. Each is one Lua script
(:data:`~tokencache.core.scripts.RECORD_FAILURE`, :data:`~tokencache.core.scripts.REPLACE_IF_INDEXED`),
so the check and the write happen with nothing in between.
"""

from __future__ import annotations

from redis.client import Pipeline

from tokencache.app.tokenstore import TokenStore
from tokencache.constants import ERROR_MESSAGE_LIMIT
from tokencache.core import scripts
from tokencache.core.connection import redis_errors
from tokencache.core.notify import ok_message
from tokencache.core.record import to_fields
from tokencache.keys import TokenKey
from tokencache.token import Token

__all__ = ["hold_left", "record_failure", "replace_if_indexed"]


def record_failure(
    store: TokenStore,
    key: TokenKey,
    message: str,
    *,
    gave_up: bool = False,
    hold: float | None = None,
    retry_in: float | None = None,
) -> int:
    """Count a failed refresh in the hash (if it still exists) and tell waiters; the new count, or 0.

    ``hold``: the endpoint rate-limited the account; every fetcher of it waits that many seconds.
    ``retry_in``: when the token's own job tries again (the apps' request stands until then).
    """
    now = int(store.clock())

    def queue(pipe: Pipeline) -> None:
        scripts.RECORD_FAILURE(
            pipe, [store.keys.token(key)], [message[:ERROR_MESSAGE_LIMIT], now, int(gave_up)]
        )
        # Safe to repeat: SETs, a DEL, a wake-up.
        store.failure_commands(pipe, key, message, gave_up=gave_up, hold=hold, retry_in=retry_in)

    with redis_errors(store.redis):
        reply, *_ = scripts.run_pipeline(store.redis, queue, transaction=True)
    return int(reply)


def hold_left(store: TokenStore, account: str) -> float:
    """Seconds the account's requests are still on hold after a rate-limited answer (0: none)."""
    with redis_errors(store.redis):
        return max(0, store.redis.pttl(store.keys.backoff(account))) / 1000


def replace_if_indexed(store: TokenStore, key: TokenKey, token: Token, *, move_job: bool = False) -> bool:
    """Write a refreshed token unless the token was deleted meanwhile (its index entry is gone).

    The refresh job's write: a ``delete()`` that lands while the job fetches
    must not be undone by the job storing its result. ``move_job`` also moves
    the token's own job to the new refresh time, in the same transaction, if
    that job is waiting in RQ's schedule (see :mod:`tokencache.worker.batch`).
    """
    now = int(store.clock())
    refresh_at = store.due_at(token, fetched=True)
    redis_key = store.keys.token(key)
    fields = to_fields(
        token, redis_key=redis_key, ring=store.encryption, refresh_at=refresh_at, refreshed_at=now
    )
    flat = [item for pair in fields.items() for item in pair]

    def queue(pipe: Pipeline) -> None:
        scripts.REPLACE_IF_INDEXED(
            pipe,
            [redis_key, store.keys.index, store.keys.want(key), store.keys.error(key)],
            [token.expires, store.keys.channel(key), ok_message(), *flat],
        )
        if move_job:
            # A delete() cancels the job with the index entry, so this moves nothing when the write did not.
            store.refresh_queue.move_scheduled(pipe, key, refresh_at)  # safe to repeat: ZADD XX, same time

    with redis_errors(store.redis):
        reply, *_ = scripts.run_pipeline(store.redis, queue, transaction=move_job)
    return bool(reply)
