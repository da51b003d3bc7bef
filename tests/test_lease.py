"""Leases: a kept lock outlives its TTL while its holder lives, and lapses within LOCK_TTL once it dies."""

from __future__ import annotations

import asyncio
import time

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from tokencache.aio.locks import Lock as AsyncLock
from tokencache.constants import LOCK_TTL
from tokencache.core.locks import KEEPER, Lock
from tokencache.testing.redisserver import EmbeddedRedis

from .conftest import wait_for


def test_a_kept_lock_is_renewed_until_released(real_redis: Redis) -> None:
    lock = Lock(real_redis, "tc-lease:kept", LOCK_TTL)
    assert lock.acquire()
    lock.keep()
    deadline = time.monotonic() + 4 * LOCK_TTL
    while time.monotonic() < deadline:  # four lease lifetimes: renewals, not the TTL, keep it
        assert real_redis.get(lock.name) == lock.owner.encode()
        time.sleep(LOCK_TTL / 10)
    assert lock.release() and not real_redis.exists(lock.name)
    assert lock not in KEEPER.held()


def test_a_dead_holders_lease_lapses_within_its_ttl(real_redis: Redis) -> None:
    """What a SIGKILL does to a holder: renewals stop, and the lock is free within LOCK_TTL."""
    lock = Lock(real_redis, "tc-lease:dead", LOCK_TTL)
    assert lock.acquire()
    lock.keep()
    time.sleep(2 * LOCK_TTL)
    KEEPER.drop(lock)  # the holder is gone: nobody renews, nobody releases
    stopped = time.monotonic()
    wait_for(lambda: not real_redis.exists(lock.name), timeout=2 * LOCK_TTL, interval=0.01, what="lapse")
    assert time.monotonic() - stopped <= LOCK_TTL + 0.05


def test_a_lease_taken_over_is_marked_lost_and_never_renewed_over_the_new_holder(real_redis: Redis) -> None:
    lock = Lock(real_redis, "tc-lease:lost", LOCK_TTL)
    assert lock.acquire()
    real_redis.set(lock.name, "someone-else", px=10_000)  # it lapsed and was taken meanwhile
    lock.keep()
    wait_for(lambda: lock.lost, timeout=4 * LOCK_TTL, what="the loss noticed")
    assert real_redis.get(lock.name) == b"someone-else" and lock not in KEEPER.held()


def test_an_asyncio_lease_is_renewed_by_a_task(redis_server: EmbeddedRedis) -> None:
    async def scenario() -> None:
        client = AsyncRedis.from_url(redis_server.url)
        try:
            lock = AsyncLock(client, "tc-lease:aio", LOCK_TTL)
            assert await lock.acquire()
            lock.keep()
            await asyncio.sleep(3 * LOCK_TTL)
            assert await client.get(lock.name) == lock.owner.encode()
            assert await lock.release()
            assert not await client.exists(lock.name)
        finally:
            await client.aclose()

    asyncio.run(scenario())
