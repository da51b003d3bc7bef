"""Repair: find tokens whose refresh is overdue and get them refreshed anyway.

RQ alone can lose a refresh: a worker SIGKILLed mid-job leaves it "started"
until its heartbeat expires (a minute or more), a dead scheduler is replaced
only after its lock's TTL and a maintenance pass (minutes), and a Redis
failover can drop recent writes. The refresh margin is ten seconds, so the
worker pool runs :func:`repair` every second or so (one worker of the fleet at
a time, under ``{ns}:repair``) and re-enqueues what is overdue.

It reads only the index entries that are due (a range query on the sorted
set), never ``KEYS`` or a full ``SCAN``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from .connection import redis_errors
from .keys import TokenKey
from .locks import Lock
from .refresh import LOCK_TTL
from .tokenstore import TokenStore

__all__ = ["GRACE", "repair", "repair_if_leader"]

log = logging.getLogger(__name__)

GRACE = 3.0
"""Seconds a refresh may be late before repair steps in: the scheduler polls every
second with whole-second scores, so anything later than this is not normal jitter."""
BATCH = 1000


@dataclass(frozen=True)
class _Entry:
    key: TokenKey
    expires: float
    token_exists: bool
    lock_held: bool
    scheduled_at: float | None
    job: Job | None


def _due_entries(store: TokenStore, now: float) -> list[_Entry]:
    horizon = now + store.refresh_before - GRACE
    rq = store.refresh_queue
    with redis_errors(store.redis):
        members = cast(
            list[tuple[bytes, float]],
            store.redis.zrangebyscore(store.keys.index, "-inf", horizon, 0, BATCH, withscores=True),
        )
        keys = [store.keys.parse_token(member.decode()) for member, _ in members]
        with store.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.exists(store.keys.token(key))
                pipe.exists(store.keys.lock(key))
                pipe.zscore(rq.scheduled.key, store.keys.job_id(key))
            flags = pipe.execute()
        jobs = Job.fetch_many([store.keys.job_id(k) for k in keys], store.redis, serializer=JSONSerializer)
    return [
        _Entry(key, expires, bool(flags[3 * i]), bool(flags[3 * i + 1]), flags[3 * i + 2], jobs[i])
        for i, (key, (_, expires)) in enumerate(zip(keys, members, strict=True))
    ]


def _started_long_ago(job: Job, now: float) -> bool:
    started = job.started_at
    if started is None:
        return True
    started = started if started.tzinfo else started.replace(tzinfo=UTC)
    return (datetime.fromtimestamp(now, UTC) - started).total_seconds() > LOCK_TTL + 1


def _verdict(entry: _Entry, now: float) -> str:
    """What to do with one overdue token: 'ok', 'enqueue' or 'drop'."""
    job = entry.job
    status = job.get_status(refresh=False) if job is not None else None
    if status == JobStatus.FAILED or (job is None and not entry.token_exists and entry.expires < now):
        # The refresh gave up (or the token died with its job): RQ's failed registry tells why.
        return "ok" if entry.token_exists else "drop"
    if status == JobStatus.SCHEDULED:
        late = entry.scheduled_at is None or entry.scheduled_at <= now - GRACE
        return "enqueue" if late else "ok"
    if status == JobStatus.QUEUED:
        return "ok"
    if status == JobStatus.STARTED:
        dead = not entry.lock_held and _started_long_ago(job, now)  # type: ignore[arg-type]
        return "enqueue" if dead else "ok"
    return "enqueue"  # missing, finished without a repeat, stopped, canceled


def repair(store: TokenStore) -> Counter[str]:
    """One repair pass over the overdue tokens of ``store``; counts what it did."""
    now = store.clock()
    done: Counter[str] = Counter()
    for entry in _due_entries(store, now):
        verdict = _verdict(entry, now)
        done[verdict] += 1
        if verdict == "enqueue":
            log.warning(
                "refresh of %s is overdue (job %s); re-enqueueing it",
                entry.key.encode(),
                entry.job.get_status(refresh=False) if entry.job else "missing",
            )
            with redis_errors(store.redis):
                store.refresh_queue.enqueue(entry.key, store.refresh_before)
        elif verdict == "drop":
            with redis_errors(store.redis):
                store.redis.zrem(store.keys.index, store.keys.token(entry.key))
    return done


def repair_if_leader(store: TokenStore, interval: float) -> Counter[str] | None:
    """Run :func:`repair` unless another worker of the fleet did within ``interval`` seconds."""
    with redis_errors(store.redis):
        if not Lock(store.redis, store.keys.repair, interval).acquire():
            return None
    return repair(store)
