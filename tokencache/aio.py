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
from typing import Any, cast

from redis import Redis as SyncRedis
from redis import RedisError
from redis.asyncio import Redis as AsyncRedis
from rq.job import Job

from .connection import connect, redis_errors
from .errors import ConfigurationError, RefreshError
from .fleet import POLL, WANT_TTL, account_arg, check_timeout, timeout_error
from .keys import TokenKey, parse_info
from .locks import LOCK_TTL, RELEASE_SCRIPT
from .notify import error_message, parse
from .sources import Sources
from .token import Freshness, Token
from .tokenstore import Clock, Raw, StoreCore

__all__ = ["TokenStore", "default_store", "delete", "find", "for_scope", "store"]


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
    ) -> None:
        if not isinstance(redis, AsyncRedis):
            raise TypeError(f"redis must be a redis.asyncio.Redis client, not {type(redis).__name__}")
        # RQ builds its commands with a sync client that never connects here: we replay them.
        offline = SyncRedis()
        super().__init__(
            offline,
            namespace=namespace,
            refresh_before=refresh_before,
            queue=queue,
            clock=clock,
            sources=sources,
        )
        self.redis = redis

    @classmethod
    def from_url(
        cls,
        url: str | None = None,
        *,
        namespace: str | None = None,
        refresh_before: int | None = None,
        queue: str | None = None,
        sources: Sources | None = None,
        **redis_options: Any,
    ) -> TokenStore:
        """A store on the Redis at ``url`` (``None`` reads ``TOKENCACHE_REDIS_URL``)."""
        client = connect(url, client_class=AsyncRedis, **redis_options)
        return cls(client, namespace=namespace, refresh_before=refresh_before, queue=queue, sources=sources)

    async def aclose(self) -> None:
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
        return job

    async def delete(self, info: object, sub: str | None = None) -> bool:
        """Forget a token and cancel its refresh; True if it was cached."""
        recorder = _Recorder()
        self.delete_commands(recorder, parse_info(info, sub))
        deleted, unindexed, *_ = await self._transaction(recorder)
        return bool(deleted or unindexed)

    async def find(self, info: object, sub: str | None = None) -> Token | None:
        """The cached token for ``info``/``sub``, or None; never an expired one."""
        return await self.find_key(parse_info(info, sub))

    async def find_key(self, key: TokenKey) -> Token | None:
        redis_key = self.keys.token(key)
        with redis_errors(self.redis):
            raw = cast(Raw, await self.redis.hgetall(redis_key))
        return self.usable_token(redis_key, raw)

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
        """The cached token, or one fetched once for the whole fleet (see :mod:`tokencache.fleet`)."""
        return await _FleetFetch(self, parse_info(info, sub), check_timeout(timeout)).run()


class _FleetFetch:
    """One ``for_scope`` call of an asyncio process (the twin of :class:`tokencache.fleet.FleetFetch`)."""

    def __init__(self, store: TokenStore, key: TokenKey, timeout: float) -> None:
        self.store, self.key, self.timeout = store, key, timeout
        self.owner = uuid.uuid4().hex
        self.fetches_itself = store.sources.has(key.account)

    async def run(self) -> Token:
        token = await self.store.find_key(self.key)
        if token is not None:
            return token
        deadline = time.monotonic() + self.timeout
        pubsub = self.store.redis.pubsub(ignore_subscribe_messages=True)
        try:
            with redis_errors(self.store.redis):
                await pubsub.subscribe(self.store.keys.channel(self.key))
                while True:
                    token = await self._step()
                    if token is not None:
                        return token
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise timeout_error(self.store, self.key, self.timeout, self.fetches_itself)
                    await self._wait(pubsub, min(POLL, left))
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _wait(self, pubsub: Any, seconds: float) -> None:
        message = await pubsub.get_message(timeout=seconds)
        if message is None:
            return
        error = parse(message["data"])
        if error is not None and await self.store.find_key(self.key) is None:
            raise RefreshError(f"fetching {self.store.keys.token(self.key)!r} failed: {error}")

    async def _step(self) -> Token | None:
        token = await self.store.find_key(self.key)
        if token is not None:
            return token
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
            await self.store.redis.publish(self.store.keys.channel(self.key), error_message(str(e)))
            raise
        await self.store.write(self.key, token, fetched=True)
        return token

    async def _ask_workers(self) -> None:
        redis, keys, rq = self.store.redis, self.store.keys, self.store.refresh_queue
        if not await redis.set(keys.want(self.key), self.owner, nx=True, px=int(WANT_TTL * 1000)):
            return
        await redis.zadd(keys.index, {keys.token(self.key): 0}, nx=True)
        if not rq.queue.redis_server_version:  # RQ would ask with its offline sync client
            rq.queue.redis_server_version = await _server_version(redis)
        recorder = _Recorder()
        rq.enqueue_into(recorder, self.key, self.store.refresh_before)
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

_default: TokenStore | None = None
_default_loop: asyncio.AbstractEventLoop | None = None


def default_store() -> TokenStore:
    """This event loop's default store, built from the environment (a redis.asyncio client is per loop)."""
    global _default, _default_loop
    loop = asyncio.get_running_loop()
    if _default is None or _default_loop is not loop:
        _default, _default_loop = TokenStore.from_url(None), loop
    return _default


async def store(token: Token, info: object = None, sub: str | None = None) -> Job:
    return await default_store().store(token, info, sub)


async def find(info: object, sub: str | None = None) -> Token | None:
    return await default_store().find(info, sub)


async def for_scope(info: object, sub: str | None = None, timeout: float = 30.0) -> Token:
    return await default_store().for_scope(info, sub, timeout)


async def delete(info: object, sub: str | None = None) -> bool:
    return await default_store().delete(info, sub)
