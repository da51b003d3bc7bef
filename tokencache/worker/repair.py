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

One bad key must not stop the pass for the others: an index member that is
not a token key is dropped from the index (the index is ours); a token key or
a job key that holds another Redis type (a ``redis-cli SET`` over it) is
skipped and reported (logged once, counted in ``tokencache_bad_keys_total``),
never deleted: it is someone else's data. Its index entry stays, so the pass
judges the token again once the key is fixed.

The index entry is what says a token is cached (or asked for, as a placeholder of
score 0): an entry whose hash expired during an outage stays, and its refresh is
kept alive (re-enqueued if its job is lost) until it succeeds, a ``delete()``
removes it, or it gives up on a hopeless error. Repair drops only placeholders
nobody waits for any more whose refresh is lost or gave up, and never moves a
refresh that is backing off (failures in the hash, or its account on hold).

A job RQ calls ``queued`` is lost too when the queue is empty: an idle RQ worker
pops a job id before it starts the job, and a stop signal in between (a rolling
restart) ends the worker with the job popped and never run.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple, cast

from redis import RedisError
from redis.client import Pipeline
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from tokencache.app.reads import WRONG_TYPE, bad_keys
from tokencache.app.tokenstore import TokenStore
from tokencache.constants import DEAD_AFTER, EARLY_RUN, REPAIR_GRACE, REPAIR_SCAN
from tokencache.core.connection import raise_other_errors, redis_errors
from tokencache.core.locks import Lock
from tokencache.core.pipeline import per_entry
from tokencache.core.queue import job_refresh_before, job_target
from tokencache.core.record import field_number
from tokencache.keys import TokenKey
from tokencache.outcomes import Verdict

__all__ = ["fetch_jobs", "overdue", "repair", "repair_if_leader", "retry_gave_up"]

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
    job: Job | None  # read only where a verdict needs it: overdue, or started with its lock free
    overdue: bool  # due longer than REPAIR_GRACE ago: past the scheduler's normal jitter
    started: bool  # RQ says a worker runs its job now
    jobless: bool  # no job hash and nothing in RQ's schedule: its job record is gone
    queue_empty: bool  # the refresh queue held no job when the pass read it (see _queued_verdict)

    @property
    def cached(self) -> bool:
        """Whether a token was ever stored here (its hash may have expired since): kept refreshing."""
        return self.refresh_at is not None or self.expires > 0


def fetch_jobs(store: TokenStore, ids: list[str]) -> list[Job | RedisError | None]:
    """The jobs by id, in one round trip: None for a missing job or an unreadable hash (a partial one
    left by RQ's heartbeat), the WRONGTYPE error for a job key that holds another type (call it inside
    :func:`redis_errors`)."""
    with store.redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hgetall(Job.key_for(job_id))
        replies = raise_other_errors(pipe.execute(raise_on_error=False))
    return [_job(store, job_id, raw) for job_id, raw in zip(ids, replies, strict=True)]


def _job(store: TokenStore, job_id: str, raw: dict[bytes, bytes] | RedisError) -> Job | RedisError | None:
    if isinstance(raw, RedisError) or not raw:
        return raw if isinstance(raw, RedisError) else None
    job = Job(job_id, connection=store.redis, serializer=JSONSerializer)
    try:
        job.restore(raw)
    except (NoSuchJobError, ValueError, TypeError):
        return None
    return job


def _parse_members(
    store: TokenStore, members: list[tuple[bytes, float]]
) -> tuple[list[tuple[TokenKey, float]], list[bytes]]:
    """The index members that are token keys, and those that are not (junk for repair to drop)."""
    parsed, junk = [], []
    for member, expires in members:
        key = store.keys.index_member(member)
        if key is None:
            junk.append(member)
        else:
            parsed.append((key, expires))
    return parsed, junk


class _Fields(NamedTuple):
    """The token hash's fields repair reads, by HMGET in this order (named as in the hash)."""

    refresh_at: bytes | None
    gave_up_at: bytes | None
    failures: bytes | None


class _Lookups(NamedTuple):
    """What repair reads about one due entry: one reply per command of :meth:`queue`, in its order."""

    fields: list[bytes | None] | RedisError  # WRONGTYPE if the token key holds another type
    wanted: int
    lock_held: int
    on_hold: int
    scheduled_at: float | None
    job_status: bytes | None

    @staticmethod
    def queue(pipe: Pipeline, store: TokenStore, key: TokenKey) -> None:
        pipe.hmget(store.keys.token(key), *_Fields._fields)
        pipe.exists(store.keys.want(key))
        pipe.exists(store.keys.lock(key))
        pipe.exists(store.keys.backoff(key.account))
        pipe.zscore(store.refresh_queue.scheduled.key, store.keys.job_id(key))
        pipe.hget(Job.key_for(store.keys.job_id(key)), "status")

    @property
    def dead_suspect(self) -> bool:
        """A started job whose token lock is free: its worker may have died mid-refresh."""
        return self.job_status == JobStatus.STARTED.encode() and not self.lock_held


def _due_entries(store: TokenStore, now: float) -> tuple[list[_Entry], list[bytes]]:
    """The due index entries with what repair needs to judge them, and the junk members found.

    Due means the token's refresh may have started (RQ starts a job up to ``EARLY_RUN`` early): a
    refresh whose worker died is seen at once, without waiting out the scheduler's jitter
    (``REPAIR_GRACE``), which only the other verdicts need. Job hashes are read only where a
    verdict needs them, so the entries merely due cost five small reads each. An entry whose token
    key or job key holds another type is left out, reported.
    """
    horizon = now + store.refresh_before + EARLY_RUN
    overdue_until = now + store.refresh_before - REPAIR_GRACE
    with redis_errors(store.redis):
        members = cast(
            list[tuple[bytes, float]],
            store.redis.zrangebyscore(store.keys.index, "-inf", horizon, 0, REPAIR_SCAN, withscores=True),
        )
        entries, junk = _parse_members(store, members)
        with store.redis.pipeline(transaction=False) as pipe:
            for key, _ in entries:
                _Lookups.queue(pipe, store, key)
            lookups = per_entry(_Lookups, raise_other_errors(pipe.execute(raise_on_error=False)))
        needed = [
            store.keys.job_id(key)
            for (key, expires), found in zip(entries, lookups, strict=True)
            if expires <= overdue_until or found.dead_suspect
        ]
        jobs = dict(zip(needed, fetch_jobs(store, needed), strict=True))
        queue_empty = bool(needed) and not store.redis.llen(store.refresh_queue.queue.key)
    due = [
        _entry(
            store,
            key,
            expires,
            found,
            jobs.get(store.keys.job_id(key)),
            overdue=expires <= overdue_until,
            queue_empty=queue_empty,
        )
        for (key, expires), found in zip(entries, lookups, strict=True)
    ]
    return [entry for entry in due if entry is not None], junk


def _entry(
    store: TokenStore,
    key: TokenKey,
    expires: float,
    found: _Lookups,
    job: Job | RedisError | None,
    *,
    overdue: bool,
    queue_empty: bool,
) -> _Entry | None:
    """One due entry as repair judges it; None, reported, if its token key or job key holds another type."""
    if isinstance(found.fields, RedisError):
        bad_keys.skip(store.keys.token(key), WRONG_TYPE, "repair")
        return None
    if isinstance(job, RedisError):
        why = f"the job of token {key.encode()} (not refreshed meanwhile): {WRONG_TYPE}"
        bad_keys.skip(Job.key_for(store.keys.job_id(key)), why, "repair")
        return None
    bad_keys.good(store.keys.token(key))
    fields = _Fields(*found.fields)
    return _Entry(
        key,
        expires,
        refresh_at=field_number(fields.refresh_at),
        gave_up=fields.gave_up_at is not None or (job is not None and "gave_up" in job.meta),
        backing_off=bool(field_number(fields.failures)) or bool(found.on_hold),
        wanted=bool(found.wanted),
        lock_held=bool(found.lock_held),
        scheduled_at=found.scheduled_at,
        job=job,
        overdue=overdue,
        started=found.job_status == JobStatus.STARTED.encode(),
        jobless=found.job_status is None and found.scheduled_at is None,
        queue_empty=queue_empty,
    )


def _started_ago(job: Job, now: float) -> float:
    return float("inf") if job.started_at is None else _seconds_since(job.started_at, now)


def _seconds_since(when: datetime, now: float) -> float:
    """Seconds from one of RQ's job times (``started_at``, ``enqueued_at``: naive ones are UTC) to ``now``."""
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return (datetime.fromtimestamp(now, UTC) - when).total_seconds()


def _scheduled_verdict(entry: _Entry, now: float) -> Verdict:
    if entry.scheduled_at is None or entry.scheduled_at <= now - REPAIR_GRACE:
        return Verdict.ENQUEUE  # overdue in the schedule: no scheduler is moving it
    if entry.backing_off:
        return Verdict.OK  # scheduled late on purpose: moving it would undo the backoff
    if (
        entry.refresh_at is not None
        and now > entry.refresh_at + REPAIR_GRACE
        and (
            entry.scheduled_at
            > now + REPAIR_GRACE  # one due within the grace runs by itself (a hold's spread)
        )
    ):
        return Verdict.ENQUEUE  # scheduled well after the token's own refresh time (a store() lost a race)
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
    """What to do with one due token: a dead refresh or a lost job at once, anything else once overdue.

    A due token with no job at all is rebuilt at once, not once overdue: another token's batch may
    keep refreshing it before it ever comes overdue (the batch moves a member's job only if it is
    still in RQ's schedule), and a job record lost in a failover would then never come back.
    Rebuilding early costs nothing: the job finds the token fresh and reschedules itself.
    """
    if entry.started:
        return _started_verdict(entry, now)
    if entry.overdue:
        return _overdue_verdict(entry, now)
    return _lost_verdict(entry) if entry.jobless else Verdict.OK


def _started_verdict(entry: _Entry, now: float) -> Verdict:
    """A started job whose lease lapsed has lost its worker (a live refresh renews the lease)."""
    if entry.lock_held or entry.job is None:
        return Verdict.OK
    dead = _started_ago(entry.job, now) > DEAD_AFTER
    return Verdict.ENQUEUE if dead else Verdict.OK


def _overdue_verdict(entry: _Entry, now: float) -> Verdict:
    """What to do with a token whose refresh is overdue and not running."""
    job = entry.job
    if job is None:
        return _lost_verdict(entry)
    status = job.get_status(refresh=False)
    if status == JobStatus.FAILED:
        return _failed_verdict(entry)
    if status == JobStatus.SCHEDULED:
        return _scheduled_verdict(entry, now)
    if status == JobStatus.QUEUED:
        return _queued_verdict(entry, now)
    if status == JobStatus.STARTED:
        return Verdict.OK  # started since our read: running
    return Verdict.ENQUEUE  # finished without a repeat, stopped, canceled


def _queued_verdict(entry: _Entry, now: float) -> Verdict:
    """A queued job waits for a worker, unless the queue is empty: then a worker popped it and stopped
    before running it (RQ pops while idle, and a warm stop landing in between ends the worker with
    the job popped: a rolling restart's SIGTERM), and nothing will ever run it. A job enqueued within
    the grace may be one a live worker popped and is about to start: left to it."""
    job = entry.job
    if not entry.queue_empty or job is None or job.enqueued_at is None:
        return Verdict.OK
    return Verdict.ENQUEUE if _seconds_since(job.enqueued_at, now) > REPAIR_GRACE else Verdict.OK


def _enqueue(store: TokenStore, entry: _Entry) -> None:
    status = entry.job.get_status(refresh=False) if entry.job else "missing"
    log.warning("refresh of %s is overdue (job %s); re-enqueueing it", entry.key.encode(), status)
    refresh_before = store.refresh_before
    if entry.job is not None:
        refresh_before = job_refresh_before(entry.job, refresh_before)  # this store's, if unreadable
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
        bad_keys.skip(member.decode(errors="backslashreplace"), store.junk_reason, "repair")
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
    except (ValueError, TypeError, DeserializationError):  # unreadable: status reports the job
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
        for job in fetch_jobs(store, ids):
            if isinstance(job, RedisError):
                continue  # a job key of another type: repair and status report it
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
