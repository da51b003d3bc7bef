"""``invalidate()``: compare-and-evict of a token an API rejected, sync x asyncio x real Redis x fakeredis.

What it promises (docs/design.md#invalidate): the stored token, reported, is evicted (no reader is
handed it, near caches drop it) and its refresh job is put on the queue now, once for the fleet;
any other token is left alone; a key evicts at most once per ``INVALIDATE_EVERY`` seconds; and the
token's hash, index entry and job stay, so repair still sees it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis import Redis
from rq.job import Job
from rq.registry import ScheduledJobRegistry

import tokencache
from tokencache import Token, TokenStore, aio
from tokencache.constants import INVALIDATE_EVERY, WANT_TTL
from tokencache.outcomes import Verdict
from tokencache.worker.repair import repair

from .conftest import sync_or_async_store

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
NEAR_WITHIN = 0.050
"""The near cache's promised bound (docs/near-cache.md): a write by another process is seen within 50 ms."""


def token(tag: str = "a", expires_in: int = 3600) -> Token:
    return Token(token=f"ya29.rejected-{tag}-value", scope=SCOPE, expires=int(time.time()) + expires_in)


@pytest.fixture(params=["sync", "async"])
def ts(request: pytest.FixtureRequest, any_redis: Redis) -> Iterator[TokenStore]:
    """The sync store, or the asyncio one driven through a facade: one suite for both APIs."""
    yield from sync_or_async_store(request, any_redis, "inval")


def queued(ts: TokenStore) -> list[str]:
    """The job ids waiting on the refresh queue (not in the schedule): what the workers run next."""
    return [m.decode() for m in ts.redis.lrange(ts.refresh_queue.queue.key, 0, -1)]


def scheduled(ts: TokenStore) -> list[str]:
    registry = ScheduledJobRegistry(queue=ts.refresh_queue.queue)
    return [m.decode() for m in ts.redis.zrange(registry.key, 0, -1)]


def test_the_stored_token_is_evicted_and_its_refresh_queued_now(ts: TokenStore) -> None:
    t = token()
    ts.store(t)
    key = ts.key_for(t)
    job_id = ts.keys.job_id(key)
    assert scheduled(ts) == [job_id] and queued(ts) == []
    before = time.time()
    assert ts.invalidate(SCOPE, t) is True
    assert ts.find(SCOPE) is None and list(ts.tokens()) == []  # nobody is handed it any more
    assert queued(ts) == [job_id] and scheduled(ts) == []  # its own job, on the queue now: one refetch
    assert Job.fetch(job_id, ts.redis, serializer=ts.refresh_queue.queue.serializer).args == [10]
    assert 0 < ts.redis.pttl(ts.keys.want(key)) <= WANT_TTL * 1000  # for_scope misses wait, not re-ask
    # Nothing is lost: the hash (with its expiry), the index entry and the job stay for repair.
    found = ts.record(key)
    assert found is not None and found.token == t and found.bookkeeping.rejected_at is not None
    assert before - 1 <= found.bookkeeping.rejected_at == found.bookkeeping.refresh_at <= time.time()
    assert ts.indexed(key) and ts.redis.ttl(ts.keys.token(key)) > 3500
    assert ts.redis.zscore(ts.keys.index, ts.keys.token(key)) == found.bookkeeping.rejected_at  # due now


def test_a_token_string_works_as_well_as_a_token(ts: TokenStore) -> None:
    t = token()
    ts.store(t, ("robot@example.com", "b a"), "user@example.com")
    assert ts.invalidate(("robot@example.com", "a,b"), t.token, "user@example.com") is True
    assert ts.find(("robot@example.com", "a b"), "user@example.com") is None


def test_another_token_is_left_alone(ts: TokenStore) -> None:
    """A report of an old token (already replaced) or of a stranger changes nothing."""
    old, current = token("old"), token("current")
    ts.store(current)
    fields = ts.redis.hgetall(ts.keys.token(ts.key_for(current)))
    assert ts.invalidate(SCOPE, old) is False
    assert ts.invalidate(SCOPE, "ya29.never-stored") is False
    assert ts.invalidate("https://www.googleapis.com/auth/other", current) is False  # another key
    assert ts.find(SCOPE) == current
    assert ts.redis.hgetall(ts.keys.token(ts.key_for(current))) == fields
    assert queued(ts) == [] and len(scheduled(ts)) == 1
    assert not ts.redis.exists(ts.keys.invalidated(ts.key_for(current)))  # no rate-limit window used up


def test_nothing_cached_means_nothing_to_evict(ts: TokenStore) -> None:
    assert ts.invalidate(SCOPE, token()) is False
    assert ts.redis.zcard(ts.keys.index) == 0 and queued(ts) == []


def test_many_reports_of_one_token_evict_it_once(ts: TokenStore) -> None:
    t = token()
    ts.store(t)
    assert [ts.invalidate(SCOPE, t) for _ in range(5)] == [True, False, False, False, False]
    assert len(queued(ts)) == 1


def test_a_key_evicts_once_per_window(ts: TokenStore) -> None:
    """The refetched token, rejected too within the window, stays: an API that rejects every token
    cannot make the fleet fetch more than once per INVALIDATE_EVERY seconds."""
    first, second, third = token("1"), token("2"), token("3")
    ts.store(first)
    key = ts.key_for(first)
    assert ts.invalidate(SCOPE, first) is True
    ts.store(second)  # the refetch (which also answers the request to the workers)
    window = ts.redis.pttl(ts.keys.invalidated(key))
    assert INVALIDATE_EVERY * 1000 - 5000 < window <= INVALIDATE_EVERY * 1000
    assert ts.invalidate(SCOPE, second) is False
    assert ts.find(SCOPE) == second and not ts.redis.exists(ts.keys.want(key))  # nobody asked for more
    ts.redis.delete(ts.keys.invalidated(key))  # the window ends
    assert ts.invalidate(SCOPE, second) is True
    assert ts.find(SCOPE) is None and ts.redis.exists(ts.keys.want(key))
    ts.store(third)
    assert ts.find(SCOPE) == third  # a write replaces the evicted token (and its mark)


def test_arguments_are_checked(ts: TokenStore) -> None:
    stored = token()  # once: token() reads the clock, and two calls can fall in two seconds
    ts.store(stored)
    with pytest.raises(TypeError, match="token"):
        ts.invalidate(SCOPE, 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token"):
        ts.invalidate(SCOPE, " ")
    with pytest.raises(TypeError, match="info"):
        ts.invalidate(42, stored)
    with pytest.raises(ValueError, match="sub"):
        ts.invalidate(SCOPE, stored, "")
    assert ts.find(SCOPE) == stored


def test_a_for_scope_miss_waits_for_the_refetch_instead_of_asking_again(ts: TokenStore) -> None:
    t = token()
    ts.store(t)
    ts.invalidate(SCOPE, t)
    ts.redis.delete(ts.refresh_queue.queue.key)  # so that any new request to the workers would show
    with pytest.raises(tokencache.FetchTimeoutError):
        ts.for_scope(SCOPE, timeout=0.3)
    assert queued(ts) == []


def test_repair_still_sees_an_evicted_token_whose_refetch_was_lost(store: TokenStore) -> None:
    """The app died between the eviction and the enqueue, or the job was lost: repair re-enqueues it."""
    t = token()
    store.store(t)
    key = store.key_for(t)
    assert store.invalidate(SCOPE, t)
    store.refresh_queue.cancel(store.redis, key)  # the job is gone altogether
    later = TokenStore(store.redis, namespace="tc-test", refresh_before=10, queue="tc-test")
    assert repair(later)[Verdict.ENQUEUE] == 1
    assert queued(later) == [store.keys.job_id(key)]


def test_module_level_invalidate(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    monkeypatch.setenv("TOKENCACHE_REDIS_URL", redis_url)
    monkeypatch.setenv("TOKENCACHE_NAMESPACE", "inval-defaults")
    tokencache.reset_default_store()
    try:
        other = "https://www.googleapis.com/auth/other"  # the first key is inside its window now
        t, u = token("sync"), Token(token="ya29.rejected-async", scope=other, expires=int(time.time()) + 600)
        tokencache.store(t)
        assert tokencache.invalidate(SCOPE, t) is True and tokencache.find(SCOPE) is None

        async def scenario() -> None:
            try:
                await aio.store(u)
                assert await aio.invalidate(other, u.token) is True
                assert await aio.find(other) is None
            finally:
                await aio.aclose_default()

        asyncio.run(scenario())
    finally:
        tokencache.reset_default_store()


_REPORTER = textwrap.dedent(
    """
    import json, sys, time
    from tokencache import TokenStore
    url, ns, scope = sys.argv[1:4]
    store = TokenStore.from_url(url, namespace=ns)
    for line in sys.stdin:
        evicted = store.invalidate(scope, line.strip())
        print(json.dumps({"done": time.time(), "evicted": evicted}), flush=True)
    """
)


def test_a_near_cache_drops_a_token_another_process_evicts(redis_url: str, real_redis: Redis) -> None:
    """Bound: within NEAR_WITHIN (50 ms) of the reporting process's return, as for any write."""
    writer = TokenStore(real_redis, namespace="inval-near")
    near = TokenStore.from_url(redis_url, namespace="inval-near", near_cache=True)
    lags = []
    try:
        assert near.near_cache is not None and near.near_cache.wait_active(5)
        with subprocess.Popen(
            [sys.executable, "-c", _REPORTER, redis_url, "inval-near", SCOPE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as child:
            assert child.stdin is not None and child.stdout is not None
            for i in range(5):
                t = token(f"near{i}")
                writer.store(t)
                real_redis.delete(writer.keys.invalidated(writer.key_for(t)))  # the window ended
                wait_until(lambda t=t: near.find(SCOPE) == t)  # type: ignore[misc]
                assert near.find(SCOPE) == t and near.near_cache.get(writer.keys.token(writer.key_for(t)), 0)
                child.stdin.write(t.token + "\n")
                child.stdin.flush()
                reply = json.loads(child.stdout.readline())
                assert reply["evicted"] is True
                wait_until(lambda: near.find(SCOPE) is None)
                lags.append(time.time() - reply["done"])
            child.stdin.close()
    finally:
        near.close()
    print(f"near cache dropped the evicted token after {[round(lag * 1000, 1) for lag in sorted(lags)]} ms")
    assert max(lags) < NEAR_WITHIN, sorted(lags)


def wait_until(condition: Any, timeout: float = 5.0) -> None:
    """Spin on ``condition()`` (a near-cache read costs no round trip); fail after ``timeout`` seconds."""
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > timeout:
            raise AssertionError(f"not seen within {timeout}s")
