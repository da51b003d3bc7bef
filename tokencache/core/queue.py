"""The refresh queue: one deterministic RQ job per cached token.

Why it looks the way it does:

* The job id is derived from the token's key (:meth:`Keys.job_id`), so storing
  one token a thousand times rewrites one job instead of queueing a thousand.
  The id names the namespace and the token reversibly (:func:`parse_job_id`),
  so the job's one argument is ``refresh_before``.
* Jobs carry no access token and use RQ's JSON serializer: nothing secret
  sits in ``rq:job:*`` and nothing is pickled.
* Memory: every value of the job's RQ hash is at most 64 bytes (a ~47-byte
  ``data``) and :class:`RefreshJob` leaves out the fields RQ would write empty
  and those it implies (``created_at``, the fixed description), so Redis keeps
  the hash as a small listpack of six fields instead of a hashtable, a fraction
  of the memory (docs/performance.md). Only memory depends on that; a bigger
  hash works the same.
* A running refresh job must not schedule *its own id* through ``enqueue_at``:
  with ``result_ttl=0`` RQ deletes the finished job's hash right after, which
  would take the freshly scheduled next run with it. Instead the job asks RQ to
  *repeat* it (``repeats_left``/``repeat_intervals``), which RQ applies in the
  same transaction that records the success. See :func:`repeat_current_job`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from redis import Redis
from rq import Queue
from rq.exceptions import DeserializationError
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer

from tokencache.constants import JOB_FAILURE_TTL, JOB_TIMEOUT
from tokencache.core.pipeline import Pipeline
from tokencache.errors import RefusedJobError
from tokencache.keys import Keys, TokenKey, parse_job_id

__all__ = [
    "SERVER_VERSION",
    "RefreshJob",
    "RefreshQueue",
    "job_refresh_before",
    "job_target",
    "repeat_current_job",
]

REFRESH_FUNC = "tokencache.refresh.refresh"
SERVER_VERSION = (7, 0, 0)
"""What RQ is told the server's version is (the oldest Redis tokencache is tested on), so that it never asks.

RQ's ``Queue`` asks INFO for it once per connection, only to stamp it on the in-memory Job it enqueues
(never saved) and to choose LPOS in ``get_job_position`` (which tokencache does not call). INFO is a
``@dangerous`` command that the app's Redis user does not need otherwise (docs/security.md), so
the version is given instead: one command fewer in the app role, and one round trip fewer."""
DESCRIPTION = "tokencache refresh"
"""Every refresh job's RQ description: fixed and short (RQ's default spells out the call)."""


class RefreshJob(Job):
    """RQ's Job, saved without the fields a waiting refresh job does not need.

    * Fields RQ writes as ``""`` when unset: RQ reads a missing field exactly
      as an empty one, and a fresh refresh job has eight of them.
    * While the job waits in the schedule, the record of its last run
      (``started_at``, ``ended_at``, ``worker_name``, its result, the repeat
      it just used...), which RQ would otherwise keep for every token until the
      next run overwrites it. RQ sets them again when the job
      next runs.

    :meth:`save` deletes such fields in the same pipeline before it writes, so a
    rewrite clears what an earlier run left, as RQ's ``""`` would. The store
    writes jobs with this class; ``tokencache worker`` also loads them with it,
    so the save that reschedules a finished job (RQ's repeat) sheds its run
    record.

    It also runs nothing but the refresh: a job hash names the function a worker
    imports and calls (and callbacks it calls after), so anyone who can write an
    ``rq:job:*`` hash could have a worker run any importable function. A job of
    this class that names another function, an instance or any callback fails
    with :class:`RefusedJobError` before anything is imported. A plain ``rq
    worker`` needs ``--job-class tokencache.scheduling.RefreshJob`` (or
    ``RQ_JOB_CLASS``): the refresh function refuses to run under any other
    job class. It never sends a webhook (RQ 3 sends those a job hash lists)
    and always uses the JSON serializer.
    """

    UNSET: ClassVar[tuple[str, ...]] = (
        "success_callback_name",
        "failure_callback_name",
        "stopped_callback_name",
        "started_at",
        "ended_at",
        "last_heartbeat",
        "worker_name",
        "group_id",
    )
    RUN_RECORD: ClassVar[tuple[str, ...]] = (
        "started_at",
        "ended_at",
        "last_heartbeat",
        "worker_name",
        "enqueued_at",
        "result",
        "repeats_left",
        "repeat_intervals",
    )
    _RUN_ONLY: ClassVar[tuple[str, ...]] = RUN_RECORD[:-2]
    IMPLIED: ClassVar[tuple[str, ...]] = ("created_at", "description")
    """Never saved: RQ reads a missing ``created_at`` as "now" and nothing reads it back (jobs of one id
    are rewritten in place, so it would say when the last store was), and every refresh job's
    description is :data:`DESCRIPTION` (put back by :meth:`restore`). 64 bytes per token less."""
    CLEARED: ClassVar[tuple[str, ...]] = tuple(
        dict.fromkeys(UNSET + RUN_RECORD + IMPLIED + ("meta", "webhooks"))
    )

    def __init__(
        self, id: str | None = None, connection: Redis | None = None, serializer: Any = None
    ) -> None:
        """RQ's Job, always with the JSON serializer: refresh jobs are JSON, and a ``rq worker --job-class``
        without ``--serializer`` must never unpickle what a job hash holds (its meta, say)."""
        super().__init__(id, connection=connection, serializer=JSONSerializer)

    def restore(self, raw_data: Any) -> Any:
        """RQ's restore; a job saved without its description (all but those older versions wrote) gets
        :data:`DESCRIPTION` back, so RQ's log lines and dashboards still name it."""
        restored = super().restore(raw_data)
        if self.description is None:
            self.description = DESCRIPTION
        return restored

    @property
    def func(self) -> Any:
        """The refresh function, and nothing else (RefusedJobError, nothing imported, for any other job)."""
        self._check_allowed()
        return super().func

    def _check_allowed(self) -> None:
        callbacks = (self._success_callback_name, self._failure_callback_name, self._stopped_callback_name)
        plain = self.instance is None and not any(callbacks) and not self.webhooks
        if self.func_name == REFRESH_FUNC and plain:
            return
        extras = [f"callback {name!r}" for name in callbacks if name]
        extras += ["an instance"] if self.instance is not None else []
        extras += [f"{len(self.webhooks)} webhook(s)"] if self.webhooks else []
        named = f"function {self.func_name!r}" + "".join(f", {extra}" for extra in extras)
        raise RefusedJobError(
            f"job {self.id!r} names {named}: a tokencache worker runs only {REFRESH_FUNC}, without an "
            "instance, callbacks or webhooks; refused, nothing imported, run or sent"
        )

    def send_webhooks(self, status: Any, *, exc_string: str | None = None) -> None:
        """Never: RQ 3 keeps webhooks in the job hash as data and the worker sends them itself, so a
        planted one would make a credential-holding worker call any URL; refresh jobs have none."""

    # Never a callback: refresh jobs have none, and a planted one must not run even when the job fails.
    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None

    def to_dict(self, include_meta: bool = True, include_result: bool = True) -> dict[str, Any]:
        fields: dict[str, Any] = super().to_dict(include_meta=include_meta, include_result=include_result)
        waiting = fields.get("status") == JobStatus.SCHEDULED
        shed = self.RUN_RECORD if not self.repeats_left else self._RUN_ONLY  # repeats to come are kept
        return {
            name: value
            for name, value in fields.items()
            if name not in self.IMPLIED
            and not (value == "" and name in self.UNSET)
            and not (waiting and name in shed)
            and not (name == "meta" and not self.meta)
        }

    def save(
        self, pipeline: Pipeline | None = None, include_meta: bool = True, include_result: bool = True
    ) -> None:
        connection: Pipeline | Redis = pipeline if pipeline is not None else self.connection
        mapping: dict[Any, Any] = self.to_dict(include_meta=include_meta, include_result=include_result)
        stale = [name for name in self.CLEARED if name not in mapping and (include_meta or name != "meta")]
        connection.hdel(self.key, *stale)
        connection.hset(self.key, mapping=mapping)


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
        self.queue = Queue(name, connection=connection, serializer=JSONSerializer, job_class=RefreshJob)
        self.queue.redis_server_version = SERVER_VERSION
        self.scheduled = ScheduledJobRegistry(queue=self.queue)

    def _job(self, pipe: Pipeline, key: TokenKey, refresh_before: int, status: JobStatus) -> Job:
        """The token's job (its id names the token; its one argument is ``refresh_before``).

        A :class:`RefreshJob`: saving it in ``pipe`` also clears the fields it leaves out."""
        job = self.queue.create_job(
            REFRESH_FUNC,
            args=[refresh_before],
            job_id=self.keys.job_id(key),
            result_ttl=0,
            failure_ttl=JOB_FAILURE_TTL,
            timeout=JOB_TIMEOUT,
            description=DESCRIPTION,
            status=status,
        )
        return job

    def schedule(self, pipe: Pipeline, key: TokenKey, refresh_before: int, at: datetime) -> Job:
        """Add (or move) the token's one refresh job to ``at`` inside ``pipe``'s transaction."""
        job = self._job(pipe, key, refresh_before, JobStatus.SCHEDULED)
        pipe.persist(job.key)  # a failed run left RQ's failure_ttl on the hash: this job lives on
        return self.queue.schedule_job(job, at.astimezone(UTC), pipeline=_for_rq(pipe))

    def cancel(self, pipe: Pipeline, key: TokenKey) -> None:
        """Remove the token's refresh job from the schedule and the queue, inside ``pipe``."""
        job_id = self.keys.job_id(key)
        pipe.zrem(self.scheduled.key, job_id)
        pipe.lrem(self.queue.key, 0, job_id)
        pipe.delete(Job.key_for(job_id))

    def move_scheduled(self, pipe: Pipeline, key: TokenKey, at: int) -> None:
        """Move the token's job to ``at`` (Unix seconds) inside ``pipe``, if it waits in RQ's schedule.

        ``ZADD XX`` touches only a job that is still scheduled: one the scheduler already queued, or a
        running one, is left alone, and finds its token fresh when it runs.
        """
        pipe.zadd(self.scheduled.key, {self.keys.job_id(key): at}, xx=True)

    def enqueue_into(self, pipe: Pipeline, key: TokenKey, refresh_before: int) -> Job:
        """Put the token's refresh job on the queue now, bypassing the scheduler, inside ``pipe``'s MULTI."""
        job = self._job(pipe, key, refresh_before, JobStatus.QUEUED)
        pipe.zrem(self.scheduled.key, job.id)
        pipe.lrem(self.queue.key, 0, job.id)
        pipe.persist(job.key)  # as in schedule(): no expiry a failed (or refused) run left
        return self.queue.enqueue_job(job, pipeline=_for_rq(pipe))

    def enqueue(self, key: TokenKey, refresh_before: int) -> Job:
        """:meth:`enqueue_into` a transaction of its own (repair, for_scope without credentials)."""
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.multi()  # before any command: enqueue_job() would start the transaction itself
            job = self.enqueue_into(pipe, key, refresh_before)
            pipe.execute()
        return job


def _for_rq(pipe: Pipeline) -> Any:
    """``pipe`` as RQ's ``pipeline=`` argument: RQ types it ``redis.client.Pipeline``, but it only
    calls what :class:`Pipeline` names on it (the asyncio store passes a recorder), hence Any."""
    return pipe


def job_target(job: Job) -> tuple[str, TokenKey]:
    """The namespace and token key a refresh job refreshes (ValueError if ``job`` is none of ours).

    Read from the job's id; a job written before ids named their token carries
    them as keyword arguments instead.
    """
    old = job.kwargs
    if {"namespace", "account", "scope", "sub"} <= old.keys():
        return str(old["namespace"]), TokenKey(str(old["account"]), str(old["scope"]), old["sub"] or None)
    return parse_job_id(job.id)


def job_refresh_before(job: Job, default: int) -> int:
    """The ``refresh_before`` a refresh job was written with (a keyword in old-format jobs); ``default``
    when its arguments are unreadable (a hash someone wrote by hand, or a partial one)."""
    try:
        value = job.args[0] if job.args else job.kwargs.get("refresh_before", default)
    except (DeserializationError, ValueError, TypeError, AttributeError):
        return default
    return value if isinstance(value, int) and not isinstance(value, bool) else default


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
