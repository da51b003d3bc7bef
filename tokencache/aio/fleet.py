"""``for_scope`` on asyncio: the twin of :mod:`tokencache.app.fleet`, whose docstring says how a miss works.

The decisions are :class:`~tokencache.app.core.FleetFetchCore`'s; this module
only does their I/O on ``redis.asyncio``. A fetch with local credentials runs
google-auth in a thread.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

from tokencache.aio.locks import Lock
from tokencache.aio.recorder import Recorder
from tokencache.app.core import (
    REPORTED,
    FleetFetchCore,
    Move,
    account_arg,
    fetch_failed,
    held_back,
    hold_of,
    message_error,
)
from tokencache.constants import LOCK_TTL, SUBSCRIBE_WAIT, WANT_TTL
from tokencache.core.connection import redis_errors
from tokencache.keys import TokenKey
from tokencache.token import Token

if TYPE_CHECKING:
    from tokencache.aio.tokenstore import TokenStore

__all__ = ["FleetFetch", "Flights"]


class Flights:
    """Concurrent misses on one key inside one process share one fleet fetch.

    Without this, every coroutine waiting on a cold key would hold a pub/sub
    connection of its own and exhaust the client's connection pool. The fetch is
    a task of its own and every caller waits on it shielded, so a caller
    cancelled mid-fetch does not abandon the fleet's fetch.
    """

    def __init__(self) -> None:
        self._running: dict[TokenKey, asyncio.Future[Token]] = {}

    async def run(self, fetch: FleetFetch) -> Token:
        """The token ``fetch`` gets: this call starts its task, or waits for the task already running."""
        future = self._running.get(fetch.key)
        if future is None:
            future = self._running[fetch.key] = asyncio.ensure_future(fetch.run())
            future.add_done_callback(lambda _: self._running.pop(fetch.key, None))
        try:
            return await asyncio.wait_for(asyncio.shield(future), fetch.timeout)
        except TimeoutError:
            raise fetch.timed_out() from None


class FleetFetch(FleetFetchCore):
    """One ``for_scope`` miss of an asyncio process."""

    store: TokenStore

    async def run(self) -> Token:
        """Look, fetch or ask, and wait for wake-ups until the token is there (or the timeout)."""
        redis = self.store.redis
        with redis_errors(redis):
            async with redis.pubsub() as sub:
                await sub.subscribe(self.store.keys.channel(self.key))
                await sub.get_message(timeout=min(SUBSCRIBE_WAIT, self.timeout))  # subscribed before we look
                return await self._until_found(sub)

    async def _until_found(self, sub: Any) -> Token:
        while True:
            token = await self._step()
            if token is not None:
                return token
            await self._wait(sub, self.wait_time())

    async def _wait(self, sub: Any, seconds: float) -> None:
        error = message_error(await sub.get_message(timeout=seconds))
        if error is not None and await self.store.find_key(self.key) is None:
            raise fetch_failed(self.store, self.key, error)

    async def _step(self) -> Token | None:
        """Look once more; fetch or ask the workers if nobody is on it. The token, or None to wait."""
        token = await self.store.find_key(self.key)
        move = self.next_move(token, None if token is not None else await self._error())
        if move is Move.FETCH:
            return await self._fetch_if_free()
        if move is Move.ASK:
            await self._ask_workers()
        return token

    async def _error(self) -> bytes | None:
        with redis_errors(self.store.redis):
            return cast(bytes | None, await self.store.redis.get(self.store.keys.error(self.key)))

    async def _fetch_if_free(self) -> Token | None:
        lock = Lock(self.store.redis, self.store.keys.lock(self.key), LOCK_TTL, owner=self.owner)
        with redis_errors(self.store.redis):
            if not await lock.acquire():
                return None
        lock.keep()  # renewed while this process fetches; lapses soon if it dies
        try:
            return await self.store.find_key(self.key) or await self._fetch()
        finally:
            with redis_errors(self.store.redis):
                await lock.release()

    async def _fetch(self) -> Token:
        with redis_errors(self.store.redis):
            hold_ms = await self.store.redis.pttl(self.store.keys.backoff(self.key.account))
        held = held_back(self.store, self.key, hold_ms)
        if held is not None:
            raise held  # the endpoint rate-limited the account: this process holds off too
        try:
            token = await asyncio.to_thread(self.store.sources.fetch, self.key, account=account_arg(self.key))
        except REPORTED as e:
            with redis_errors(self.store.redis), Recorder(self.store.redis) as pipe:
                self.store.failure_commands(pipe, self.key, str(e), gave_up=False, hold=hold_of(e))
                await pipe.execute()
            raise
        await self.store.write(self.key, token, fetched=True)
        return token

    async def _ask_workers(self) -> None:
        redis, keys = self.store.redis, self.store.keys
        with redis_errors(redis):
            if not await redis.set(keys.want(self.key), self.owner, nx=True, px=int(WANT_TTL * 1000)):
                return  # asked already; wait for the answer
            with Recorder(redis) as pipe:
                pipe.multi()  # before any command: RQ's enqueue_job() would start the transaction itself
                self.store.ask_workers_commands(pipe, self.key)
                await pipe.execute()
