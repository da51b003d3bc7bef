"""``for_scope``: on a cache miss, exactly one fetch for the whole fleet; everyone else waits for it.

Who fetches: a caller that holds the account's credentials fetches itself,
under the token's lock (the same lock the refresh job takes, so a worker's
refresh and an app's fetch never overlap). A caller without credentials (an
app server: only workers hold keys) asks the worker pool for an immediate
refresh, once per ``{ns}:want:…`` marker, and waits.

How waiting works: waiters subscribe to ``{ns}:fetched:{key}`` *before*
looking at the cache, so a store that lands between the look and the wait
still wakes them. Every store publishes there (in the same transaction), and
a failed fetch publishes its error so waiters fail at once instead of timing
out. A fallback poll every ``FLEET_POLL`` seconds covers a lost message and lets
the next caller take over from a fetcher that died (its lock expires).

:class:`~tokencache.app.core.FleetFetchCore` holds what a miss decides,
without I/O: what to do after a look at the cache, how long to wait, which
errors the fleet is told about. :class:`FleetFetch` here and its asyncio twin in
:mod:`tokencache.aio.fleet` only do the I/O around it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, cast

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
from tokencache.core.locks import Lock
from tokencache.keys import TokenKey
from tokencache.token import Token

if TYPE_CHECKING:
    from tokencache.app.tokenstore import TokenStore

__all__ = ["FleetFetch", "Flights"]


class Flights:
    """Concurrent misses on one key inside one process share one fleet fetch.

    Without this, every thread waiting on a cold key would hold a pub/sub
    connection of its own and exhaust the client's connection pool.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[TokenKey, Future[Token]] = {}

    def run(self, fetch: FleetFetch) -> Token:
        """The token ``fetch`` gets: this thread runs it, or waits for the thread already running it."""
        with self._lock:
            future = self._running.get(fetch.key)
            leader = future is None
            if future is None:
                future = self._running[fetch.key] = Future()
        if not leader:
            try:
                return future.result(timeout=fetch.timeout)
            except FutureTimeout:
                raise fetch.timed_out() from None
        return self._lead(fetch, future)

    def _lead(self, fetch: FleetFetch, future: Future[Token]) -> Token:
        try:
            token = fetch.run()
            future.set_result(token)
            return token
        except BaseException as e:
            future.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._running[fetch.key]


class FleetFetch(FleetFetchCore):
    """One ``for_scope`` miss of a synchronous process."""

    store: TokenStore

    def run(self) -> Token:
        """Look, fetch or ask, and wait for wake-ups until the token is there (or the timeout)."""
        redis = self.store.redis
        with redis_errors(redis), redis.pubsub() as sub:  # type: ignore[no-untyped-call]
            sub.subscribe(self.store.keys.channel(self.key))
            sub.get_message(timeout=min(SUBSCRIBE_WAIT, self.timeout))  # subscribed before we look
            return self._until_found(sub)

    def _until_found(self, sub: Any) -> Token:
        while True:
            token = self._step()
            if token is not None:
                return token
            self._wait(sub, self.wait_time())

    def _wait(self, sub: Any, seconds: float) -> None:
        error = message_error(sub.get_message(timeout=seconds))
        if error is not None and self.store.find_key(self.key) is None:
            raise fetch_failed(self.store, self.key, error)

    def _step(self) -> Token | None:
        """Look once more; fetch or ask the workers if nobody is on it. The token, or None to wait."""
        token = self.store.find_key(self.key)
        move = self.next_move(token, None if token is not None else self._error())
        if move is Move.FETCH:
            return self._fetch_if_free()
        if move is Move.ASK:
            self._ask_workers()
        return token

    def _error(self) -> bytes | None:
        with redis_errors(self.store.redis):
            return cast(bytes | None, self.store.redis.get(self.store.keys.error(self.key)))

    def _fetch_if_free(self) -> Token | None:
        lock = Lock(self.store.redis, self.store.keys.lock(self.key), LOCK_TTL, owner=self.owner)
        with redis_errors(self.store.redis):
            if not lock.acquire():
                return None
        lock.keep()  # renewed while this process fetches; lapses soon if it dies
        try:
            return self.store.find_key(self.key) or self._fetch()
        finally:
            with redis_errors(self.store.redis):
                lock.release()

    def _fetch(self) -> Token:
        with redis_errors(self.store.redis):
            hold_ms = self.store.redis.pttl(self.store.keys.backoff(self.key.account))
        held = held_back(self.store, self.key, hold_ms)
        if held is not None:
            raise held  # the endpoint rate-limited the account: this process holds off too
        try:
            token = self.store.sources.fetch(self.key, account=account_arg(self.key))
        except REPORTED as e:
            with redis_errors(self.store.redis), self.store.redis.pipeline(transaction=True) as pipe:
                self.store.failure_commands(pipe, self.key, str(e), gave_up=False, hold=hold_of(e))
                pipe.execute()
            raise
        self.store.write(self.key, token, fetched=True)
        return token

    def _ask_workers(self) -> None:
        redis, keys = self.store.redis, self.store.keys
        with redis_errors(redis):
            if not redis.set(keys.want(self.key), self.owner, nx=True, px=int(WANT_TTL * 1000)):
                return  # asked already; wait for the answer
            with redis.pipeline(transaction=True) as pipe:
                pipe.multi()  # before any command: RQ's enqueue_job() would start the transaction itself
                self.store.ask_workers_commands(pipe, self.key)
                pipe.execute()
