"""What the sync TokenStore and its asyncio twin share: settings, keys, and every decision, without I/O.

Both stores issue their writes into a pipeline-like writer (a redis-py
pipeline, or a recorder that the asyncio store replays), so both write exactly
the same layout; and both judge what they read with the same methods here. The
twins (:mod:`tokencache.store.tokenstore`, :mod:`tokencache.aio.tokenstore`) only do I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq.job import Job

from tokencache import env
from tokencache.constants import ERROR_TTL, EXPIRY_SKEW
from tokencache.core.notify import error_message, ok_message
from tokencache.core.pipeline import Pipeline
from tokencache.core.queue import RefreshQueue, utc
from tokencache.core.record import Bookkeeping, MalformedRecord, from_fields, to_fields
from tokencache.core.sources import Sources, default_sources
from tokencache.keys import Keys, TokenKey, parse_info
from tokencache.store.nearcache import NearCache
from tokencache.store.reads import KeyMemo, TokenMemo
from tokencache.token import Token
from tokencache.validate import check_flag, check_refresh_before

__all__ = ["Clock", "Raw", "StoreCore", "TokenRecord"]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Raw = dict[bytes, bytes]


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A cached token with its key and refresh bookkeeping (what ``ls`` shows)."""

    key: TokenKey
    token: Token
    bookkeeping: Bookkeeping


class StoreCore:
    """What the sync and the asyncio TokenStore share: settings, keys, and the commands they send.

    Writes are issued into a pipeline-like object (a redis-py pipeline, or a
    recorder that the asyncio store replays), so both stores write exactly
    the same layout.
    """

    def __init__(
        self,
        rq_connection: Redis,
        *,
        namespace: str | None,
        refresh_before: int | None,
        queue: str | None,
        clock: Clock,
        sources: Sources | None,
    ) -> None:
        self.keys = Keys(env.namespace() if namespace is None else namespace)
        self.refresh_before = check_refresh_before(
            env.refresh_before() if refresh_before is None else refresh_before
        )
        self.refresh_queue = RefreshQueue(rq_connection, queue or env.queue_name(), self.keys)
        self.clock = clock
        self._sources = sources
        self._key_memo = KeyMemo(self.keys)
        self._token_memo = TokenMemo()

    @property
    def sources(self) -> Sources:
        """Where this process fetches tokens itself on a ``for_scope`` miss (default: the environment's)."""
        if self._sources is None:
            self._sources = default_sources()
        return self._sources

    @sources.setter
    def sources(self, sources: Sources) -> None:
        self._sources = sources

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(namespace={self.keys.namespace!r}, refresh_before={self.refresh_before})"
        )

    def key_for_info(self, info: object, sub: str | None = None) -> TokenKey:
        """The key ``find(info, sub)`` reads."""
        return parse_info(info, sub)

    def key_for(self, token: Token, info: object = None, sub: str | None = None) -> TokenKey:
        """The key ``store(token, info, sub)`` files the token under (Goth's override rules)."""
        if not isinstance(token, Token):
            raise TypeError(f"token must be a tokencache.Token, not {type(token).__name__}")
        sub = token.sub if sub is None else sub
        if info is None:
            return TokenKey.of(token.account, token.scope, sub)
        return parse_info(info, sub)

    def due_at(self, token: Token, *, fetched: bool) -> int:
        """When the token's refresh should run: ``refresh_before`` ahead of expiry.

        A token we just fetched whose whole life is shorter than the margin is
        refreshed at half-life instead, so short-lived tokens cannot make the
        workers fetch in a loop.
        """
        now = int(self.clock())
        due = token.expires - self.refresh_before
        if fetched:
            due = max(due, now + (token.expires - now) // 2)
        return max(due, now)

    def write_commands(self, pipe: Pipeline, key: TokenKey, token: Token, *, fetched: bool) -> Job:
        """Queue the commands of a store into ``pipe``: hash, TTL, index entry, refresh job, wake-up."""
        now = int(self.clock())
        refresh_at = self.due_at(token, fetched=fetched)
        redis_key = self.keys.token(key)
        fields = to_fields(token, refresh_at=refresh_at, refreshed_at=now if fetched else None)
        pipe.delete(redis_key)
        pipe.hset(redis_key, mapping=fields)
        pipe.expireat(redis_key, token.expires)
        pipe.zadd(self.keys.index, {redis_key: token.expires})
        job = self.refresh_queue.schedule(pipe, key, self.refresh_before, utc(refresh_at))
        pipe.delete(self.keys.want(key), self.keys.error(key))  # answered: a later miss may ask again at once
        pipe.publish(self.keys.channel(key), ok_message())
        return job

    def failure_commands(self, pipe: Pipeline, key: TokenKey, message: str, *, gave_up: bool) -> None:
        """Queue what tells the fleet a fetch failed: the error (kept for late waiters) and the wake-up.

        The error is kept :data:`ERROR_TTL` seconds. A refresh that gave up also withdraws the apps'
        request to the workers, so the next miss after that window asks again.
        """
        pipe.set(self.keys.error(key), message[:500], px=int(ERROR_TTL * 1000))
        if gave_up:
            pipe.delete(self.keys.want(key))
        pipe.publish(self.keys.channel(key), error_message(message))

    def ask_workers_commands(self, pipe: Pipeline, key: TokenKey) -> None:
        """Queue a request for an immediate refresh by the worker pool (inside a MULTI).

        The index placeholder (score 0) tells the refresh job the token is wanted; it goes in the
        same transaction as the job so that repair never sees one without the other.
        """
        pipe.zadd(self.keys.index, {self.keys.token(key): 0}, nx=True)
        self.refresh_queue.enqueue_into(pipe, key, self.refresh_before)

    def delete_commands(self, pipe: Pipeline, key: TokenKey) -> None:
        """Queue the commands of a delete into ``pipe``: hash, index entry, refresh job."""
        redis_key = self.keys.token(key)
        pipe.delete(redis_key)
        pipe.zrem(self.keys.index, redis_key)
        pipe.delete(self.keys.want(key))
        self.refresh_queue.cancel(pipe, key)

    def usable_token(self, redis_key: str, raw: dict[bytes, bytes]) -> Token | None:
        """The token in an HGETALL reply if it may be handed out (Freshness.INVALID inlined: hot path)."""
        if not raw:
            return None
        try:
            token = self._token_memo.parse(redis_key, raw)
        except MalformedRecord as e:
            log.warning("ignoring malformed token hash %s: %s", redis_key, e)
            return None
        if token.expires - self.clock() <= EXPIRY_SKEW:
            return None
        return token

    def parse_record(self, key: TokenKey, raw: dict[bytes, bytes]) -> TokenRecord | None:
        if not raw:
            return None
        try:
            return TokenRecord(key, from_fields(raw), Bookkeeping.of(raw))
        except MalformedRecord as e:
            log.warning("ignoring malformed token hash %s: %s", self.keys.token(key), e)
            return None

    near_cache: NearCache | None = None

    def start_near_cache(self, client: Redis | AsyncRedis, near_cache: object) -> None:
        """Give this store a near cache on ``client``'s server if ``near_cache`` is True."""
        enabled = check_flag("near_cache", near_cache)
        self.near_cache = NearCache(client, self.keys.token_prefix) if enabled else None

    def _forget(self, key: TokenKey) -> None:
        """Drop ``key`` from the near cache at once: this process reads its own writes."""
        if self.near_cache is not None:
            self.near_cache.invalidate([self.keys.token(key)])
