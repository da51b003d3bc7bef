"""The refresh queue: one deterministic RQ job per cached token.

Why it looks the way it does:

* The job id is derived from the token's key (:meth:`Keys.job_id`), so storing
  one token a thousand times rewrites one job instead of queueing a thousand.
* Jobs carry only the token's key (no access token) and use RQ's JSON
  serializer: nothing secret sits in ``rq:job:*`` and nothing is pickled.
* A running refresh job must not schedule *its own id* through ``enqueue_at``:
  with ``result_ttl=0`` RQ deletes the finished job's hash right after, which
  would take the freshly scheduled next run with it. Instead the job asks RQ to
  *repeat* it (``repeats_left``/``repeat_intervals``), which RQ applies in the
  same transaction that records the success. See :func:`repeat_current_job`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer

from .keys import Keys, TokenKey

__all__ = ["JOB_FAILURE_TTL", "JOB_TIMEOUT", "RefreshQueue", "repeat_current_job"]

REFRESH_FUNC = "tokencache.refresh.refresh"
JOB_TIMEOUT = 60
"""Seconds RQ lets one refresh run; a fetch is bounded far below that (see sources)."""
JOB_FAILURE_TTL = 24 * 3600
"""How long a refresh that gave up stays in RQ's failed registry for operators to see."""


class RefreshQueue:
    """Schedules, cancels and enqueues the refresh jobs of one namespace.

    Every write goes into a caller's pipeline, so it joins the caller's
    transaction; the asyncio store passes a recorder and replays the commands
    on ``redis.asyncio`` (RQ itself is synchronous).
    """

    def __init__(self, connection: Redis, name: str, keys: Keys) -> None:
        self.connection = connection
        self.name = name
        self.keys = keys
        self.queue = Queue(name, connection=connection, serializer=JSONSerializer)
        self.scheduled = ScheduledJobRegistry(queue=self.queue)

    def job_kwargs(self, key: TokenKey, refresh_before: int) -> dict[str, Any]:
        """The job's arguments: the token's key and settings, never the token."""
        return {
            "namespace": self.keys.namespace,
            "account": key.account,
            "scope": key.scope,
            "sub": key.sub,
            "refresh_before": refresh_before,
        }

    def _job(self, key: TokenKey, refresh_before: int, status: JobStatus) -> Job:
        return self.queue.create_job(
            REFRESH_FUNC,
            kwargs=self.job_kwargs(key, refresh_before),
            job_id=self.keys.job_id(key),
            result_ttl=0,
            failure_ttl=JOB_FAILURE_TTL,
            timeout=JOB_TIMEOUT,
            description=f"tokencache refresh {key.encode()}",
            status=status,
        )

    def schedule(self, pipe: Any, key: TokenKey, refresh_before: int, at: datetime) -> Job:
        """Add (or move) the token's one refresh job to ``at`` inside ``pipe``'s transaction."""
        job = self._job(key, refresh_before, JobStatus.SCHEDULED)
        return self.queue.schedule_job(job, at.astimezone(UTC), pipeline=pipe)

    def cancel(self, pipe: Any, key: TokenKey) -> None:
        """Remove the token's refresh job from the schedule and the queue, inside ``pipe``."""
        job_id = self.keys.job_id(key)
        pipe.zrem(self.scheduled.key, job_id)
        pipe.lrem(self.queue.key, 0, job_id)
        pipe.delete(Job.key_for(job_id))

    def move_scheduled(self, pipe: Any, key: TokenKey, at: int) -> None:
        """Move the token's job to ``at`` (Unix seconds) inside ``pipe``, if it waits in RQ's schedule.

        ``ZADD XX`` touches only a job that is still scheduled: one the scheduler already queued, or a
        running one, is left alone, and finds its token fresh when it runs.
        """
        pipe.zadd(self.scheduled.key, {self.keys.job_id(key): at}, xx=True)

    def enqueue_into(self, pipe: Any, key: TokenKey, refresh_before: int) -> Job:
        """Put the token's refresh job on the queue now, bypassing the scheduler, inside ``pipe``'s MULTI."""
        job = self._job(key, refresh_before, JobStatus.QUEUED)
        pipe.zrem(self.scheduled.key, job.id)
        pipe.lrem(self.queue.key, 0, job.id)
        return self.queue.enqueue_job(job, pipeline=pipe)

    def enqueue(self, key: TokenKey, refresh_before: int) -> Job:
        """:meth:`enqueue_into` a transaction of its own (repair, for_scope without credentials)."""
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.multi()  # before any command: enqueue_job() would start the transaction itself
            job = self.enqueue_into(pipe, key, refresh_before)
            pipe.execute()
        return job


def repeat_current_job(job: Job, delay: float) -> None:
    """Have RQ run ``job`` again ``delay`` seconds after it finishes.

    RQ applies this in the transaction that records the job's success, so the
    next run survives the current one's cleanup (which, with ``result_ttl=0``,
    deletes the job hash). A delay of 0 re-enqueues at once.
    """
    job.repeats_left = 1
    # RQ types intervals as int but uses timedelta(seconds=...): a float keeps sub-second precision.
    job.repeat_intervals = [max(0.0, delay)]  # type: ignore[list-item]


def utc(timestamp: float) -> datetime:
    """An aware UTC datetime, as RQ's scheduler wants (a naive one is read as local time)."""
    return datetime.fromtimestamp(timestamp, tz=UTC)
