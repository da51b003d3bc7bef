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
out. A fallback poll every ``POLL`` seconds covers a lost message and lets
the next caller take over from a fetcher that died (its lock expires).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .connection import redis_errors
from .errors import ConfigurationError, FetchTimeoutError, RefreshError
from .keys import DEFAULT_ACCOUNT, TokenKey
from .locks import LOCK_TTL, Lock
from .notify import error_message, parse
from .token import Token

if TYPE_CHECKING:
    from .tokenstore import StoreCore, TokenStore

__all__ = ["POLL", "WANT_TTL", "FleetFetch", "check_timeout", "timeout_error"]

POLL = 0.5
"""Seconds between fallback looks at the cache while waiting (a bound, not the normal wake-up)."""
WANT_TTL = 2 * LOCK_TTL
"""How long one request to the workers stands before a waiter may repeat it (a lost job, a dead pool)."""


def check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    return float(timeout)


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


def account_arg(key: TokenKey) -> str | None:
    """The Token.account of a freshly fetched token (``default`` is stored as None)."""
    return None if key.account == DEFAULT_ACCOUNT else key.account


@dataclass
class FleetFetch:
    """One ``for_scope`` call of a synchronous process."""

    store: TokenStore
    key: TokenKey
    timeout: float
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def fetches_itself(self) -> bool:
        return self.store.sources.has(self.key.account)

    def run(self) -> Token:
        token = self.store.find_key(self.key)
        if token is not None:
            return token
        deadline = time.monotonic() + self.timeout
        with redis_errors(self.store.redis), self.store.redis.pubsub(ignore_subscribe_messages=True) as sub:  # type: ignore[no-untyped-call]
            sub.subscribe(self.store.keys.channel(self.key))
            while True:
                token = self._step()
                if token is not None:
                    return token
                left = deadline - time.monotonic()
                if left <= 0:
                    raise timeout_error(self.store, self.key, self.timeout, self.fetches_itself)
                self._wait(sub, min(POLL, left))

    def _wait(self, sub: Any, seconds: float) -> None:
        message = sub.get_message(timeout=seconds)
        if message is None:
            return
        error = parse(message["data"])
        if error is not None and self.store.find_key(self.key) is None:
            raise RefreshError(f"fetching {self.store.keys.token(self.key)!r} failed: {error}")

    def _step(self) -> Token | None:
        """Look once more; fetch or ask the workers if nobody is on it. The token, or None to wait."""
        token = self.store.find_key(self.key)
        if token is not None:
            return token
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
            with redis_errors(self.store.redis):
                self.store.redis.publish(self.store.keys.channel(self.key), error_message(str(e)))
            raise
        self.store.write(self.key, token, fetched=True)
        return token

    def _ask_workers(self) -> None:
        redis, keys = self.store.redis, self.store.keys
        with redis_errors(redis):
            if not redis.set(keys.want(self.key), self.owner, nx=True, px=int(WANT_TTL * 1000)):
                return  # asked already; wait for the answer
            redis.zadd(keys.index, {keys.token(self.key): 0}, nx=True)  # so the job knows it is wanted
            self.store.refresh_queue.enqueue(self.key, self.store.refresh_before)
