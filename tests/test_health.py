"""``tokencache status`` reports the fleet as it is now, whatever old records RQ's registries keep."""

from __future__ import annotations

import datetime
import json
import time

from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.scheduler import RQScheduler
from rq.utils import utcformat

from tokencache import Token, TokenStore
from tokencache.cli.health import check
from tokencache.constants import SCHEDULER_TTL

from .conftest import SCOPE


def token(scope: str, expires_in: int = 600) -> Token:
    return Token(token="ya29.health-test", scope=scope, expires=int(time.time()) + expires_in)


def failed(store: TokenStore, job_id: str, reason: str | None = None) -> None:
    """The job's last run failed (gave up with ``reason``, or crashed), and RQ's registry says so."""
    queue = store.refresh_queue.queue
    if not store.redis.exists(f"rq:job:{job_id}"):
        queue.create_job("tokencache.refresh.refresh", args=[10], job_id=job_id).save()
    fields = {"status": "failed", **({"meta": json.dumps({"gave_up": reason})} if reason else {})}
    store.redis.hset(f"rq:job:{job_id}", mapping=fields)
    store.redis.zadd(FailedJobRegistry(queue=queue).key, {job_id: time.time() + 3600})


def test_a_give_up_counts_while_it_is_the_last_word_about_a_token_still_cached(store: TokenStore) -> None:
    stale, expired, replaced, rearmed, crashed, gone = (
        token("stale", 5), token("expired", -30), token("replaced"), token("rearmed"), token("crashed", 5),
        token("not-cached"),
    )  # fmt: skip
    for t in (stale, expired, replaced, rearmed, crashed):
        store.store(t)
    store.redis.hset(store.keys.token(store.key_for(stale)), "gave_up_at", "1")
    queue = store.refresh_queue.queue
    other = TokenStore(store.redis, namespace="elsewhere", refresh_before=10, queue=queue.name)
    store.redis.zadd(store.keys.index, {store.keys.token(store.key_for(expired)): expired.expires})
    job = store.keys.job_id
    failed(store, job(store.key_for(stale)), "invalid_grant: Invalid JWT Signature")  # counts
    failed(store, job(store.key_for(expired)), "unknown account")  # counts: the hash expired since
    failed(store, job(store.key_for(replaced)), "invalid_grant")  # a new token was stored since
    registry = FailedJobRegistry(queue=queue)
    store.redis.zadd(registry.key, {job(store.key_for(rearmed)): time.time() + 3600})  # its job ran since
    failed(store, job(store.key_for(crashed)))  # crashed: repair's to retry, not a give-up
    failed(store, job(store.key_for(gone)), "typo")  # its token is neither cached nor wanted
    failed(store, other.keys.job_id(store.key_for(stale)), "another namespace's")
    health = check(store, "redis://test")
    assert health.failed == 2
    assert sorted(health.gave_up) == sorted(
        [f"{store.key_for(expired).encode()}: unknown account",
         f"{store.key_for(stale).encode()}: invalid_grant: Invalid JWT Signature"]
    )  # fmt: skip
    assert any("invalid_grant" in problem for problem in health.problems)


def test_an_old_format_job_that_gave_up_counts_by_its_tokens_hash(store: TokenStore) -> None:
    """A job written before ids named their token (and before the meta said why it gave up)."""
    cached = token("cached-with-an-old-job", 5)
    store.store(cached)
    key = store.key_for(cached)
    store.redis.hset(store.keys.token(key), mapping={"gave_up_at": "1", "last_error": "invalid_grant"})
    legacy = store.refresh_queue.queue.create_job(
        "tokencache.refresh.refresh",
        kwargs=dict(namespace=store.keys.namespace, account=key.account, scope=key.scope, sub=None,
                    refresh_before=10),
        job_id="tc-635e7ebecb609f85e7e9b573",
    )  # fmt: skip
    legacy.save()
    stranger = store.refresh_queue.queue.create_job("os.getcwd", job_id="not-ours")
    stranger.save()
    for job_id in (legacy.id, stranger.id):
        failed(store, job_id)
    assert check(store, "redis://test").gave_up == [f"{key.encode()}: invalid_grant"]


def test_a_cached_token_expired_without_a_replacement_is_reported(store: TokenStore) -> None:
    lost, fresh = token("lost", -30), token("fresh")
    store.store(fresh)
    placeholder = store.keys.token(store.key_for_info("asked-for"))  # an app's request: not a lost token
    store.redis.zadd(store.keys.index, {store.keys.token(store.key_for(lost)): lost.expires, placeholder: 0})
    health = check(store, "redis://test")
    assert health.expired == [store.key_for(lost).encode()]
    assert any("expired without a replacement" in problem for problem in health.problems)


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


def test_only_a_token_whose_hash_expired_counts_as_expired(store: TokenStore) -> None:
    """An evicted token (its index score is when it was evicted, its hash still there), a key of another
    type and a junk index member are not "expired without a replacement"; a token whose hash is gone is."""
    now = time.time()
    evicted = Token(token="ya29.evicted", scope="evicted", expires=int(now) + 3000)
    store.store(evicted)
    assert store.invalidate("evicted", evicted)
    store.redis.zadd(store.keys.index, {store.keys.token(store.key_for(evicted)): now - 30})  # pending 30 s
    over = Token(token="ya29.over", scope="over", expires=int(now) + 3000)
    store.store(over)
    store.redis.set(store.keys.token(store.key_for(over)), "someone else's string")
    store.redis.zadd(
        store.keys.index, {store.keys.token(store.key_for(over)): now - 30, "junk-member": now - 30}
    )
    lost = Token(token="ya29.lost", scope="lost", expires=int(now) + 3000)
    store.store(lost)
    store.redis.delete(store.keys.token(store.key_for(lost)))
    store.redis.zadd(store.keys.index, {store.keys.token(store.key_for(lost)): now - 30})

    assert check(store, "redis://test").expired == [store.key_for(lost).encode()]
