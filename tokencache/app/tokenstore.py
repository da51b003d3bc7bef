"""TokenStore: the fleet's shared token cache on Redis (Goth's TokenStore, in Python).

``store`` writes a token's hash, TTL and index entry and (re)schedules its one
refresh job in a single MULTI/EXEC; ``find`` is a single HGETALL. Neither ever
talks to Google: only the refresh job (see :mod:`tokencache.refresh`) does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, cast

import redis as redis_py
from redis import Redis
from rq.job import Job

from tokencache import metrics
from tokencache.app.core import Clock, Raw, StoreCore, TokenRecord, rejected_token
from tokencache.app.fleet import FleetFetch, Flights
from tokencache.core import scripts
from tokencache.core.audit import Audit, script_result
from tokencache.core.connection import connect, raise_other_errors, redis_errors
from tokencache.core.sources import Sources
from tokencache.crypto import Keyring
from tokencache.keys import TokenKey, parse_info
from tokencache.outcomes import Invalidation
from tokencache.token import Token
from tokencache.validate import check_timeout

__all__ = ["TokenRecord", "TokenStore"]


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
        audit: Audit | None = None,
        encryption: Keyring | str | None = None,
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
            audit=audit,
            encryption=encryption,
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
        encryption: Keyring | str | None = None,
        **redis_options: Any,
    ) -> TokenStore:
        """A store on the Redis at ``url`` (``None`` reads ``TOKENCACHE_REDIS_URL``)."""
        encryption = Keyring.of(encryption)  # a bad ring fails before a connection is made
        redis = connect(url, **redis_options)
        return cls(
            redis,
            namespace=namespace,
            refresh_before=refresh_before,
            queue=queue,
            sources=sources,
            near_cache=near_cache,
            encryption=encryption,
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
            self.written(pipe.execute(raise_on_error=False))
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

    def invalidate(self, info: object, token: Token | str, sub: str | None = None) -> bool:
        """Report ``token`` (a Token or its access-token string) as rejected by an API (a 401).

        If it is still the stored token it is evicted (nobody is handed it any more, near caches drop
        it) and refetched once for the whole fleet; a token already replaced is left alone, and a key
        evicts at most once per ``INVALIDATE_EVERY`` seconds. True if this call evicted it.
        """
        key, rejected = parse_info(info, sub), rejected_token(token)
        with redis_errors(self.redis):
            reply = self._evict(key, rejected)
            result = self.invalidated(key, token, reply)
            if result is Invalidation.EVICTED:
                with self.redis.pipeline(transaction=True) as pipe:
                    pipe.multi()  # before any command: RQ's enqueue_job() would start the transaction itself
                    self.refetch_commands(pipe, key)
                    pipe.execute()
        return result is Invalidation.EVICTED

    def _evict(self, key: TokenKey, rejected: str) -> object:
        """The invalidate script's reply (0 if the stored field never held ``rejected``), run again while
        a rekey re-encrypts the field between our read and the script (see ``invalidate_again``)."""
        stored = self._token_field(key)
        call, reply, attempt = self.invalidate_call(key, rejected, stored), 0, 0
        while call is not None:
            attempt += 1
            reply = script_result(scripts.INVALIDATE(self.redis, *call), self.keys.audit)
            if not self.invalidate_again(reply, attempt):
                break
            reread = self._token_field(key)
            call, stored = self.invalidate_retry(key, rejected, stored, reread), reread
        return reply

    def _token_field(self, key: TokenKey) -> bytes | None:
        return cast(bytes | None, self.redis.hget(self.keys.token(key), "token"))

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
            raise self.read_error(self.redis, redis_key, e, "find") from e
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
        """The cached token, or one fetched once for the whole fleet (see :mod:`tokencache.app.fleet`)."""
        key, redis_key = self._key_memo.get(info, sub)
        timeout = check_timeout(timeout)
        token = self._near_read(redis_key)
        metrics.record_read(token is not None)
        if token is not None:
            return token
        with self.fetch_wait():
            return self._flights.run(FleetFetch(self, key, timeout))

    def record(self, key: TokenKey) -> TokenRecord | None:
        """The token stored under ``key`` with its bookkeeping, valid or not (None if absent/malformed).

        A key that holds another Redis type raises WrongTypeError naming it (it is not ours to overwrite).
        """
        redis_key = self.keys.token(key)
        try:
            raw = cast(Raw, self.redis.hgetall(redis_key))
        except redis_py.RedisError as e:
            raise self.read_error(self.redis, redis_key, e, "record") from e
        return self.parse_record(key, raw)

    def indexed(self, key: TokenKey) -> bool:
        """Whether ``key`` is in the index (a deleted token is not; an expired one still is)."""
        with redis_errors(self.redis):
            return self.redis.zscore(self.keys.index, self.keys.token(key)) is not None

    def records(self) -> Iterator[TokenRecord]:
        """Every indexed token that is still in Redis, with its bookkeeping (expired ones included).

        Read a page of the index at a time (see :meth:`index_pages`).
        """
        for start, stop in self.index_pages(self._index_size()):
            members, replies = self._page(start, stop)
            yield from self.page_records(members, replies)

    def _index_size(self) -> int:
        with redis_errors(self.redis):
            return int(self.redis.zcard(self.keys.index))

    def _page(self, start: int, stop: int) -> tuple[list[bytes], list[Raw | redis_py.RedisError]]:
        """The index members from ``start`` to ``stop`` and their hashes, in two round trips.

        A key of the wrong type comes back as its WRONGTYPE error (see :meth:`page_records`).
        """
        with redis_errors(self.redis):
            members = cast(list[bytes], self.redis.zrange(self.keys.index, start, stop))
            with self.redis.pipeline(transaction=False) as pipe:
                for member in members:
                    pipe.hgetall(member)
                return members, raise_other_errors(pipe.execute(raise_on_error=False))

    def tokens(self) -> Iterator[Token]:
        """Every cached token that may still be handed out, read a page of the index at a time."""
        now = self.clock()
        for found in self.records():
            if self.listable(found, now):
                yield found.token
