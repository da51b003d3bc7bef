"""Refreshes end to end: real `tokencache worker` processes, the emulator, real google-auth."""

from __future__ import annotations

import os
import signal
import time

from rq.registry import ScheduledJobRegistry

from tokencache import Token, TokenStore
from tokencache.testing.emulator import Emulator

from .conftest import SCOPE, Workers, descendants, wait_for


def opaque(expires_in: float, **kw: object) -> Token:
    """A token that did not come from the emulator (so we can tell it from a refreshed one)."""
    return Token(token="ya29.original-token-0000", scope=SCOPE, expires=int(time.time() + expires_in), **kw)  # type: ignore[arg-type]


def replaced(store: TokenStore, old: Token, info: object = SCOPE) -> Token | None:
    found = store.find(info)
    return found if found is not None and found.token != old.token else None


def next_run(store: TokenStore) -> float | None:
    registry = ScheduledJobRegistry(queue=store.refresh_queue.queue)
    scores = store.redis.zrange(registry.key, 0, -1, withscores=True)
    assert len(scores) <= 1, scores
    return scores[0][1] if scores else None


def settled(store: TokenStore) -> bool:
    """No refresh queued or running, and the next one scheduled well ahead."""
    q = store.refresh_queue.queue
    at = next_run(store)
    return q.count == 0 and q.started_job_registry.count == 0 and at is not None and at > time.time() + 60


def test_token_with_12s_of_life_is_replaced_before_it_expires(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    workers.start(1)
    old = opaque(12)
    store.store(old)
    new = wait_for(lambda: replaced(store, old), timeout=old.expires - time.time(), what="refresh")
    assert time.time() < old.expires
    assert new.scope == SCOPE and new.expires > old.expires
    assert emulator.stats()["issued"] == 1
    wait_for(lambda: settled(store), 10, what="next refresh scheduled")
    assert abs(next_run(store) - (new.expires - 10)) <= 2
    # Rescheduled by RQ's repeat, the job sheds the record of its run (tokencache worker's job class).
    job_key = f"rq:job:{store.keys.job_id(store.key_for(old))}"
    left = {f.decode() for f in store.redis.hkeys(job_key)}
    shed = {
        "started_at",
        "ended_at",
        "worker_name",
        "result",
        "meta",
        "enqueued_at",
        "created_at",
        "description",
    }
    assert left.isdisjoint(shed), left
    assert store.redis.hget(job_key, "status") == b"scheduled"
    assert store.redis.object("encoding", job_key) == b"listpack"


def test_thousand_stores_one_job_one_request(store: TokenStore, workers: Workers, emulator: Emulator) -> None:
    workers.start(1)
    for _ in range(1000):
        old = opaque(13)
        store.store(old)
    assert next_run(store) is not None
    wait_for(lambda: replaced(store, old), timeout=15, what="refresh")
    wait_for(lambda: settled(store), 10, what="next refresh scheduled")
    assert emulator.stats()["issued"] == 1


def test_token_stored_expired_is_refreshed_within_3s(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    workers.start(1)
    started = time.monotonic()
    store.store(opaque(-30))
    wait_for(lambda: store.find(SCOPE), timeout=3, what="refreshed token")
    print(f"stored expired -> fresh in {time.monotonic() - started:.2f}s")


def test_two_workers_racing_call_the_endpoint_once(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    emulator.config.latency = 1.0
    workers.start(1)
    workers.start(1)
    old = opaque(9)  # inside the margin: due at once
    job = store.store(old)
    # A duplicate of the same job on the queue: both idle workers pop one at the same moment.
    store.redis.rpush(store.refresh_queue.queue.key, job.id, job.id)
    wait_for(lambda: replaced(store, old), timeout=8, what="refresh")
    wait_for(lambda: settled(store), 10, what="all runs finished")
    assert emulator.stats()["token_requests"] == 1


def test_failures_retry_with_backoff_and_keep_the_old_token(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    emulator.config.fail_next = 2
    workers.start(1)
    old = opaque(14)
    store.store(old)
    key = store.keys.token(store.key_for(old))
    seen_failures: set[int] = set()

    def refreshed() -> Token | None:
        current = store.find(SCOPE)
        assert current is not None, "the old token must stay readable while refreshes fail"
        seen_failures.add(int(store.redis.hget(key, "failures") or 0))
        return current if current.token != old.token else None

    wait_for(
        refreshed, timeout=old.expires - time.time() - 1, interval=0.02, what="refresh after two failures"
    )
    stats = emulator.stats()
    assert stats["failed"] == 2 and stats["issued"] == 1
    assert {1, 2} <= seen_failures, seen_failures
    assert store.redis.hmget(key, "failures", "last_error") == [None, None]  # a success clears them
    record = store.record(store.key_for(old))
    assert record is not None and record.bookkeeping.failures == 0


def test_failure_is_visible_in_bookkeeping(store: TokenStore, workers: Workers, emulator: Emulator) -> None:
    emulator.config.fail_next = 1000
    workers.start(1)
    old = opaque(13)
    store.store(old)
    key = store.keys.token(store.key_for(old))
    wait_for(lambda: store.redis.hget(key, "last_error"), timeout=8, what="failure recorded")
    assert old.token.encode() not in store.redis.hget(key, "last_error")
    assert int(store.redis.hget(key, "failures")) >= 1


def test_sigkill_of_the_whole_worker_mid_refresh_does_not_stop_the_next_refresh(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    emulator.config.latency = 4.0
    victim = workers.start(1)
    old = opaque(17)  # due in 7 s
    store.store(old)
    wait_for(lambda: emulator.stats()["token_requests"] >= 1, timeout=12, what="refresh in flight")
    tree = descendants(victim.pid)  # the pool, its worker, the scheduler and the work-horse
    for pid in [victim.pid, *tree]:
        os.kill(pid, signal.SIGKILL)
    victim.wait(5)
    wait_for(
        lambda: not (descendants(victim.pid) | tree) & {int(p) for p in os.listdir("/proc") if p.isdigit()},
        timeout=5,
        what="the killed processes gone",
    )
    emulator.config.latency = 0.0
    workers.start(1)
    new = wait_for(
        lambda: replaced(store, old), timeout=old.expires - time.time(), what="refresh after SIGKILL"
    )
    assert time.time() < old.expires and new.expires > old.expires
    # The killed request is answered too (after its 4 s latency, which may outlast the recovery),
    # but never stored.
    wait_for(lambda: emulator.stats()["issued"] == 2, timeout=5, what="the killed request answered")
    assert replaced(store, old) == new


def test_sigkill_of_one_worker_process_mid_refresh_does_not_stop_the_next_refresh(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    from rq import Worker

    emulator.config.latency = 3.0
    workers.start(1)
    old = opaque(17)  # due in 7 s
    store.store(old)
    wait_for(lambda: emulator.stats()["token_requests"] >= 1, timeout=12, what="refresh in flight")
    (busy,) = [w for w in Worker.all(queue=store.refresh_queue.queue) if w.get_state() == "busy"]
    os.kill(busy.pid, signal.SIGKILL)  # the pool lives on and respawns the worker
    emulator.config.latency = 0.0
    new = wait_for(
        lambda: replaced(store, old), timeout=old.expires - time.time(), what="refresh after SIGKILL"
    )
    assert time.time() < old.expires and new.expires > old.expires


def test_delete_during_a_refresh_is_not_undone(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    emulator.config.latency = 2.0
    workers.start(1)
    old = opaque(9)  # due at once
    store.store(old)
    wait_for(lambda: emulator.stats()["token_requests"] >= 1, timeout=5, what="refresh in flight")
    assert store.delete(SCOPE)
    wait_for(lambda: emulator.stats()["issued"] >= 1, timeout=5, what="the fetch answered")
    wait_for(lambda: store.refresh_queue.queue.started_job_registry.count == 0, timeout=5, what="job done")
    wait_for(lambda: next_run(store) is None, timeout=5, what="no further refresh scheduled")
    assert store.find(SCOPE) is None and store.redis.zcard(store.keys.index) == 0


def test_short_lived_tokens_do_not_make_workers_hammer_the_endpoint(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    emulator.config.lifetime = 1
    workers.start(1)
    store.store(opaque(-1))
    wait_for(lambda: emulator.stats()["token_requests"] >= 2, timeout=10, what="two attempts")
    before = emulator.stats()["token_requests"]
    time.sleep(4)  # a window to count requests in, not a wait for an event
    assert emulator.stats()["token_requests"] - before <= 4  # backs off: not 13 requests a second


def test_an_old_format_job_hands_over_to_the_tokens_job(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    """A job written before ids named their token (key in kwargs, a hashed id) gives way to the new one."""
    old = opaque(60)  # not due: repair leaves it alone, so only the old job can bring the new one
    key = store.key_for(old)
    store.store(old)
    with store.redis.pipeline(transaction=True) as pipe:
        store.refresh_queue.cancel(pipe, key)  # as if stored by the previous version: no job under the new id
        pipe.execute()
    legacy = store.refresh_queue.queue.enqueue_call(
        "tokencache.refresh.refresh",
        kwargs=dict(
            namespace=store.keys.namespace, account=key.account, scope=key.scope, sub=None, refresh_before=10
        ),
        job_id="tc-635e7ebecb609f85e7e9b573",
        result_ttl=0,
    )
    workers.start(1)
    wait_for(lambda: next_run(store), timeout=10, what="the token's job scheduled")
    assert store.redis.zrange(store.refresh_queue.scheduled.key, 0, -1) == [store.keys.job_id(key).encode()]
    assert abs(next_run(store) - (old.expires - 10)) <= 2  # the new job ran, found it not due, and waits
    wait_for(lambda: not store.redis.exists(legacy.key), timeout=5, what="the old job gone")
    assert emulator.stats()["token_requests"] == 0


def test_refresh_job_keeps_repeats_still_to_come_and_resets_failures_on_any_job_class(
    store: TokenStore,
) -> None:
    """RefreshJob sheds a finished run's record, but not a repeat still to come (a plain rq worker
    with --job-class may run other jobs); and a success resets the failure count with RQ's own Job,
    which never writes an empty meta."""
    from rq.job import Job, JobStatus
    from rq.serializers import JSONSerializer

    from tokencache.core.queue import RefreshJob
    from tokencache.worker.refresh import _remember_failures

    job = RefreshJob.create(
        "tokencache.refresh.refresh", args=[10], connection=store.redis, id="tc-test-repeats",
        status=JobStatus.SCHEDULED, serializer=JSONSerializer,
    )  # fmt: skip
    job.repeats_left, job.repeat_intervals = 2, [5]
    job.save()
    assert store.redis.hget(job.key, "repeats_left") == b"2"
    job.repeats_left = 0
    job.save()
    assert store.redis.hget(job.key, "repeats_left") is None

    plain = Job.fetch(job.id, connection=store.redis, serializer=JSONSerializer)
    _remember_failures(plain, 2)
    plain.save()
    _remember_failures(plain, 0)
    plain.save()
    assert Job.fetch(job.id, connection=store.redis, serializer=JSONSerializer).meta.get("failures", 0) == 0
    ours = RefreshJob.fetch(job.id, connection=store.redis, serializer=JSONSerializer)
    _remember_failures(ours, 3)
    ours.save()
    _remember_failures(ours, 0)
    ours.save()
    assert store.redis.hget(job.key, "meta") is None
