"""tokencache for asyncio: the same store on ``redis.asyncio``.

Same keys, same hash layout, same refresh job and the same wake-up channel as
the synchronous :class:`tokencache.TokenStore`, so async and sync processes of
one fleet share tokens and single-flight fetches::

    from tokencache import aio

    store = aio.TokenStore.from_url("redis://localhost:6379/0")
    token = await store.for_scope("https://www.googleapis.com/auth/cloud-platform")
    token = await aio.find(scope)          # a default store from the environment

RQ is synchronous, so the store records RQ's commands (the refresh job's
hash, its schedule) on a stand-in pipeline and replays them in its own
``redis.asyncio`` transaction. A fetch with local credentials runs
google-auth in a thread.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from typing import Any, cast

from redis import Redis as SyncRedis
from redis import RedisError
from redis.asyncio import Redis as AsyncRedis
from rq.job import Job

from tokencache import env, metrics
from tokencache.constants import FLEET_POLL, LOCK_TTL, WANT_TTL
from tokencache.core.connection import connect, redis_errors, unavailable
from tokencache.core.locks import RELEASE_SCRIPT
from tokencache.core.notify import parse
from tokencache.core.sources import Sources
from tokencache.errors import ConfigurationError, RefreshError, TokenCacheError
from tokencache.keys import TokenKey, parse_info
from tokencache.store.core import Clock, Raw, StoreCore
from tokencache.store.fleet import account_arg, fetch_failed, timeout_error
from tokencache.token import Freshness, Token
from tokencache.validate import check_timeout

__all__ = ["TokenStore", "aclose_default", "default_store", "delete", "find", "for_scope", "store"]


class _Recorder:
    """Stands in for a redis-py pipeline: records the commands RQ (or we) issue, for replay."""

    explicit_transaction = True  # RQ checks this before starting a MULTI of its own

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def multi(self) -> None:
        """The replaying pipeline is already a transaction."""

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> _Recorder:
            self.calls.append((name, args, kwargs))
            return self

        return record

    def replay(self, pipe: Any) -> None:
        for name, args, kwargs in self.calls:
            getattr(pipe, name)(*args, **kwargs)


class TokenStore(StoreCore):
    """The asyncio twin of :class:`tokencache.TokenStore` (``find``, ``store``, ``delete``, ``for_scope``)."""

    def __init__(
        self,
        redis: AsyncRedis,
        *,
        namespace: str | None = None,
        refresh_before: int | None = None,
        queue: str | None = None,
        clock: Clock = time.time,
        sources: Sources | None = None,
        near_cache: bool = False,
    ) -> None:
        if not isinstance(redis, AsyncRedis):
            raise TypeError(f"redis must be a redis.asyncio.Redis client, not {type(redis).__name__}")
        # RQ builds its commands with a sync client that never connects here: we replay them.
        offline = SyncRedis()
        self._flights: dict[TokenKey, asyncio.Future[Token]] = {}
        super().__init__(
            offline,
            namespace=namespace,
            refresh_before=refresh_before,
            queue=queue,
            clock=clock,
            sources=sources,
        )
        self.redis = redis
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
        client = connect(url, client_class=AsyncRedis, **redis_options)
        return cls(
            client,
            namespace=namespace,
            refresh_before=refresh_before,
            queue=queue,
            sources=sources,
            near_cache=near_cache,
        )

    async def aclose(self) -> None:
        """Close the Redis connections and stop the near cache (the store is not usable afterwards)."""
        if self.near_cache is not None:
            await asyncio.to_thread(self.near_cache.close)
        await self.redis.aclose()

    async def _transaction(self, recorder: _Recorder) -> list[Any]:
        with redis_errors(self.redis):
            async with self.redis.pipeline(transaction=True) as pipe:
                recorder.replay(pipe)
                return await pipe.execute()

    async def store(self, token: Token, info: object = None, sub: str | None = None) -> Job:
        """Cache ``token`` for the fleet and schedule its refresh; returns the refresh job."""
        return await self.write(self.key_for(token, info, sub), token)

    async def write(self, key: TokenKey, token: Token, *, fetched: bool = False) -> Job:
        recorder = _Recorder()
        job = self.write_commands(recorder, key, token, fetched=fetched)
        await self._transaction(recorder)
        self._forget(key)
        return job

    async def delete(self, info: object, sub: str | None = None) -> bool:
        """Forget a token and cancel its refresh; True if it was cached."""
        recorder = _Recorder()
        key = parse_info(info, sub)
        self.delete_commands(recorder, key)
        deleted, unindexed, *_ = await self._transaction(recorder)
        self._forget(key)
        return bool(deleted or unindexed)

    async def find(self, info: object, sub: str | None = None) -> Token | None:
        """The cached token for ``info``/``sub``, or None; never an expired one."""
        _, redis_key = self._key_memo.get(info, sub)
        token = await self._near_read(redis_key)
        metrics.record_read(token is not None)
        return token

    async def find_key(self, key: TokenKey) -> Token | None:
        """:meth:`find` by a parsed key, always from Redis (the near cache may lag by a push)."""
        return await self._read(self.keys.token(key))

    async def _read(self, redis_key: str) -> Token | None:
        try:
            raw = cast(Raw, await self.redis.hgetall(redis_key))
        except RedisError as e:  # no context manager: this is the hot path
            raise unavailable(self.redis, e) from e
        return self.usable_token(redis_key, raw)

    async def _near_read(self, redis_key: str) -> Token | None:
        """From the near cache if it has the token, else from Redis (filling the cache)."""
        near = self.near_cache
        if near is None:
            return await self._read(redis_key)
        token = near.get(redis_key, self.clock())
        if token is None:
            epoch = near.epoch()
            token = await self._read(redis_key)
            if token is not None:
                near.put(redis_key, token, epoch)
        return token

    async def tokens(self) -> list[Token]:
        """Every cached token that may still be handed out."""
        with redis_errors(self.redis):
            members = cast(list[bytes], await self.redis.zrange(self.keys.index, 0, -1))
            async with self.redis.pipeline(transaction=False) as pipe:
                for member in members:
                    pipe.hgetall(member)
                replies = await pipe.execute()
        now = self.clock()
        found = (
            self.parse_record(self.keys.parse_token(m.decode()), raw)
            for m, raw in zip(members, replies, strict=True)
        )
        return [
            r.token
            for r in found
            if r and r.token.freshness(self.refresh_before, now) is not Freshness.INVALID
        ]

    async def for_scope(self, info: object, sub: str | None = None, timeout: float = 30.0) -> Token:
        """The cached token, or one fetched once for the whole fleet (see :mod:`tokencache.store.fleet`).

        Concurrent misses of this process on one key share one fetch task (one pub/sub connection),
        and the task is shielded: a caller cancelled mid-fetch does not abandon the fleet's fetch.
        """
        key, redis_key = self._key_memo.get(info, sub)
        timeout = check_timeout(timeout)
        token = await self._near_read(redis_key)
        metrics.record_read(token is not None)
        if token is not None:
            return token
        task = self._flights.get(key)
        if task is None:
            task = asyncio.ensure_future(_FleetFetch(self, key, timeout).run())
            self._flights[key] = task
            task.add_done_callback(lambda _: self._flights.pop(key, None))
        started = time.monotonic()
        try:
            token = await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            metrics.observe_fetch_wait(time.monotonic() - started, ok=False)
            raise timeout_error(self, key, timeout, self.sources.has(key.account)) from None
        except TokenCacheError:
            metrics.observe_fetch_wait(time.monotonic() - started, ok=False)
            raise
        metrics.observe_fetch_wait(time.monotonic() - started, ok=True)
        return token


class _FleetFetch:
    """One ``for_scope`` miss of an asyncio process (the twin of :class:`tokencache.fleet.FleetFetch`)."""

    def __init__(self, store: TokenStore, key: TokenKey, timeout: float) -> None:
        self.store, self.key, self.timeout = store, key, timeout
        self.owner = uuid.uuid4().hex
        self.fetches_itself = store.sources.has(key.account)

    async def run(self) -> Token:
        deadline = time.monotonic() + self.timeout
        pubsub = self.store.redis.pubsub()
        try:
            with redis_errors(self.store.redis):
                await pubsub.subscribe(self.store.keys.channel(self.key))
                await pubsub.get_message(timeout=min(1.0, self.timeout))  # subscribed before we look
                while True:
                    token = await self._step()
                    if token is not None:
                        return token
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise timeout_error(self.store, self.key, self.timeout, self.fetches_itself)
                    await self._wait(pubsub, min(FLEET_POLL, left))
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _wait(self, pubsub: Any, seconds: float) -> None:
        message = await pubsub.get_message(timeout=seconds)
        if message is None or message["type"] != "message":
            return
        error = parse(message["data"])
        if error is not None and await self.store.find_key(self.key) is None:
            raise fetch_failed(self.store, self.key, error)

    async def _step(self) -> Token | None:
        token = await self.store.find_key(self.key)
        if token is not None:
            return token
        error = cast(bytes | None, await self.store.redis.get(self.store.keys.error(self.key)))
        if error is not None:
            raise fetch_failed(self.store, self.key, error.decode(errors="replace"))
        if self.fetches_itself:
            return await self._fetch_if_free()
        await self._ask_workers()
        return None

    async def _fetch_if_free(self) -> Token | None:
        redis, lock = self.store.redis, self.store.keys.lock(self.key)
        if not await redis.set(lock, self.owner, nx=True, px=int(LOCK_TTL * 1000)):
            return None
        try:
            return await self.store.find_key(self.key) or await self._fetch()
        finally:
            await redis.eval(RELEASE_SCRIPT, 1, lock, self.owner)

    async def _fetch(self) -> Token:
        try:
            token = await asyncio.to_thread(self.store.sources.fetch, self.key, account=account_arg(self.key))
        except (RefreshError, ConfigurationError) as e:
            recorder = _Recorder()
            self.store.failure_commands(recorder, self.key, str(e), gave_up=False)
            await self.store._transaction(recorder)
            raise
        await self.store.write(self.key, token, fetched=True)
        return token

    async def _ask_workers(self) -> None:
        redis, keys, rq = self.store.redis, self.store.keys, self.store.refresh_queue
        if not rq.queue.redis_server_version:  # RQ would ask with its offline sync client
            rq.queue.redis_server_version = await _server_version(redis)
        if not await redis.set(keys.want(self.key), self.owner, nx=True, px=int(WANT_TTL * 1000)):
            return
        recorder = _Recorder()
        self.store.ask_workers_commands(recorder, self.key)
        await self.store._transaction(recorder)


async def _server_version(redis: AsyncRedis) -> tuple[int, int, int]:
    """The server's version as RQ records it in a job (RQ's own fallback when INFO is refused)."""
    try:
        info = await redis.info("server")
        major, minor, patch = (int(p) for p in ([*str(info["redis_version"]).split("."), "0", "0"])[:3])
    except (RedisError, KeyError, ValueError):
        return (5, 0, 9)
    return (major, minor, patch)


# -- module-level calls on a default store -----------------------------------

_defaults: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TokenStore] = weakref.WeakKeyDictionary()


def default_store() -> TokenStore:
    """This event loop's default store, built from the environment (a redis.asyncio client is per loop)."""
    loop = asyncio.get_running_loop()
    if loop not in _defaults:
        _defaults[loop] = TokenStore.from_url(None, near_cache=env.near_cache())
    return _defaults[loop]


async def aclose_default() -> None:
    """Close this event loop's default store (call before the loop ends, e.g. at app shutdown)."""
    store = _defaults.pop(asyncio.get_running_loop(), None)
    if store is not None:
        await store.aclose()


async def store(token: Token, info: object = None, sub: str | None = None) -> Job:
    return await default_store().store(token, info, sub)


async def find(info: object, sub: str | None = None) -> Token | None:
    return await default_store().find(info, sub)


async def for_scope(info: object, sub: str | None = None, timeout: float = 30.0) -> Token:
    return await default_store().for_scope(info, sub, timeout)


async def delete(info: object, sub: str | None = None) -> bool:
    return await default_store().delete(info, sub)
