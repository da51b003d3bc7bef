"""Repair: find tokens whose refresh is overdue and get them refreshed anyway.

RQ alone can lose a refresh: a worker SIGKILLed mid-job leaves it "started"
until its heartbeat expires (a minute or more), a work-horse killed alone
fails its job, a dead scheduler is replaced only after its lock's TTL and a
maintenance pass (minutes), a Redis failover can drop recent writes, and a
``store()`` that lands while the token's job finishes can be overwritten by
that job's own repeat. The refresh margin is ten seconds, so the worker pool
runs :func:`repair` every second (one worker of the fleet at a time, under
``{ns}:repair``) and re-enqueues what is overdue.

It reads only the index entries that are due (a range query on the sorted
set), never ``KEYS`` or a full ``SCAN``.

The index entry is what says a token is cached (or asked for, as a placeholder of
score 0): an entry whose hash expired during an outage stays, and its refresh is
kept alive (re-enqueued if its job is lost) until it succeeds, a ``delete()``
removes it, or it gives up on a hopeless error. Repair drops only placeholders
nobody waits for any more whose refresh is lost or gave up, and never moves a
refresh that is backing off (failures in the hash, or its account on hold).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple, cast

from redis.client import Pipeline
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from tokencache.app.tokenstore import TokenStore
from tokencache.constants import DEAD_AFTER, REPAIR_GRACE, REPAIR_SCAN
from tokencache.core.connection import redis_errors
from tokencache.core.locks import Lock
from tokencache.core.pipeline import per_entry
from tokencache.core.queue import job_refresh_before, job_target
from tokencache.keys import TokenKey
from tokencache.outcomes import Verdict

__all__ = ["overdue", "repair", "repair_if_leader", "retry_gave_up"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Entry:
    key: TokenKey
    expires: float  # 0: a placeholder (asked for, never cached)
    refresh_at: float | None  # None: the token hash is gone
    gave_up: bool
    backing_off: bool  # failures in the hash, or the account on hold: its job is late on purpose
    wanted: bool  # an app asked the workers for this token (the index entry may be a placeholder)
    lock_held: bool
    scheduled_at: float | None
    job: Job | None

    @property
    def cached(self) -> bool:
        """Whether a token was ever stored here (its hash may have expired since): kept refreshing."""
        return self.refresh_at is not None or self.expires > 0


def _fetch_jobs(store: TokenStore, ids: list[str]) -> list[Job | None]:
    """The jobs by id; an unreadable job hash (a partial one left by RQ's heartbeat) counts as missing."""
    try:
        return Job.fetch_many(ids, store.redis, serializer=JSONSerializer)
    except (NoSuchJobError, ValueError, TypeError):
        return [_fetch_one(store, job_id) for job_id in ids]


def _fetch_one(store: TokenStore, job_id: str) -> Job | None:
    try:
        return Job.fetch(job_id, store.redis, serializer=JSONSerializer)
    except (NoSuchJobError, ValueError, TypeError):
        return None


def _parse_members(
    store: TokenStore, members: list[tuple[bytes, float]]
) -> tuple[list[tuple[TokenKey, float]], list[bytes]]:
    """The index members that are token keys, and those that are not (junk for repair to drop)."""
    parsed, junk = [], []
    for member, expires in members:
        try:
            parsed.append((store.keys.parse_token(member.decode()), expires))
        except (UnicodeDecodeError, ValueError):
            junk.append(member)
    return parsed, junk


class _Fields(NamedTuple):
    """The token hash's fields repair reads, by HMGET in this order (named as in the hash)."""

    refresh_at: bytes | None
    gave_up_at: bytes | None
    failures: bytes | None


class _Lookups(NamedTuple):
    """What repair reads about one due entry: one reply per command of :meth:`queue`, in its order."""

    fields: list[bytes | None]
    wanted: int
    lock_held: int
    on_hold: int
    scheduled_at: float | None

    @staticmethod
    def queue(pipe: Pipeline, store: TokenStore, key: TokenKey) -> None:
        pipe.hmget(store.keys.token(key), *_Fields._fields)
        pipe.exists(store.keys.want(key))
        pipe.exists(store.keys.lock(key))
        pipe.exists(store.keys.backoff(key.account))
        pipe.zscore(store.refresh_queue.scheduled.key, store.keys.job_id(key))


def _due_entries(store: TokenStore, now: float) -> tuple[list[_Entry], list[bytes]]:
    """The due index entries with what repair needs to judge them, and the junk members found."""
    horizon = now + store.refresh_before - REPAIR_GRACE
    with redis_errors(store.redis):
        members = cast(
            list[tuple[bytes, float]],
            store.redis.zrangebyscore(store.keys.index, "-inf", horizon, 0, REPAIR_SCAN, withscores=True),
        )
        entries, junk = _parse_members(store, members)
        with store.redis.pipeline(transaction=False) as pipe:
            for key, _ in entries:
                _Lookups.queue(pipe, store, key)
            lookups = per_entry(_Lookups, pipe.execute())
        jobs = _fetch_jobs(store, [store.keys.job_id(key) for key, _ in entries])
    due = [
        _entry(key, expires, found, job)
        for (key, expires), found, job in zip(entries, lookups, jobs, strict=True)
    ]
    return due, junk


def _entry(key: TokenKey, expires: float, found: _Lookups, job: Job | None) -> _Entry:
    fields = _Fields(*found.fields)
    return _Entry(
        key,
        expires,
        refresh_at=_number(fields.refresh_at),
        gave_up=fields.gave_up_at is not None or (job is not None and "gave_up" in job.meta),
        backing_off=bool(_number(fields.failures)) or bool(found.on_hold),
        wanted=bool(found.wanted),
        lock_held=bool(found.lock_held),
        scheduled_at=found.scheduled_at,
        job=job,
    )


def _number(raw: bytes | None) -> float | None:
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def _started_ago(job: Job, now: float) -> float:
    started = job.started_at
    if started is None:
        return float("inf")
    started = started if started.tzinfo else started.replace(tzinfo=UTC)
    return (datetime.fromtimestamp(now, UTC) - started).total_seconds()


def _scheduled_verdict(entry: _Entry, now: float) -> Verdict:
    if entry.scheduled_at is None or entry.scheduled_at <= now - REPAIR_GRACE:
        return Verdict.ENQUEUE  # overdue in the schedule: no scheduler is moving it
    if entry.backing_off:
        return Verdict.OK  # scheduled late on purpose: moving it would undo the backoff
    if entry.refresh_at is not None and now > entry.refresh_at + REPAIR_GRACE < entry.scheduled_at:
        return Verdict.ENQUEUE  # scheduled after the token's own refresh time (a store() lost a race)
    return Verdict.OK


def _failed_verdict(entry: _Entry) -> Verdict:
    """A refresh that gave up on purpose stays failed while the token is cached (RQ's failed registry
    and the job's meta say why; status reports it); the placeholder of one nobody waits for any more
    is dropped. One that crashed (a killed work-horse) is retried like a lost job."""
    if entry.gave_up:
        return Verdict.OK if entry.cached or entry.wanted else Verdict.DROP
    return _lost_verdict(entry)


def _lost_verdict(entry: _Entry) -> Verdict:
    """A token whose job is gone: refresh it while it is cached (even expired) or wanted."""
    return Verdict.ENQUEUE if entry.cached or entry.wanted else Verdict.DROP


def _verdict(entry: _Entry, now: float) -> Verdict:
    """What to do with one overdue token."""
    job = entry.job
    if job is None:
        return _lost_verdict(entry)
    status = job.get_status(refresh=False)
    if status == JobStatus.FAILED:
        return _failed_verdict(entry)
    if status == JobStatus.SCHEDULED:
        return _scheduled_verdict(entry, now)
    if status == JobStatus.QUEUED:
        return Verdict.OK
    if status == JobStatus.STARTED:
        dead = not entry.lock_held and _started_ago(job, now) > DEAD_AFTER
        return Verdict.ENQUEUE if dead else Verdict.OK
    return Verdict.ENQUEUE  # finished without a repeat, stopped, canceled


def _enqueue(store: TokenStore, entry: _Entry) -> None:
    status = entry.job.get_status(refresh=False) if entry.job else "missing"
    log.warning("refresh of %s is overdue (job %s); re-enqueueing it", entry.key.encode(), status)
    refresh_before = store.refresh_before
    if entry.job is not None:
        refresh_before = job_refresh_before(entry.job, refresh_before)
    with redis_errors(store.redis):
        store.refresh_queue.enqueue(entry.key, refresh_before)


def overdue(store: TokenStore) -> list[TokenKey]:
    """The tokens a repair pass would re-enqueue right now (for ``tokencache status``), changing nothing."""
    now = store.clock()
    due, _ = _due_entries(store, now)
    return [entry.key for entry in due if _verdict(entry, now) is Verdict.ENQUEUE]


def repair(store: TokenStore) -> Counter[Verdict]:
    """One repair pass over the overdue tokens of ``store``; counts what it did."""
    now = store.clock()
    done: Counter[Verdict] = Counter()
    due, junk = _due_entries(store, now)
    for member in junk:
        log.warning("dropping %r from %s: not a token key", member, store.keys.index)
        with redis_errors(store.redis):
            store.redis.zrem(store.keys.index, member)
    for entry in due:
        verdict = _verdict(entry, now)
        done[verdict] += 1
        if verdict is Verdict.ENQUEUE:
            _enqueue(store, entry)
        elif verdict is Verdict.DROP:
            with redis_errors(store.redis):
                store.redis.zrem(store.keys.index, store.keys.token(entry.key))
    return done


def _gave_up_target(store: TokenStore, job: Job | None) -> TokenKey | None:
    """The token of ``store``'s namespace whose refresh ``job`` gave up on purpose, if it is one."""
    if job is None or job.get_status(refresh=False) != JobStatus.FAILED or "gave_up" not in job.meta:
        return None
    try:
        namespace, key = job_target(job)
    except (ValueError, TypeError):
        return None
    return key if namespace == store.keys.namespace else None


def retry_gave_up(store: TokenStore) -> list[TokenKey]:
    """Re-enqueue the refreshes that gave up on a hopeless error while their token is still indexed.

    A pool runs this when it starts: fixing a rejected key or a configuration means restarting the
    workers (they load key files once), and that restart is then all it takes. A fix that did not
    work costs one request per token and gives up again.
    """
    with redis_errors(store.redis):
        ids = FailedJobRegistry(queue=store.refresh_queue.queue).get_job_ids(0, REPAIR_SCAN - 1)
        retried = []
        for job in _fetch_jobs(store, ids):
            key = _gave_up_target(store, job)
            if key is not None and job is not None and store.indexed(key):
                store.refresh_queue.enqueue(key, job_refresh_before(job, store.refresh_before))
                retried.append(key)
    if retried:
        log.info("retrying %d refresh(es) that gave up before this pool started", len(retried))
    return retried


def repair_if_leader(store: TokenStore, interval: float) -> Counter[Verdict] | None:
    """Run :func:`repair` unless another worker of the fleet did within ``interval`` seconds."""
    with redis_errors(store.redis):
        if not Lock(store.redis, store.keys.repair, interval).acquire():
            return None
    return repair(store)
