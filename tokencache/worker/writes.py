"""The refresh's own writes: a refreshed token that must not undo a delete, and a counted failure.

Only refresh jobs (and their batches) write these; apps write through
:meth:`tokencache.store.tokenstore.TokenStore.write`. Each is one Lua script, so the check and the
write happen with nothing in between.
"""

from __future__ import annotations

from tokencache.core.connection import redis_errors
from tokencache.core.notify import ok_message
from tokencache.core.record import to_fields
from tokencache.keys import TokenKey
from tokencache.store.tokenstore import TokenStore
from tokencache.token import Token

__all__ = ["record_failure", "replace_if_indexed"]

_RECORD_FAILURE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
    local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
    redis.call('HSET', KEYS[1], 'last_error', ARGV[1], 'last_error_at', ARGV[2])
    if ARGV[3] == '1' then
        redis.call('HSET', KEYS[1], 'gave_up_at', ARGV[2])
    end
    return failures
end
return 0
"""

_REPLACE_IF_INDEXED = """
if not redis.call('ZSCORE', KEYS[2], KEYS[1]) then
    return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('EXPIREAT', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[1], KEYS[1])
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""


def record_failure(store: TokenStore, key: TokenKey, message: str, *, gave_up: bool = False) -> int:
    """Count a failed refresh in the hash (if it still exists) and tell waiters; the new count, or 0."""
    with redis_errors(store.redis), store.redis.pipeline(transaction=True) as pipe:
        pipe.eval(_RECORD_FAILURE, 1, store.keys.token(key), message[:500], int(store.clock()), int(gave_up))
        store.failure_commands(pipe, key, message, gave_up=gave_up)
        reply, *_ = pipe.execute()
    return int(reply)


def replace_if_indexed(store: TokenStore, key: TokenKey, token: Token, *, move_job: bool = False) -> bool:
    """Write a refreshed token unless the token was deleted meanwhile (its index entry is gone).

    The refresh job's write: a ``delete()`` that lands while the job fetches
    must not be undone by the job storing its result. ``move_job`` also moves
    the token's own job to the new refresh time, in the same transaction, if
    that job is waiting in RQ's schedule (see :mod:`tokencache.worker.batch`).
    """
    now = int(store.clock())
    refresh_at = store.due_at(token, fetched=True)
    fields = to_fields(token, refresh_at=refresh_at, refreshed_at=now)
    flat = [item for pair in fields.items() for item in pair]
    with redis_errors(store.redis), store.redis.pipeline(transaction=move_job) as pipe:
        pipe.eval(
            _REPLACE_IF_INDEXED,
            4,
            store.keys.token(key),
            store.keys.index,
            store.keys.want(key),
            store.keys.error(key),
            token.expires,
            store.keys.channel(key),
            ok_message(),
            *flat,
        )
        if move_job:
            # A delete() cancels the job with the index entry, so this moves nothing when the write did not.
            store.refresh_queue.move_scheduled(pipe, key, refresh_at)
        reply, *_ = pipe.execute()
    return bool(reply)
