"""The near cache: served from the process, never past expiry, and invalidated by Redis within 50 ms.

Every test runs against a real redis-server (fakeredis has no CLIENT TRACKING):
the session's, or one started by the test when it must be restarted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
from redis import Redis

from tokencache import RedisUnavailableError, Token, TokenStore
from tokencache.testing.redisserver import EmbeddedRedis

from .conftest import SCOPE, Workers, wait_for

NS = "tc-near"
SEEN_WITHIN = 0.050
"""The near cache's promised bound (docs/near-cache.md): a write by another process is seen within 50 ms."""


_AN_HOUR_ON = int(time.time()) + 7200
"""One expiry for the long-lived test tokens, so that token("a") == token("a") across a second boundary."""


def token(tag: str, life: int | None = None) -> Token:
    expires = _AN_HOUR_ON if life is None else int(time.time()) + life
    return Token(token=f"ya29.near-{tag}", scope=SCOPE, expires=expires)


def hgetall_calls(client: Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_hgetall", {})
    return int(stats.get("calls", 0))


@pytest.fixture
def writer(real_redis: Redis) -> TokenStore:
    """A plain store: the rest of the fleet."""
    return TokenStore(real_redis, namespace=NS)


@pytest.fixture
def near(redis_url: str, real_redis: Redis) -> Iterator[TokenStore]:
    store = TokenStore.from_url(redis_url, namespace=NS, near_cache=True)
    assert store.near_cache is not None and store.near_cache.wait_active(5)
    yield store
    store.close()


def store_and_settle(writer: TokenStore, near: object, stored: Token) -> None:
    """Store through ``writer`` and wait until ``near``'s cache has handled the push about it."""
    cache = near.near_cache  # type: ignore[attr-defined]
    before = cache.epoch()
    writer.store(stored)
    wait_for(lambda: cache.epoch() != before, 5, interval=0.001, what="the invalidation push")


def wait_seen(read: object, expected: object, timeout: float = 5.0) -> float:
    """Spin on ``read()`` until it returns ``expected``; seconds it took (fails after ``timeout``)."""
    started = time.perf_counter()
    while read() != expected:  # type: ignore[operator]
        if time.perf_counter() - started > timeout:
            raise AssertionError(f"not seen within {timeout}s")
    return time.perf_counter() - started


def test_a_hit_makes_no_round_trip(near: TokenStore, writer: TokenStore, real_redis: Redis) -> None:
    store_and_settle(writer, near, token("a"))
    assert near.find(SCOPE) == token("a")  # the first read fills the cache
    before = hgetall_calls(real_redis)
    for _ in range(100):
        assert near.find(SCOPE) == token("a")
        assert near.for_scope(SCOPE) == token("a")
    assert hgetall_calls(real_redis) == before


def test_never_past_expiry(redis_url: str, writer: TokenStore) -> None:
    """The token's own expires is checked on every hit, whatever Redis says (a clock we move)."""
    now = [time.time()]
    store = TokenStore(Redis.from_url(redis_url), namespace=NS, near_cache=True, clock=lambda: now[0])
    try:
        assert store.near_cache is not None and store.near_cache.wait_active(5)
        stored = token("short", life=60)
        writer.store(stored)
        assert store.find(SCOPE) == stored
        now[0] = stored.expires - 1.01
        assert store.find(SCOPE) == stored
        now[0] = stored.expires - 1  # inside the one-second skew: as find() without the cache
        assert store.find(SCOPE) is None
        now[0] = stored.expires + 5
        assert store.find(SCOPE) is None
    finally:
        store.close()


def test_token_expiring_in_redis_is_not_served(near: TokenStore, writer: TokenStore) -> None:
    stored = token("brief", life=3)
    writer.store(stored)
    assert near.find(SCOPE) == stored
    wait_for(lambda: near.find(SCOPE) is None, 5, interval=0.01, what="the expiring token to go")
    assert time.time() >= stored.expires - 1


def test_own_writes_are_seen_at_once(near: TokenStore) -> None:
    near.store(token("1"))
    assert near.find(SCOPE) == token("1")
    near.store(token("2"))
    assert near.find(SCOPE) == token("2")
    near.delete(SCOPE)
    assert near.find(SCOPE) is None


def test_writes_by_this_process_on_other_connections(near: TokenStore, writer: TokenStore) -> None:
    writer.store(token("old"))
    assert near.find(SCOPE) == token("old")
    writer.store(token("new"))
    assert wait_seen(lambda: near.find(SCOPE), token("new")) < SEEN_WITHIN
    writer.delete(SCOPE)
    assert wait_seen(lambda: near.find(SCOPE), None) < SEEN_WITHIN


_WRITER = textwrap.dedent(
    """
    import json, sys, time
    from tokencache import Token, TokenStore
    url, ns, scope = sys.argv[1:4]
    store = TokenStore.from_url(url, namespace=ns)
    for line in sys.stdin:
        op, tag = line.split()
        if op == "store":
            store.store(Token(token="ya29.near-" + tag, scope=scope, expires=int(time.time()) + 3600))
        else:
            store.delete(scope)
        print(json.dumps({"done": time.time()}), flush=True)
    """
)


def test_writes_by_another_process_are_seen_within_50ms(near: TokenStore, redis_url: str) -> None:
    lags = []
    with subprocess.Popen(
        [sys.executable, "-c", _WRITER, redis_url, NS, SCOPE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        for i in range(20):
            op = "delete" if i % 5 == 4 else "store"
            expected = None if op == "delete" else f"ya29.near-{i}"
            child.stdin.write(f"{op} {i}\n")
            child.stdin.flush()
            done = json.loads(child.stdout.readline())["done"]
            wait_seen(lambda: getattr(near.find(SCOPE), "token", None), expected)
            lags.append(time.time() - done)
        child.stdin.close()
    # Seen-at minus the writer's own "done" (same clock): how stale a reader could be.
    assert max(lags) < SEEN_WITHIN, sorted(lags)


def test_fill_racing_an_invalidation_is_not_kept(near: TokenStore, writer: TokenStore) -> None:
    """A read that started before an invalidation must not put its (maybe old) value in the cache."""
    cache = near.near_cache
    assert cache is not None
    writer.store(token("x"))
    epoch = cache.epoch()
    cache.invalidate([near.keys.token(near.key_for(token("x")))])  # as if a push arrived meanwhile
    cache.put(near.keys.token(near.key_for(token("x"))), token("stale"), epoch)
    assert near.find(SCOPE) == token("x")


def test_flushdb_empties_the_cache(near: TokenStore, writer: TokenStore, real_redis: Redis) -> None:
    writer.store(token("f"))
    assert near.find(SCOPE) == token("f")
    real_redis.flushdb()  # server started by this test
    assert wait_seen(lambda: near.find(SCOPE), None) < SEEN_WITHIN


def test_redis_restart_empties_the_cache() -> None:
    """After a restart (data gone, writes unseen while down) nothing cached before is served."""
    server = EmbeddedRedis().start()
    port = server.port
    store = TokenStore.from_url(server.url, namespace=NS, near_cache=True, socket_timeout=1)
    try:
        assert store.near_cache is not None and store.near_cache.wait_active(5)
        store.store(token("before"))
        assert store.find(SCOPE) == token("before")
        server.stop()
        wait_for(lambda: not store.near_cache.active, 5, interval=0.01, what="tracking to drop")  # type: ignore[union-attr]
        with pytest.raises(RedisUnavailableError):
            store.find(SCOPE)
        server = EmbeddedRedis(port=port).start()
        assert store.near_cache.wait_active(10)
        assert store.find(SCOPE) is None
        Redis(port=port).hset(store.keys.token(store.key_for(token("x"))), "token", "junk")
        assert store.find(SCOPE) is None  # a malformed hash is not served from the cache either
    finally:
        store.close()
        server.stop()


def test_tracking_refused_falls_back_to_redis(
    redis_url: str, real_redis: Redis, writer: TokenStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A user without the CLIENT command: find() still works, from Redis, and the log says why."""
    real_redis.acl_setuser(
        "nocache", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"], commands=["+@all", "-client"]
    )
    try:
        url = redis_url.replace("redis://", "redis://nocache:pw@")
        with caplog.at_level(logging.WARNING, logger="tokencache.app.nearcache"):
            store = TokenStore.from_url(url, namespace=NS, near_cache=True)
            try:
                assert store.near_cache is not None and not store.near_cache.wait_active(0.5)
                writer.store(token("plain"))
                assert store.find(SCOPE) == token("plain")
                writer.store(token("plain2"))
                assert store.find(SCOPE) == token("plain2")
            finally:
                store.close()
        assert any(
            "refused CLIENT TRACKING" in r.getMessage() and "no permissions" in r.getMessage()
            for r in caplog.records
        )
    finally:
        real_redis.acl_deluser("nocache")


def test_forked_child_tracks_on_its_own(near: TokenStore, writer: TokenStore) -> None:
    writer.store(token("p"))
    assert near.find(SCOPE) == token("p")
    to_parent, from_child = os.pipe()
    go_child, from_parent = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its cache starts empty and inactive, then tracks by itself
        code = 1
        try:
            cache = near.near_cache
            assert cache is not None and not cache.active, "active right after fork"
            assert near.find(SCOPE) == token("p"), "not read from Redis"
            assert cache.wait_active(5), "tracking not on within 5 s"
            os.write(from_child, b"ready\n")
            assert os.read(go_child, 3) == b"go\n"
            wait_for(lambda: near.find(SCOPE) == token("q"), 5, interval=0.001, what="the parent's write")
            os.write(from_child, b"ok\n")
            code = 0
        except BaseException as e:
            os.write(from_child, f"child: {e!r}\n".encode())
        finally:
            os._exit(code)
    try:
        with os.fdopen(to_parent, "rb", closefd=False) as child_says:
            first = child_says.readline()
            assert first == b"ready\n", first
            writer.store(token("q"))
            os.write(from_parent, b"go\n")
            second = child_says.readline()
            assert second == b"ok\n", second
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        for fd in (to_parent, from_child, go_child, from_parent):
            os.close(fd)


def test_bad_near_cache_argument(real_redis: Redis) -> None:
    with pytest.raises(TypeError, match="near_cache"):
        TokenStore(real_redis, near_cache="yes")  # type: ignore[arg-type]


def test_asyncio_store_has_the_same_near_cache(redis_url: str, writer: TokenStore, real_redis: Redis) -> None:
    from tokencache import aio

    async def scenario() -> None:
        store = aio.TokenStore.from_url(redis_url, namespace=NS, near_cache=True)
        try:
            assert store.near_cache is not None
            assert await asyncio.to_thread(store.near_cache.wait_active, 5)
            await asyncio.to_thread(store_and_settle, writer, store, token("a1"))
            assert await store.find(SCOPE) == token("a1")
            before = hgetall_calls(real_redis)
            for _ in range(50):
                assert await store.for_scope(SCOPE) == token("a1")
            assert hgetall_calls(real_redis) == before
            writer.store(token("a2"))
            started = time.perf_counter()
            while await store.find(SCOPE) != token("a2"):
                assert time.perf_counter() - started < 5
            assert time.perf_counter() - started < SEEN_WITHIN
            await store.delete(SCOPE)
            assert await store.find(SCOPE) is None
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_refresh_by_a_worker_is_seen_within_50ms(store: TokenStore, workers: Workers, redis_url: str) -> None:
    """The refresh job's write (another process) reaches the near cache as fast as its wake-up message."""
    near = TokenStore.from_url(redis_url, namespace=store.keys.namespace, near_cache=True)
    try:
        assert near.near_cache is not None and near.near_cache.wait_active(5)
        workers.start(1)
        old = Token(token="ya29.near-original", scope=SCOPE, expires=int(time.time()) + 12)
        store_and_settle(store, near, old)  # due in 2 s (refresh_before 10)
        assert near.find(SCOPE) == old
        with store.redis.pubsub(ignore_subscribe_messages=True) as sub:  # type: ignore[no-untyped-call]
            sub.subscribe(store.keys.channel(store.key_for(old)))
            message = None
            deadline = time.monotonic() + 15
            while message is None and time.monotonic() < deadline:
                message = sub.get_message(timeout=1.0)
            assert message is not None, "no refresh within 15 s"
            published = time.perf_counter()
            lag = wait_seen(lambda: getattr(near.find(SCOPE), "token", old.token) != old.token, True)
        assert time.perf_counter() - published < SEEN_WITHIN, lag
        assert near.find(SCOPE).expires > old.expires  # type: ignore[union-attr]
    finally:
        near.close()


def test_default_store_from_the_environment(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokencache import ConfigurationError
    from tokencache.app.defaults import default_store, reset_default_store

    monkeypatch.setenv("TOKENCACHE_REDIS_URL", redis_url)
    monkeypatch.setenv("TOKENCACHE_NEAR_CACHE", "1")
    reset_default_store()
    try:
        assert default_store().near_cache is not None
        monkeypatch.setenv("TOKENCACHE_NEAR_CACHE", "0")
        reset_default_store()
        assert default_store().near_cache is None
        monkeypatch.setenv("TOKENCACHE_NEAR_CACHE", "maybe")
        reset_default_store()
        with pytest.raises(ConfigurationError, match="TOKENCACHE_NEAR_CACHE='maybe'"):
            default_store()
    finally:
        reset_default_store()


def test_asyncio_store_on_a_plain_asyncio_client(redis_url: str, writer: TokenStore) -> None:
    """redis.asyncio.Redis(...) carries an asyncio Retry in its pool; the tracking connection is sync."""
    import redis.asyncio

    from tokencache import aio

    async def scenario() -> None:
        store = aio.TokenStore(redis.asyncio.Redis.from_url(redis_url), namespace=NS, near_cache=True)
        try:
            assert store.near_cache is not None
            assert await asyncio.to_thread(store.near_cache.wait_active, 5)
            await asyncio.to_thread(store_and_settle, writer, store, token("plain-async"))
            assert await store.find(SCOPE) == token("plain-async")
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_a_key_that_is_not_utf8_does_not_stop_tracking(
    near: TokenStore, writer: TokenStore, real_redis: Redis
) -> None:
    store_and_settle(writer, near, token("u1"))
    assert near.find(SCOPE) == token("u1")
    real_redis.set(near.keys.token_prefix.encode() + b"\xff\xfe", b"junk")
    writer.store(token("u2"))
    assert wait_seen(lambda: near.find(SCOPE), token("u2")) < SEEN_WITHIN
    assert near.near_cache is not None and near.near_cache.active


def test_an_unexpected_error_in_the_reader_starts_it_over(
    near: TokenStore, writer: TokenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = near.near_cache
    assert cache is not None
    store_and_settle(writer, near, token("e1"))
    assert near.find(SCOPE) == token("e1")
    original = type(cache).invalidate
    failed = []

    def fail_once(self: object, keys: object) -> None:
        if not failed:
            failed.append(keys)
            raise RuntimeError("a bug")
        original(self, keys)  # type: ignore[arg-type]

    monkeypatch.setattr(type(cache), "invalidate", fail_once)
    writer.store(token("e2"))  # its push hits the bug: tracking drops, the cache empties
    assert wait_seen(lambda: near.find(SCOPE), token("e2")) < 5
    assert failed and cache.wait_active(5)
    store_and_settle(writer, near, token("e3"))
    assert near.find(SCOPE) == token("e3")


def test_a_store_dropped_without_close_stops_its_reader(redis_url: str) -> None:
    import gc
    import threading

    def readers() -> int:
        return sum(
            1 for t in threading.enumerate() if t.name.startswith("tokencache-near-cache-") and t.is_alive()
        )

    before = readers()
    store = TokenStore.from_url(redis_url, namespace=NS, near_cache=True)
    assert store.near_cache is not None and store.near_cache.wait_active(5)
    assert readers() == before + 1
    del store
    gc.collect()
    wait_for(lambda: readers() == before, 5, interval=0.02, what="the reader to stop")


def test_a_paused_process_serves_nothing_until_its_reader_catches_up(
    near: TokenStore, writer: TokenStore
) -> None:
    from tokencache.app import nearcache

    cache = near.near_cache
    assert cache is not None
    store_and_settle(writer, near, token("l1"))
    assert near.find(SCOPE) == token("l1")
    cache._heard -= nearcache.LEASE + 1  # as if the process had been stopped for a while
    assert cache.get(near.keys.token(near.key_for(token("l1"))), time.time()) is None
    assert near.find(SCOPE) == token("l1")  # from Redis meanwhile
    key = near.keys.token(near.key_for(token("l1")))
    wait_for(lambda: cache.get(key, time.time()) == token("l1"), 5, interval=0.05, what="the lease renewed")
