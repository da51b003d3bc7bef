"""Repair finds overdue refreshes (lost jobs, a dead scheduler, a killed worker) and re-enqueues them."""

from __future__ import annotations

import json
import logging
import time

import pytest
import requests
from prometheus_client import REGISTRY
from rq.job import Job, JobStatus

from tokencache import Token, TokenStore
from tokencache.constants import LOCK_TTL
from tokencache.core.locks import Lock
from tokencache.keys import parse_job_id
from tokencache.testing.emulator import Emulator
from tokencache.testing.redisserver import free_port
from tokencache.worker.repair import repair, repair_if_leader

from .conftest import SCOPE, Workers, token_text, wait_for


def stored(store: TokenStore, expires_in: int = 100) -> tuple[Token, str]:
    token = Token(token="ya29.repair-test-token", scope=SCOPE, expires=int(time.time()) + expires_in)
    job = store.store(token)
    assert job is not None
    return token, job.id


def later(store: TokenStore, seconds: float) -> TokenStore:
    return TokenStore(
        store.redis,
        namespace=store.keys.namespace,
        refresh_before=store.refresh_before,
        queue=store.refresh_queue.name,
        clock=lambda: time.time() + seconds,
    )


def status(store: TokenStore, job_id: str) -> JobStatus | None:
    job = Job.fetch_many([job_id], store.redis)[0]
    return job.get_status(refresh=False) if job else None


def queued(store: TokenStore) -> list[str]:
    return store.refresh_queue.queue.get_job_ids()


def test_nothing_to_do_when_on_time(store: TokenStore) -> None:
    _, job_id = stored(store)
    assert repair(store)["enqueue"] == 0
    assert repair(later(store, 89))["enqueue"] == 0  # due at +90: not overdue yet
    assert status(store, job_id) == JobStatus.SCHEDULED and queued(store) == []


def test_scheduler_dead_enqueues_the_overdue_job(store: TokenStore) -> None:
    _, job_id = stored(store)
    assert repair(later(store, 95))["enqueue"] == 1
    assert queued(store) == [job_id]
    assert store.redis.zcard(store.refresh_queue.scheduled.key) == 0


def test_lost_job_is_recreated(store: TokenStore) -> None:
    token, job_id = stored(store)
    store.redis.delete(Job.key_for(job_id))
    store.redis.zrem(store.refresh_queue.scheduled.key, job_id)
    assert repair(later(store, 95))["enqueue"] == 1
    assert queued(store) == [job_id]
    job = Job.fetch(job_id, store.redis, serializer=store.refresh_queue.queue.serializer)
    assert parse_job_id(job.id) == (store.keys.namespace, store.key_for(token))
    assert job.func_name == "tokencache.refresh.refresh" and job.args == [store.refresh_before]


def test_a_job_is_re_enqueued_with_the_refresh_before_it_was_written_with(store: TokenStore) -> None:
    name, queue = store.keys.namespace, store.refresh_queue.name
    writer = TokenStore(store.redis, namespace=name, refresh_before=20, queue=queue)
    _, job_id = stored(writer)
    store.redis.hset(Job.key_for(job_id), "status", "failed")  # e.g. a work-horse killed alone
    assert repair(later(store, 95))["enqueue"] == 1
    job = Job.fetch(job_id, store.redis, serializer=store.refresh_queue.queue.serializer)
    assert job.args == [20] and job.get_status() == JobStatus.QUEUED


def test_started_job_of_a_dead_worker_is_enqueued_once_its_lock_is_gone(store: TokenStore) -> None:
    token, job_id = stored(store)
    key = store.key_for(token)
    store.redis.hset(
        Job.key_for(job_id), mapping={"status": "started", "started_at": "2020-01-01T00:00:00.000000Z"}
    )
    lock = Lock(store.redis, store.keys.lock(key), LOCK_TTL)
    assert lock.acquire()
    assert repair(later(store, 95))["enqueue"] == 0  # the lock says someone is still working on it
    lock.release()
    assert repair(later(store, 95))["enqueue"] == 1
    assert queued(store) == [job_id]


def test_crashed_refresh_is_retried_but_a_deliberate_give_up_is_not(store: TokenStore) -> None:
    token, job_id = stored(store)
    store.redis.hset(Job.key_for(job_id), "status", "failed")  # e.g. a work-horse killed alone
    assert repair(later(store, 95))["enqueue"] == 1
    store.redis.hset(Job.key_for(job_id), "status", "failed")
    store.redis.hset(store.keys.token(store.key_for(token)), "gave_up_at", "1")
    assert repair(later(store, 95)) == {"ok": 1}


def test_a_schedule_later_than_the_tokens_refresh_time_is_corrected(store: TokenStore) -> None:
    token, job_id = stored(store)
    store.redis.zadd(store.refresh_queue.scheduled.key, {job_id: token.expires + 3000})  # a lost race
    assert repair(later(store, 89))["enqueue"] == 0
    assert repair(later(store, 95))["enqueue"] == 1
    assert queued(store) == [job_id]


def test_junk_in_the_index_and_partial_job_hashes_do_not_stop_repair(store: TokenStore) -> None:
    _, job_id = stored(store)
    store.redis.zadd(store.keys.index, {"not-a-token-key": 1})
    store.redis.delete(Job.key_for(job_id))
    store.redis.hset(Job.key_for(job_id), "last_heartbeat", "2020-01-01T00:00:00.000000Z")  # no data field
    assert repair(later(store, 95))["enqueue"] == 1
    assert store.redis.zscore(store.keys.index, "not-a-token-key") is None


def test_an_expired_token_stays_cached_and_its_refresh_alive_until_it_gives_up_on_purpose(
    store: TokenStore,
) -> None:
    """An outage outlasting a token: its hash expires but its index entry keeps it cached, so a crashed
    or lost job is re-enqueued (the old repair dropped the entry); a deliberate give-up stays failed."""
    token, job_id = stored(store, expires_in=-5)
    assert not store.redis.exists(store.keys.token(store.key_for(token)))  # EXPIREAT in the past
    store.redis.hset(Job.key_for(job_id), "status", "failed")  # a killed work-horse
    assert repair(store)["enqueue"] == 1
    store.redis.delete(Job.key_for(job_id))  # lost in a failover
    store.redis.lrem(store.refresh_queue.queue.key, 0, job_id)
    assert repair(store)["enqueue"] == 1
    meta = json.dumps({"gave_up": "invalid_grant: Invalid JWT Signature"})
    store.redis.hset(Job.key_for(job_id), mapping={"status": "failed", "meta": meta})
    assert repair(store) == {"ok": 1}
    assert store.redis.zcard(store.keys.index) == 1


def test_a_refresh_that_backs_off_is_not_moved_forward(store: TokenStore) -> None:
    """A failing refresh is scheduled after the token's refresh time on purpose: repair must not
    re-enqueue it every second (which also reset its failure count: no backoff at all)."""
    token, job_id = stored(store)
    key = store.key_for(token)
    store.redis.zadd(store.refresh_queue.scheduled.key, {job_id: token.expires + 30})
    store.redis.hset(store.keys.token(key), "failures", "3")
    assert repair(later(store, 95)) == {"ok": 1}
    store.redis.hdel(store.keys.token(key), "failures")
    store.redis.set(store.keys.backoff(key.account), "rate limited", px=10_000)  # the account on hold
    assert repair(later(store, 95)) == {"ok": 1}
    store.redis.delete(store.keys.backoff(key.account))
    assert repair(later(store, 95))["enqueue"] == 1  # nothing explains the late schedule: a lost race


def test_one_repair_per_interval_across_the_fleet(store: TokenStore) -> None:
    assert repair_if_leader(store, 5.0) is not None
    assert repair_if_leader(store, 5.0) is None


def test_a_placeholder_the_apps_wait_for_is_enqueued_not_dropped(store: TokenStore) -> None:
    key = store.key_for_info(SCOPE)
    store.redis.zadd(store.keys.index, {store.keys.token(key): 0})  # asked for, job lost or crashed
    store.redis.set(store.keys.want(key), "app", px=10_000)
    assert repair(store)["enqueue"] == 1
    job_id = store.keys.job_id(key)
    store.redis.hset(Job.key_for(job_id), "status", "failed")  # its work-horse was killed
    assert repair(store)["enqueue"] == 1
    store.redis.delete(store.keys.want(key))  # nobody waits any more (or the refresh gave up)
    store.redis.hset(Job.key_for(job_id), "status", "failed")
    assert repair(store)["drop"] == 1
    assert store.redis.zcard(store.keys.index) == 0


# -- fault isolation: one bad key never stops a pass ------------------------------------------------


def bad_keys_counted(where: str) -> float:
    return REGISTRY.get_sample_value("tokencache_bad_keys_total", {"where": where}) or 0.0


def with_a_lost_job(store: TokenStore, sub: str, expires_in: int) -> Token:
    """A token whose refresh job was lost (its RQ hash and its schedule entry gone)."""
    token = Token(
        token=f"ya29.lost-{token_text(sub)}",
        scope=SCOPE,
        expires=int(time.time()) + expires_in,
        sub=sub,
    )
    job = store.store(token)
    assert job is not None
    store.redis.delete(job.key)
    store.redis.zrem(store.refresh_queue.scheduled.key, job.id)
    return token


def wrong_type(store: TokenStore, sub: str, expires_in: int) -> str:
    """A token key of the namespace overwritten by ``redis-cli SET`` (still indexed, job still scheduled)."""
    store.store(Token(token="ya29.overwritten", scope=SCOPE, expires=int(time.time()) + expires_in, sub=sub))
    key = store.keys.token(store.key_for_info(SCOPE, sub))
    store.redis.set(key, "someone else's string")
    return key


def test_a_wrong_type_token_key_does_not_stop_repair(
    store: TokenStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Bound: every pass re-enqueues (then keeps) the lost job of the good token beside a token key that
    holds a string; the string is never deleted, is logged once over three passes, and counted each pass."""
    good = with_a_lost_job(store, "good-beside-a-string@example.com", 100)
    bad = wrong_type(store, "overwritten-by-set@example.com", 100)
    counted = bad_keys_counted("repair")
    with caplog.at_level(logging.WARNING, logger="tokencache"):
        passes = [repair(later(store, 95)) for _ in range(3)]
    assert [p["enqueue"] for p in passes] == [1, 0, 0] and [p["ok"] for p in passes] == [0, 1, 1]
    assert queued(store) == [store.keys.job_id(store.key_for(good))]
    assert store.redis.get(bad) == b"someone else's string" and store.redis.zscore(store.keys.index, bad)
    assert sum(bad in message for message in caplog.messages) == 1
    assert bad_keys_counted("repair") == counted + 3


def test_a_job_key_of_another_type_does_not_stop_repair(
    store: TokenStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Bound: a refresh job key that holds a string is skipped (left as it is), the lost job of another
    token is still re-enqueued in the same pass."""
    good = with_a_lost_job(store, "good-beside-a-bad-job@example.com", 100)
    other = with_a_lost_job(store, "its-job-is-a-string@example.com", 100)
    job_key = Job.key_for(store.keys.job_id(store.key_for(other)))
    store.redis.set(job_key, "not a job")
    with caplog.at_level(logging.WARNING, logger="tokencache"):
        assert repair(later(store, 95)) == {"enqueue": 1}
    assert queued(store) == [store.keys.job_id(store.key_for(good))]
    assert store.redis.get(job_key) == b"not a job"
    assert sum(job_key in message for message in caplog.messages) == 1


@pytest.mark.timeout(60)
def test_a_pool_refreshes_a_lost_token_in_time_beside_a_wrong_type_key(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    """Bound: with a token key overwritten by a string in the index, the pool's repair still re-enqueues
    a token whose job was lost, and it is replaced before it expires (due in 4 s, 10 s margin); the
    pool logs the bad key once over three or more repair reads, and its metric counts them."""
    port = free_port()
    pool = workers.start(1, args=("--metrics-port", str(port)))
    bad = wrong_type(store, "overwritten-in-a-pool@example.com", 5)  # due: every pass reads it
    lost = with_a_lost_job(store, "lost-in-a-pool@example.com", store.refresh_before + 4)

    def replaced() -> bool:
        found = store.find(SCOPE, sub=lost.sub)
        return found is not None and found.token != lost.token

    wait_for(replaced, timeout=lost.expires - time.time(), interval=0.1, what="the lost token refreshed")
    assert time.time() < lost.expires
    counted = 'tokencache_bad_keys_total{where="repair"}'
    wait_for(lambda: scrape_value(port, counted) >= 3, 10, interval=0.2, what="three repair reads")
    assert pool.log is not None
    log_text = pool.log.read_text()
    assert log_text.count(f"skipping {bad} (read by repair)") == 1, pool.log_tail()
    assert "repair pass skipped" not in log_text
    # The bad key's own refresh job met it too, and ended (skipped) rather than retrying against it.
    assert f"skipping {bad} (read by record)" in log_text and "crashed" not in log_text
    assert store.redis.get(bad) == b"someone else's string"


def scrape_value(port: int, sample: str) -> float:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample + " ")]
    return values[0] if values else 0.0


def test_a_starting_pool_retries_what_gave_up_while_still_cached(store: TokenStore) -> None:
    """Fixing a rejected key means restarting the workers: that restart re-arms the refreshes."""
    from rq.registry import FailedJobRegistry

    from tokencache.worker.repair import retry_gave_up

    cached, _ = stored(store)
    gone = Token(token="ya29.gone", scope="gone", expires=int(time.time()) + 100)
    crashed = Token(token="ya29.crashed", scope="crashed", expires=int(time.time()) + 100)
    for t in (gone, crashed):
        store.store(t)
    assert store.delete("gone") is True
    registry = FailedJobRegistry(queue=store.refresh_queue.queue)
    for t, meta in ((cached, {"gave_up": "invalid_grant"}), (gone, {"gave_up": "typo"}), (crashed, {})):
        job_id = store.keys.job_id(store.key_for(t))
        if not store.redis.exists(Job.key_for(job_id)):
            store.refresh_queue.queue.create_job(
                "tokencache.refresh.refresh", args=[10], job_id=job_id
            ).save()
        store.redis.hset(Job.key_for(job_id), mapping={"status": "failed", "meta": json.dumps(meta)})
        store.redis.zadd(registry.key, {job_id: time.time() + 3600})
    assert retry_gave_up(store) == [store.key_for(cached)]
    assert queued(store) == [store.keys.job_id(store.key_for(cached))]


def test_a_starting_pool_is_not_stopped_by_an_unreadable_job_that_gave_up(store: TokenStore) -> None:
    """Bound: a failed job whose arguments cannot be read (garbage ``data``) is left alone, and the
    other refreshes that gave up are still re-armed; before, ``tokencache worker`` exited on it."""
    from rq.registry import FailedJobRegistry

    from tokencache.worker.repair import retry_gave_up

    good, _ = stored(store)
    garbled = Token(token="ya29.garbled", scope="garbled", expires=int(time.time()) + 100)
    store.store(garbled)
    registry = FailedJobRegistry(queue=store.refresh_queue.queue)
    for t in (good, garbled):
        job_id = store.keys.job_id(store.key_for(t))
        meta = json.dumps({"gave_up": "invalid_grant"})
        store.redis.hset(Job.key_for(job_id), mapping={"status": "failed", "meta": meta})
        store.redis.zadd(registry.key, {job_id: time.time() + 3600})
    store.redis.hset(Job.key_for(store.keys.job_id(store.key_for(garbled))), "data", b"\x00not json")
    assert retry_gave_up(store) == [store.key_for(good)]


def test_a_job_due_within_the_grace_is_left_to_run_by_itself(store: TokenStore) -> None:
    """A held-back job rescheduled to just after its account's hold (the hold's spread) is not pulled
    forward once the hold key expires; one scheduled far after its token's refresh time still is."""
    now = time.time()
    token = Token(token="ya29.held", scope="held", expires=int(now) + 5)  # its refresh was due 5 s ago
    store.store(token)
    job_id = store.keys.job_id(store.key_for(token))
    store.redis.hset(store.keys.token(store.key_for(token)), "refresh_at", int(now) - 5)
    store.redis.zadd(store.refresh_queue.scheduled.key, {job_id: now + 0.5})
    assert repair(store) == {"ok": 1}
    store.redis.zadd(store.refresh_queue.scheduled.key, {job_id: now + 3600})
    assert repair(store) == {"enqueue": 1}


def test_a_queued_job_no_worker_will_run_is_enqueued_again(store: TokenStore) -> None:
    """RQ's worker pops a job id off the queue while idle; a stop signal landing before the job starts
    (a rolling restart's SIGTERM) ends the worker with the job popped and never run: its status stays
    ``queued`` and nothing holds it. Repair re-enqueues such a job once the queue is empty."""
    _, job_id = stored(store)
    store.redis.zrem(store.refresh_queue.scheduled.key, job_id)
    store.redis.hset(
        Job.key_for(job_id), mapping={"status": "queued", "enqueued_at": "2020-01-01T00:00:00.000000Z"}
    )
    store.redis.rpush(store.refresh_queue.queue.key, job_id)  # still in the queue: a worker will run it
    assert repair(later(store, 95))["enqueue"] == 0
    store.redis.delete(store.refresh_queue.queue.key)  # popped by a worker that then stopped
    assert repair(later(store, 95))["enqueue"] == 1
    assert queued(store) == [job_id] and status(store, job_id) == JobStatus.QUEUED
    assert repair(later(store, 95))["enqueue"] == 0  # in the queue again: left to the workers


def test_a_due_token_whose_job_record_is_gone_gets_it_back_before_it_is_overdue(store: TokenStore) -> None:
    """A failover can lose a job record while the token stays; another token's batch may then keep
    refreshing the token (it moves a member's job only if it is still scheduled), so it never comes
    overdue: repair must rebuild the job as soon as the token is due, not wait for overdue."""
    _, job_id = stored(store, expires_in=store.refresh_before + 1)  # due in 1 s: in repair's horizon
    store.redis.delete(Job.key_for(job_id))
    store.redis.zrem(store.refresh_queue.scheduled.key, job_id)
    assert repair(store) == {"enqueue": 1}
    assert queued(store) == [job_id]
    assert repair(store) == {"ok": 1}  # once rebuilt, left alone
