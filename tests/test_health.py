"""``tokencache status`` counts what needs attention, whatever the format of the jobs in RQ's registries."""

from __future__ import annotations

import datetime
import time

from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.scheduler import RQScheduler
from rq.utils import utcformat

from tokencache import Token, TokenStore
from tokencache.cli.health import check
from tokencache.constants import SCHEDULER_TTL

from .conftest import SCOPE


def test_failed_refreshes_count_only_for_tokens_still_cached_in_this_namespace(store: TokenStore) -> None:
    def token(scope: str) -> Token:
        return Token(token="ya29.health-test", scope=scope, expires=int(time.time()) + 600)

    cached, old_format, gone = token(SCOPE), token("cached-with-an-old-job"), token("not-cached")
    for t in (cached, old_format):
        store.store(t)
    queue = store.refresh_queue.queue
    other = TokenStore(store.redis, namespace="elsewhere", refresh_before=10, queue=queue.name)
    legacy_key = store.key_for(old_format)
    legacy = queue.create_job(
        "tokencache.refresh.refresh",
        kwargs=dict(
            namespace=store.keys.namespace,
            account=legacy_key.account,
            scope=legacy_key.scope,
            sub=None,
            refresh_before=10,
        ),
        job_id="tc-635e7ebecb609f85e7e9b573",
    )
    legacy.save()
    stranger = queue.create_job("os.getcwd", job_id="not-ours")
    stranger.save()
    failed = [
        store.keys.job_id(store.key_for(cached)),  # counts
        legacy.id,  # counts: an old-format job of a cached token
        store.keys.job_id(store.key_for(gone)),  # its token is gone
        other.keys.job_id(store.key_for(cached)),  # the same token of another namespace on this queue
        stranger.id,
    ]
    store.redis.zadd(FailedJobRegistry(queue=queue).key, dict.fromkeys(failed, time.time() + 3600))
    assert check(store, "redis://test").failed == 2


def test_the_scheduler_runs_only_while_its_lock_holder_beats(store: TokenStore) -> None:
    """RQ's lock outlives a dead scheduler by up to 61 s; its own last_heartbeat stops at once."""
    assert not check(store, "redis://test").scheduler  # nobody holds the lock
    scheduler = RQScheduler([store.refresh_queue.name], connection=store.redis)
    assert scheduler.acquire_locks() == {store.refresh_queue.name}
    assert not check(store, "redis://test").scheduler  # a lock and no scheduler hash: as before
    scheduler.register_birth()  # what RQ's scheduler process writes first, then once a second
    assert check(store, "redis://test").scheduler
    silent = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=SCHEDULER_TTL + 0.5)
    store.redis.hset(scheduler.key, "last_heartbeat", utcformat(silent))
    assert not check(store, "redis://test").scheduler  # the lock is still held: RQ would say running
    store.redis.hset(scheduler.key, "last_heartbeat", "not a time")
    assert check(store, "redis://test").scheduler  # a beat we cannot read: the lock decides
    store.redis.hdel(scheduler.key, "last_heartbeat")
    assert check(store, "redis://test").scheduler  # an RQ that writes no beats: the lock decides
    scheduler.release_locks()


def test_bad_keys_are_listed_not_fatal(store: TokenStore) -> None:
    """Bound: a token key overwritten by a string, a failed job whose key is a string and an unreadable
    pool heartbeat do not stop the report: each is listed as skipped, with a problem naming them."""
    good = Token(token="ya29.health-good", scope=SCOPE, expires=int(time.time()) + 600)
    store.store(good)
    over = Token(token="ya29.health-over", scope="overwritten", expires=int(time.time()) + 5)
    store.store(over)
    overwritten = store.keys.token(store.key_for(over))
    store.redis.set(overwritten, "someone else's string")
    failed_job = Job.key_for(store.keys.job_id(store.key_for(good)))
    store.redis.set(failed_job, "not a job")
    failed_registry = FailedJobRegistry(queue=store.refresh_queue.queue)
    store.redis.zadd(failed_registry.key, {store.keys.job_id(store.key_for(good)): time.time() + 3600})
    store.redis.hset(store.keys.pools, "garbled-pool", "{not json")

    health = check(store, "redis://test")

    pool_entry = f"{store.keys.pools} {b'garbled-pool'!r}"
    assert set(health.skipped) == {overwritten, failed_job, pool_entry}
    assert health.failed == 0 and health.tokens == 2 and health.pools == 0
    assert any(all(name in problem for name in health.skipped) for problem in health.problems)
