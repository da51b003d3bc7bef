"""RQ's scheduler, kept running by the pool: a dead one is replaced within seconds, not minutes.

RQ starts its scheduler from a worker and restarts it only in the worker's
maintenance pass (every 10 minutes by default); and the scheduler's lock
outlives a dead scheduler by up to 61 s, so nobody else takes over meanwhile.
A scheduler dies when Redis goes away under it (a failover: its heartbeat
raises and the process exits). Repair would still enqueue the overdue
refreshes, seconds late each; so the pool's supervision loop looks once a
second: when the lock's holder has not beaten for :data:`SCHEDULER_TTL`
seconds, it frees that holder's lock (compare-and-delete by the holder's name,
RQ's own script) and starts a scheduler of its own, which takes the lock.

Whether a scheduler is running is judged by its own heartbeat, never by the
lock alone (``tokencache status`` asks :func:`scheduler_running` too).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import cast

from redis import Redis
from rq.scheduler import SCHEDULER_KEY_TEMPLATE, RQScheduler
from rq.scripts import release_lock
from rq.serializers import JSONSerializer
from rq.utils import utcparse

from tokencache.constants import SCHEDULER_TTL

__all__ = ["SchedulerKeeper", "scheduler_running"]

log = logging.getLogger(__name__)


def _holder(redis: Redis, queue: str) -> str | None:
    holder = cast(bytes | None, redis.get(RQScheduler.get_locking_key(queue)))
    return None if holder is None else holder.decode()


def scheduler_running(redis: Redis, queue: str, now: float) -> bool:
    """Whether the scheduler holding RQ's lock for ``queue`` beat in the last :data:`SCHEDULER_TTL` s."""
    holder = _holder(redis, queue)
    if holder is None:
        return False
    pid, beat = cast(
        list[bytes | None], redis.hmget(SCHEDULER_KEY_TEMPLATE % holder, ["pid", "last_heartbeat"])
    )
    if beat is None:
        return pid is not None  # an RQ that writes no beats: trust its lock, as before
    try:
        return now - utcparse(beat.decode()).timestamp() <= SCHEDULER_TTL
    except ValueError:
        return True  # a beat we cannot read: the lock is all we have


class SchedulerKeeper:
    """Starts a scheduler for ``queue`` whenever none is running (see the module docstring)."""

    def __init__(self, redis: Redis, queue: str) -> None:
        self.redis = redis
        self.queue = queue
        self._scheduler: RQScheduler | None = None

    def check(self, now: float) -> None:
        """One look: free a dead holder's lock and start a scheduler if none runs."""
        if scheduler_running(self.redis, self.queue, now) or self.alive():
            return
        holder = _holder(self.redis, self.queue)
        if holder is not None:
            log.warning(
                "RQ's scheduler %s has not beaten for %.0f s: starting another", holder, SCHEDULER_TTL
            )
            release_lock(self.redis, RQScheduler.get_locking_key(self.queue), holder)
        scheduler = RQScheduler([self.queue], connection=self.redis, serializer=JSONSerializer)
        if scheduler.acquire_locks(auto_start=True):
            self._scheduler = scheduler

    def alive(self) -> bool:
        """Whether the scheduler process this keeper started runs (it may not have beaten yet)."""
        process = None if self._scheduler is None else self._scheduler._process
        return process is not None and process.is_alive()

    def stop(self) -> None:
        """Ask the scheduler this keeper started to stop (it releases its lock); safe in a signal handler."""
        process = None if self._scheduler is None else self._scheduler._process
        if process is not None and process.pid is not None and process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
