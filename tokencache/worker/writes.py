"""The refresh's own writes: a refreshed token that must not undo a delete, a counted failure, a hold.

Only refresh jobs (and their batches) write these; apps write through
:meth:`tokencache.app.tokenstore.TokenStore.write`. Each is one Lua script
(:data:`~tokencache.core.scripts.RECORD_FAILURE`, :data:`~tokencache.core.scripts.REPLACE_IF_INDEXED`),
so the check and the write happen with nothing in between. The script also appends the write's
audit entry (:mod:`tokencache.core.audit`): it exists if and only if the write happened, and a
pipeline run again after a NOSCRIPT (:func:`~tokencache.core.scripts.run_pipeline`) does not append
it twice.
"""

from __future__ import annotations

from redis.client import Pipeline
from redis.typing import EncodableT

from tokencache.app.tokenstore import TokenStore
from tokencache.constants import ERROR_MESSAGE_LIMIT
from tokencache.core import scripts
from tokencache.core.audit import Event, flat, script_result
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
    current: Token | None = None,
    outcome: str = "",
) -> int:
    """Count a failed refresh in the hash (if it still exists) and tell waiters; the new count, or 0.

    ``hold``: the endpoint rate-limited the account; every fetcher of it waits that many seconds.
    ``retry_in``: when the token's own job tries again (the apps' request stands until then).
    A give-up is audited: ``outcome`` (the error's kind), ``message``, and ``current``, the token left
    to expire (if any).
    """
    args: list[EncodableT] = [message[:ERROR_MESSAGE_LIMIT], int(store.clock()), int(gave_up)]
    entry = _give_up_entry(store, key, message, current, outcome) if gave_up else None
    args += store.audit.script_args(entry)  # no entry for a retry: see tokencache.core.audit

    def queue(pipe: Pipeline) -> None:
        scripts.RECORD_FAILURE(pipe, [store.keys.token(key), store.keys.audit], args)
        # Safe to repeat: SETs, a DEL, a wake-up.
        store.failure_commands(pipe, key, message, gave_up=gave_up, hold=hold, retry_in=retry_in)

    with redis_errors(store.redis):
        reply, *_ = scripts.run_pipeline(store.redis, queue, transaction=True)
    return script_result(reply, store.keys.audit)


def _give_up_entry(
    store: TokenStore, key: TokenKey, message: str, current: Token | None, outcome: str
) -> dict[str, str]:
    if current is None:
        return store.audit.entry(Event.GAVE_UP, key, outcome=outcome, error=message)
    return store.audit.entry(
        Event.GAVE_UP, key, outcome=outcome, error=message, token=current.token, expires=current.expires
    )


def hold_left(store: TokenStore, account: str) -> float:
    """Seconds the account's requests are still on hold after a rate-limited answer (0: none)."""
    with redis_errors(store.redis):
        return max(0, store.redis.pttl(store.keys.backoff(account))) / 1000


def replace_if_indexed(
    store: TokenStore, key: TokenKey, token: Token, *, outcome: str, move_job: bool = False
) -> bool:
    """Write a refreshed token unless the token was deleted meanwhile (its index entry is gone).

    The refresh job's write: a ``delete()`` that lands while the job fetches
    must not be undone by the job storing its result. ``move_job`` also moves
    the token's own job to the new refresh time, in the same transaction, if
    that job is waiting in RQ's schedule (see :mod:`tokencache.worker.batch`).
    ``outcome``: why it was fetched, for the audit entry (see docs/operations.md#audit-trail).
    """
    now = int(store.clock())
    refresh_at = store.due_at(token, fetched=True)
    redis_key = store.keys.token(key)
    fields = flat(
        to_fields(token, redis_key=redis_key, ring=store.encryption, refresh_at=refresh_at, refreshed_at=now)
    )
    entry = store.audit.entry(Event.FETCHED, key, outcome=outcome, token=token.token, expires=token.expires)
    keys = [redis_key, store.keys.index, store.keys.want(key), store.keys.error(key)]
    args: list[EncodableT] = [token.expires, store.keys.channel(key), ok_message(), len(fields), *fields]
    args += store.audit.script_args(entry)

    def queue(pipe: Pipeline) -> None:
        scripts.REPLACE_IF_INDEXED(pipe, [*keys, store.keys.audit], args)
        if move_job:
            # A delete() cancels the job with the index entry, so this moves nothing when the write did not.
            store.refresh_queue.move_scheduled(pipe, key, refresh_at)  # safe to repeat: ZADD XX, same time

    with redis_errors(store.redis):
        reply, *_ = scripts.run_pipeline(store.redis, queue, transaction=move_job)
    return bool(script_result(reply, store.keys.audit))
