"""TokenStore: the fleet's shared token cache on Redis (Goth's TokenStore, in Python).

``store`` writes a token's hash, TTL and index entry and (re)schedules its one
refresh job in a single MULTI/EXEC; ``find`` is a single HGETALL. Neither ever
talks to Google: only the refresh job (see :mod:`tokencache.refresh`) does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import redis as redis_py
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq.job import Job

from tokencache import env, metrics
from tokencache.core.connection import connect, redis_errors, unavailable
from tokencache.core.notify import error_message, ok_message
from tokencache.core.queue import RefreshQueue, utc
from tokencache.core.record import Bookkeeping, MalformedRecord, from_fields, to_fields
from tokencache.core.sources import Sources, default_sources
from tokencache.errors import TokenCacheError
from tokencache.keys import Keys, TokenKey, parse_info
from tokencache.store.fleet import FleetFetch, Flights, check_timeout
from tokencache.store.nearcache import NearCache
from tokencache.store.reads import KeyMemo, TokenMemo
from tokencache.token import EXPIRY_SKEW, Freshness, Token

__all__ = ["TokenRecord", "TokenStore"]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
ERROR_TTL = 2.0
"""Seconds a fetch's error is kept: waiters that subscribed after it was published still see it, and
callers in that window fail at once instead of stampeding a failing endpoint; after it, a miss
tries again."""
Raw = dict[bytes, bytes]
_BATCH = 500


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A cached token with its key and refresh bookkeeping (what ``ls`` shows)."""

    key: TokenKey
    token: Token
    bookkeeping: Bookkeeping


def _check_refresh_before(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"refresh_before must be whole seconds (int), not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"refresh_before must not be negative, got {value}")
    return value


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
        self.refresh_before = _check_refresh_before(
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

    def write_commands(self, pipe: Any, key: TokenKey, token: Token, *, fetched: bool) -> Job:
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

    def failure_commands(self, pipe: Any, key: TokenKey, message: str, *, gave_up: bool) -> None:
        """Queue what tells the fleet a fetch failed: the error (kept for late waiters) and the wake-up.

        The error is kept :data:`ERROR_TTL` seconds. A refresh that gave up also withdraws the apps'
        request to the workers, so the next miss after that window asks again.
        """
        pipe.set(self.keys.error(key), message[:500], px=int(ERROR_TTL * 1000))
        if gave_up:
            pipe.delete(self.keys.want(key))
        pipe.publish(self.keys.channel(key), error_message(message))

    def ask_workers_commands(self, pipe: Any, key: TokenKey) -> None:
        """Queue a request for an immediate refresh by the worker pool (inside a MULTI).

        The index placeholder (score 0) tells the refresh job the token is wanted; it goes in the
        same transaction as the job so that repair never sees one without the other.
        """
        pipe.zadd(self.keys.index, {self.keys.token(key): 0}, nx=True)
        self.refresh_queue.enqueue_into(pipe, key, self.refresh_before)

    def delete_commands(self, pipe: Any, key: TokenKey) -> None:
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
        if not isinstance(near_cache, bool):
            raise TypeError(f"near_cache must be True or False, not {type(near_cache).__name__}")
        self.near_cache = NearCache(client, self.keys.token_prefix) if near_cache else None

    def _forget(self, key: TokenKey) -> None:
        """Drop ``key`` from the near cache at once: this process reads its own writes."""
        if self.near_cache is not None:
            self.near_cache.invalidate([self.keys.token(key)])


class TokenStore(StoreCore):
    """Shared tokens of one namespace in one Redis, refreshed by the RQ queue of that namespace."""

    def __init__(
        self,
        redis: Redis,
        *,
        namespace: str | None = None,
        refresh_before: int | None = None,
        queue: str | None = None,
        clock: Clock = time.time,
        sources: Sources | None = None,
        near_cache: bool = False,
    ) -> None:
        if not isinstance(redis, Redis):
            raise TypeError(f"redis must be a redis.Redis client, not {type(redis).__name__}")
        super().__init__(
            redis,
            namespace=namespace,
            refresh_before=refresh_before,
            queue=queue,
            clock=clock,
            sources=sources,
        )
        self.redis = redis
        self._flights = Flights()
        self.start_near_cache(redis, near_cache)

    @classmethod
    def from_url(
        cls,
        url: str | None = None,
        *,
        namespace: str | None = None,
        refresh_before: int | None = None,
        queue: str | None = None,
        sources: Sources | None = None,
        near_cache: bool = False,
        **redis_options: Any,
    ) -> TokenStore:
        """A store on the Redis at ``url`` (``None`` reads ``TOKENCACHE_REDIS_URL``)."""
        redis = connect(url, **redis_options)
        return cls(
            redis,
            namespace=namespace,
            refresh_before=refresh_before,
            queue=queue,
            sources=sources,
            near_cache=near_cache,
        )

    def close(self) -> None:
        """Close the Redis connections and stop the near cache (the store is not usable afterwards)."""
        if self.near_cache is not None:
            self.near_cache.close()
        self.redis.close()

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -------------------------------------------------------------

    def store(self, token: Token, info: object = None, sub: str | None = None) -> Job | None:
        """Cache ``token`` for the fleet and schedule its refresh; returns the refresh job."""
        return self.write(self.key_for(token, info, sub), token)

    def write(self, key: TokenKey, token: Token, *, fetched: bool = False) -> Job:
        """Atomically write hash, TTL, index entry and the refresh job, under ``key``.

        ``fetched`` says the token was just fetched from its source (see :meth:`due_at`).
        """
        with redis_errors(self.redis), self.redis.pipeline(transaction=True) as pipe:
            job = self.write_commands(pipe, key, token, fetched=fetched)
            pipe.execute()
        self._forget(key)
        return job

    def delete(self, info: object, sub: str | None = None) -> bool:
        """Forget a token and cancel its refresh; True if it was cached."""
        with redis_errors(self.redis), self.redis.pipeline(transaction=True) as pipe:
            key = parse_info(info, sub)
            self.delete_commands(pipe, key)
            deleted, unindexed, *_ = pipe.execute()
        self._forget(key)
        return bool(deleted or unindexed)

    # -- reading -------------------------------------------------------------

    def find(self, info: object, sub: str | None = None) -> Token | None:
        """The cached token for ``info``/``sub``, or None; never an expired one."""
        _, redis_key = self._key_memo.get(info, sub)
        token = self._near_read(redis_key)
        metrics.record_read(token is not None)
        return token

    def find_key(self, key: TokenKey) -> Token | None:
        """:meth:`find` by a parsed key, always from Redis (the near cache may lag by a push)."""
        return self._read(self.keys.token(key))

    def _read(self, redis_key: str) -> Token | None:
        try:
            raw = cast(Raw, self.redis.hgetall(redis_key))
        except redis_py.RedisError as e:  # no context manager: this is the hot path
            raise unavailable(self.redis, e) from e
        return self.usable_token(redis_key, raw)

    def _near_read(self, redis_key: str) -> Token | None:
        """From the near cache if it has the token, else from Redis (filling the cache)."""
        near = self.near_cache
        if near is None:
            return self._read(redis_key)
        token = near.get(redis_key, self.clock())
        if token is None:
            epoch = near.epoch()
            token = self._read(redis_key)
            if token is not None:
                near.put(redis_key, token, epoch)
        return token

    def for_scope(self, info: object, sub: str | None = None, timeout: float = 30.0) -> Token:
        """The cached token, or one fetched once for the whole fleet (see :mod:`tokencache.store.fleet`)."""
        key, redis_key = self._key_memo.get(info, sub)
        timeout = check_timeout(timeout)
        token = self._near_read(redis_key)
        metrics.record_read(token is not None)
        if token is not None:
            return token
        started = time.monotonic()
        try:
            token = self._flights.run(key, timeout, FleetFetch(self, key, timeout).run)
        except TokenCacheError:
            metrics.observe_fetch_wait(time.monotonic() - started, ok=False)
            raise
        metrics.observe_fetch_wait(time.monotonic() - started, ok=True)
        return token

    def record(self, key: TokenKey) -> TokenRecord | None:
        """The token stored under ``key`` with its bookkeeping, valid or not (None if absent/malformed)."""
        with redis_errors(self.redis):
            raw = cast(Raw, self.redis.hgetall(self.keys.token(key)))
        return self.parse_record(key, raw)

    def indexed(self, key: TokenKey) -> bool:
        """Whether ``key`` is in the index (a deleted token is not; an expired one still is)."""
        with redis_errors(self.redis):
            return self.redis.zscore(self.keys.index, self.keys.token(key)) is not None

    def records(self) -> Iterator[TokenRecord]:
        """Every indexed token that is still in Redis, with its bookkeeping (expired ones included)."""
        for start in range(0, self._index_size(), _BATCH):
            with redis_errors(self.redis):
                members = cast(list[bytes], self.redis.zrange(self.keys.index, start, start + _BATCH - 1))
                with self.redis.pipeline(transaction=False) as pipe:
                    for member in members:
                        pipe.hgetall(member)
                    replies = pipe.execute()
            for member, raw in zip(members, replies, strict=True):
                key = self.keys.parse_token(member.decode())
                found = self.parse_record(key, raw)
                if found is not None:
                    yield found

    def _index_size(self) -> int:
        with redis_errors(self.redis):
            return int(self.redis.zcard(self.keys.index))

    def tokens(self) -> Iterator[Token]:
        """Every cached token that may still be handed out."""
        now = self.clock()
        for found in self.records():
            if found.token.freshness(self.refresh_before, now) is not Freshness.INVALID:
                yield found.token


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
