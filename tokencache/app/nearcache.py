"""The near cache: tokens kept in the process, dropped the moment Redis says their key changed.

Opt in with ``TokenStore(..., near_cache=True)``. A hit is a dict lookup and
an expiry check, no round trip. What keeps it correct is Redis itself: a
dedicated RESP3 connection turns on server-assisted client-side caching in
broadcast mode for the namespace's token keys
(``CLIENT TRACKING ON BCAST PREFIX {ns}:token:``), and Redis pushes an
``invalidate`` message on it for every write, delete or expiry of such a key,
whoever made it. A thread reads those pushes and drops the keys.

Why broadcast mode: tracking in the default mode follows only the keys read
on the tracking connection itself, so every pooled connection would need it;
broadcast needs one connection per process and tells it about every token
key. Tokens change once per lifetime each, so the extra messages are few.

Why it never serves a stale entry for long, or an expired one ever:

* A hit is checked against the token's own ``expires`` every time (the same
  one-second skew as ``find()``), whatever Redis says.
* The cache serves nothing until tracking is confirmed, and is emptied
  whenever the tracking connection fails or is re-established (a Redis
  restart, a failover, a network cut: writes made meanwhile were not seen).
  An idle connection is pinged every :data:`PING_EVERY` seconds, so a silent
  cut is noticed within :data:`PING_EVERY` + :data:`PING_TIMEOUT` seconds.
* A read and an invalidation can cross: the reply may carry the old value
  while the push about a newer write is already being handled. Every
  invalidation bumps an epoch; a read fills the cache only if no
  invalidation arrived since it started.
* A forked child (gunicorn's ``--preload``) starts with an empty cache and its
  own tracking connection: the parent's thread did not survive the fork.

redis-py's own client-side cache (``cache_config=``) needs Redis 7.4; this
works from Redis 6 on (tested on 7.0), and on any client of the pool.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import redis
import redis.connection
from redis._parsers import _RESP3Parser
from redis.asyncio import Redis as AsyncRedis
from redis.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

from tokencache.constants import (
    EXPIRY_SKEW,
    FOLLOW_EVERY,
    LEASE,
    NEAR_MAX_ENTRIES,
    NEAR_POLL,
    NEAR_READ_TIMEOUT,
    PING_EVERY,
    PING_TIMEOUT,
    RETRY_MAX,
    RETRY_MIN,
)
from tokencache.core.connection import connect
from tokencache.core.sentinel import master_moved
from tokencache.errors import ConfigurationError
from tokencache.token import Token

__all__ = ["NearCache"]

log = logging.getLogger(__name__)

_INVALIDATE = (b"invalidate", "invalidate")
_ASYNC_ONLY = ("retry", "redis_connect_func", "credential_provider")


class NearCache:
    """Tokens by hash key, valid while Redis tracking is up; see the module docstring."""

    def __init__(
        self, client: redis.Redis | AsyncRedis, prefix: str, *, max_entries: int = NEAR_MAX_ENTRIES
    ) -> None:
        self.connection = tracking_connection_factory(client)
        self.prefix = prefix
        self._max_entries = max_entries
        self._entries: dict[str, Token] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._epoch = 0
        self._active = False
        self._closed = threading.Event()
        self._heard = 0.0  # when the reader last heard from Redis (monotonic)
        self._reader: _Reader | None = None
        _live.add(self)
        # A store dropped without close() must not leave its reader and connection behind: the
        # reader holds only a weak reference, and stops when this is collected.
        weakref.finalize(self, self._closed.set)
        self._start()

    def _start(self) -> None:
        with self._lock:
            alive = self._reader is not None and self._reader.is_alive()
            if not alive and not self._closed.is_set():
                self._reader = _Reader(self)
                self._reader.start()

    @property
    def active(self) -> bool:
        """Whether tracking is confirmed, so that entries may be served."""
        return self._active

    def get(self, redis_key: str, now: float) -> Token | None:
        """The cached token if tracking is up and the token has more than the skew left.

        Tracking also has to be recent: a process that was paused or starved serves nothing until
        its reader has heard from Redis again (the lease), since pushes may be waiting unread.
        """
        if not self._active or time.monotonic() - self._heard > LEASE:
            if self._reader is None or not self._reader.is_alive():
                self._start()
            return None
        token = self._entries.get(redis_key)
        if token is None or token.expires - now <= EXPIRY_SKEW:
            return None
        return token

    def epoch(self) -> int | None:
        """Take before a read that may fill the cache; None while entries may not be kept."""
        return self._epoch if self._active else None

    def put(self, redis_key: str, token: Token, epoch: int | None) -> None:
        """Keep ``token``, read since :meth:`epoch` returned ``epoch``, unless something changed meanwhile."""
        with self._lock:
            if epoch is None or not self._active or epoch != self._epoch:
                return
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
            self._entries[redis_key] = token

    def invalidate(self, keys: list[str] | None) -> None:
        """Drop ``keys`` (all of them for None); also cancels fills that started before this."""
        with self._lock:
            self._epoch += 1
            if keys is None:
                self._entries.clear()
            else:
                for key in keys:
                    self._entries.pop(key, None)

    def _set_active(self, active: bool) -> None:
        with self._lock:
            self._epoch += 1
            self._entries.clear()
            self._active = active and not self._closed.is_set()
            self._heard = time.monotonic()
            self._changed.notify_all()

    def wait_active(self, timeout: float) -> bool:
        """Wait until tracking is confirmed (for tests, and for callers that want hits from the start)."""
        self._start()
        with self._changed:
            return self._changed.wait_for(lambda: self._active or self._closed.is_set(), timeout) and (
                self._active
            )

    def close(self) -> None:
        """Stop the reader thread and forget every entry."""
        self._closed.set()
        with self._changed:
            self._changed.notify_all()
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=PING_TIMEOUT + 1)
        self._set_active(False)

    def _after_fork(self) -> None:
        """In a forked child: the reader thread is gone; the first read starts one of the child's own."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._entries = {}
        self._active = False
        self._epoch += 1
        self._reader = None


def tracking_connection_factory(client: redis.Redis | AsyncRedis) -> Callable[[], Any]:
    """New sync connections like ``client``'s pool makes, but RESP3 and without health checks.

    The reader is a thread with a blocking socket even for an asyncio store.
    Health checks would send PING on their own and read its reply, which
    could be a push; the reader pings itself instead.
    """
    pool = client.connection_pool
    sentinel_url = getattr(pool, "tokencache_url", "")
    if sentinel_url:
        # A sync twin of the pool (the reader is a thread), whose manager asks the sentinels where the
        # master is. Its connections do not move by themselves: a silent move would lose tracking, so
        # the reader checks (master_moved) and starts over, emptying the cache.
        pool = connect(sentinel_url).connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs.update(protocol=3, parser_class=_RESP3Parser, health_check_interval=0, socket_keepalive=True)
        kwargs["socket_timeout"] = NEAR_READ_TIMEOUT
        tls = issubclass(pool.connection_class, redis.SSLConnection)
        sentinel_class: Any = SentinelManagedSSLConnection if tls else SentinelManagedConnection
        return lambda: sentinel_class(**kwargs)
    kwargs = dict(pool.connection_kwargs)
    kwargs.update(protocol=3, parser_class=_RESP3Parser, health_check_interval=0, socket_keepalive=True)
    if kwargs.get("socket_timeout") is None:
        kwargs["socket_timeout"] = NEAR_READ_TIMEOUT  # a read must never block the reader for good
    connection_class: Any = pool.connection_class
    if isinstance(client, AsyncRedis):
        name = connection_class.__name__
        connection_class = getattr(redis.connection, name, None)
        if connection_class is None:
            raise ConfigurationError(f"the near cache cannot track through a {name} connection")
        for async_only in _ASYNC_ONLY:  # an asyncio Retry or connect hook would hand back coroutines
            kwargs.pop(async_only, None)
    return lambda: connection_class(**kwargs)


class _CacheGone(Exception):
    """The cache was collected (its store dropped without close()): the reader stops."""


class _Reader(threading.Thread):
    """Keeps one tracking connection up and applies its invalidation pushes to the cache.

    It holds the cache only weakly, so that a store dropped without ``close()`` is collected and
    its reader ends (within :data:`NEAR_POLL`), closing the connection.
    """

    def __init__(self, cache: NearCache) -> None:
        super().__init__(name=f"tokencache-near-cache-{cache.prefix}", daemon=True)
        self._cache_ref = weakref.ref(cache)
        self._closed = cache._closed
        self._connect = cache.connection
        self._prefix = cache.prefix
        self._warned = False
        self._tracked = False  # whether the last session got as far as tracking

    def _cache(self) -> NearCache:
        cache = self._cache_ref()
        if cache is None:
            raise _CacheGone
        return cache

    def run(self) -> None:
        delay = RETRY_MIN
        while not self._closed.is_set():
            try:
                self._session()
                delay = RETRY_MIN
            except _CacheGone:
                return
            except (redis.RedisError, OSError) as e:
                self._report(e)
                if self._tracked:  # it worked until now (a failover, a restart): try again soon
                    delay, self._tracked = RETRY_MIN, False
            except Exception:  # a bug or a surprise must not end the near cache for good
                log.exception("near cache reader failed; starting over (find() reads Redis meanwhile)")
            finally:
                cache = self._cache_ref()
                if cache is not None:
                    cache._set_active(False)
                del cache
            self._closed.wait(delay)
            delay = min(RETRY_MAX, delay * 2)

    def _report(self, error: Exception) -> None:
        level = logging.DEBUG if self._warned else logging.WARNING
        if isinstance(error, redis.ResponseError):
            log.log(
                level,
                "near cache off: Redis refused CLIENT TRACKING (%s); every find() reads Redis. "
                "The Redis user needs the +client|tracking command (Redis >= 6).",
                error,
            )
        else:
            log.log(level, "near cache off until Redis tracking is back; find() reads Redis: %s", error)
        self._warned = True

    def _session(self) -> None:
        conn = self._connect()
        try:
            conn.connect()
            conn._parser.set_invalidation_push_handler(lambda push: push)
            conn.send_command("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", self._prefix)
            self._reply(conn)  # OK (a refusal raises ResponseError)
            self._cache()._set_active(True)
            self._tracked = True
            if self._warned:
                log.warning("near cache on again: Redis tracking is back")
                self._warned = False
            self._listen(conn)
        finally:
            conn.disconnect()

    def _reply(self, conn: Any) -> Any:
        """The next reply that is not a push (applying the pushes read on the way)."""
        while True:
            reply = conn.read_response(push_request=True)
            if not self._apply(reply):
                return reply

    def _listen(self, conn: Any) -> None:
        ping_sent: float | None = None
        followed = time.monotonic()
        while not self._closed.is_set():
            now = time.monotonic()
            if now - followed > FOLLOW_EVERY:
                followed = now
                if master_moved(conn):  # writes now go elsewhere, unseen: start over on the new master
                    raise redis.ConnectionError("the Redis master moved (a Sentinel failover)")
            if conn.can_read(timeout=NEAR_POLL):
                reply = conn.read_response(push_request=True)
                if not self._apply(reply):
                    ping_sent = None  # the PONG
                self._cache()._heard = time.monotonic()
            elif ping_sent is not None and now - ping_sent > PING_TIMEOUT:
                raise redis.TimeoutError(f"no answer to PING in {PING_TIMEOUT} s on the tracking connection")
            elif ping_sent is None and now - self._cache()._heard > PING_EVERY:
                conn.send_command("PING")
                ping_sent = now

    def _apply(self, reply: Any) -> bool:
        """Apply ``reply`` if it is an invalidation push; whether it was one."""
        if not (isinstance(reply, list) and reply and reply[0] in _INVALIDATE):
            return False
        keys = reply[1] if len(reply) > 1 else None
        if keys is None:  # the whole database was emptied, or too many keys to name
            self._cache().invalidate(None)
        else:
            # Any bytes may be a key under the prefix; one that is not UTF-8 is none of ours.
            names = [k.decode(errors="surrogateescape") if isinstance(k, bytes) else str(k) for k in keys]
            self._cache().invalidate(names)
        return True


_live: weakref.WeakSet[NearCache] = weakref.WeakSet()


def _reinit_after_fork() -> None:
    for cache in list(_live):
        cache._after_fork()


os.register_at_fork(after_in_child=_reinit_after_fork)
