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
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from tokencache.constants import FLEET_POLL, LOCK_TTL, WANT_TTL
from tokencache.core.connection import redis_errors
from tokencache.core.locks import Lock
from tokencache.core.notify import parse
from tokencache.errors import ConfigurationError, FetchTimeoutError, RefreshError
from tokencache.keys import DEFAULT_ACCOUNT, TokenKey
from tokencache.token import Token

if TYPE_CHECKING:
    from tokencache.store.core import StoreCore
    from tokencache.store.tokenstore import TokenStore

__all__ = ["FleetFetch", "Flights", "fetch_failed", "timeout_error"]


def timeout_error(store: StoreCore, key: TokenKey, timeout: float, fetches_itself: bool) -> FetchTimeoutError:
    """The error a waiter raises, saying what to check."""
    if fetches_itself:
        hint = (
            "this process holds the account's credentials, but another fetch held the token's lock "
            "and never stored a result: is the token endpoint answering?"
        )
    else:
        hint = (
            f"the fetch was handed to the refresh workers on queue {store.refresh_queue.name!r}: are "
            f"'tokencache worker' processes running there, with credentials for account {key.account!r}?"
        )
    return FetchTimeoutError(f"no token for {store.keys.token(key)!r} within {timeout:g}s; {hint}")


def fetch_failed(store: StoreCore, key: TokenKey, error: str) -> RefreshError:
    """The error a waiter raises when the fleet's fetch of ``key`` failed."""
    return RefreshError(f"fetching {store.keys.token(key)!r} failed: {error}")


def account_arg(key: TokenKey) -> str | None:
    """The Token.account of a freshly fetched token (``default`` is stored as None)."""
    return None if key.account == DEFAULT_ACCOUNT else key.account


class Flights:
    """Concurrent misses on one key inside one process share one fleet fetch.

    Without this, every thread waiting on a cold key would hold a pub/sub
    connection of its own and exhaust the client's connection pool.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[TokenKey, Future[Token]] = {}

    def run(self, key: TokenKey, timeout: float, fetch: Callable[[], Token]) -> Token:
        with self._lock:
            future = self._running.get(key)
            leader = future is None
            if future is None:
                future = self._running[key] = Future()
        if not leader:
            try:
                return future.result(timeout=timeout)
            except FutureTimeout:
                raise FetchTimeoutError(f"no token for {key.encode()!r} within {timeout:g}s") from None
        try:
            token = fetch()
            future.set_result(token)
            return token
        except BaseException as e:
            future.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._running[key]


@dataclass
class FleetFetch:
    """One ``for_scope`` miss of a synchronous process."""

    store: TokenStore
    key: TokenKey
    timeout: float
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def fetches_itself(self) -> bool:
        return self.store.sources.has(self.key.account)

    def run(self) -> Token:
        deadline = time.monotonic() + self.timeout
        redis = self.store.redis
        with redis_errors(redis), redis.pubsub() as sub:  # type: ignore[no-untyped-call]
            sub.subscribe(self.store.keys.channel(self.key))
            sub.get_message(timeout=min(1.0, self.timeout))  # the confirmation: subscribed before we look
            while True:
                token = self._step()
                if token is not None:
                    return token
                left = deadline - time.monotonic()
                if left <= 0:
                    raise timeout_error(self.store, self.key, self.timeout, self.fetches_itself)
                self._wait(sub, min(FLEET_POLL, left))

    def _wait(self, sub: Any, seconds: float) -> None:
        message = sub.get_message(timeout=seconds)
        if message is None or message["type"] != "message":
            return
        error = parse(message["data"])
        if error is not None and self.store.find_key(self.key) is None:
            raise fetch_failed(self.store, self.key, error)

    def _step(self) -> Token | None:
        """Look once more; fetch or ask the workers if nobody is on it. The token, or None to wait."""
        token = self.store.find_key(self.key)
        if token is not None:
            return token
        with redis_errors(self.store.redis):
            error = cast(bytes | None, self.store.redis.get(self.store.keys.error(self.key)))
        if error is not None:
            raise fetch_failed(self.store, self.key, error.decode(errors="replace"))
        if self.fetches_itself:
            return self._fetch_if_free()
        self._ask_workers()
        return None

    def _fetch_if_free(self) -> Token | None:
        lock = Lock(self.store.redis, self.store.keys.lock(self.key), LOCK_TTL, owner=self.owner)
        with redis_errors(self.store.redis):
            if not lock.acquire():
                return None
        try:
            return self.store.find_key(self.key) or self._fetch()
        finally:
            with redis_errors(self.store.redis):
                lock.release()

    def _fetch(self) -> Token:
        try:
            token = self.store.sources.fetch(self.key, account=account_arg(self.key))
        except (RefreshError, ConfigurationError) as e:
            with redis_errors(self.store.redis), self.store.redis.pipeline(transaction=True) as pipe:
                self.store.failure_commands(pipe, self.key, str(e), gave_up=False)
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
