"""What ``tokencache status`` reports: is the refresh machinery of one namespace healthy?

Built from Redis alone (RQ's worker registrations, the scheduler lock, the
refresh registries, our index), so any host with Redis access can ask, and the
same numbers feed the workers' Prometheus gauges.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rq import Worker
from rq.registry import FailedJobRegistry
from rq.scheduler import RQScheduler

from .connection import redis_errors
from .repair import overdue
from .tokenstore import TokenStore

__all__ = ["Health", "check"]


@dataclass(frozen=True)
class Health:
    """One look at a namespace; :attr:`problems` lists what needs attention (empty when healthy)."""

    redis_url: str
    redis_version: str
    redis_memory: str
    namespace: str
    queue: str
    workers: int
    busy_workers: int
    scheduler: bool
    tokens: int
    scheduled: int
    queued: int
    overdue: list[str]
    failed: int
    failing: list[str]
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _problems(h: Health) -> list[str]:
    found = []
    if h.workers == 0:
        found.append(f"no worker is serving queue {h.queue!r}: start 'tokencache worker'")
    elif not h.scheduler:
        found.append("no RQ scheduler holds the lock: scheduled refreshes will not run on time")
    if h.overdue:
        found.append(f"{len(h.overdue)} refresh(es) overdue")
    if h.failed:
        found.append(f"{h.failed} refresh job(s) gave up (RQ failed registry)")
    if h.failing:
        found.append(f"{len(h.failing)} token(s) failing to refresh")
    return found


def check(store: TokenStore, redis_url: str) -> Health:
    """Look at Redis, the workers, the scheduler and the refresh registries of ``store``'s namespace."""
    rq = store.refresh_queue
    with redis_errors(store.redis):
        info = store.redis.info()
        workers = Worker.all(queue=rq.queue)
        failing = [
            r.key.encode()
            for r in store.records()
            if r.bookkeeping.failures and r.token.expires > time.time()
        ]
        health = Health(
            redis_url=redis_url,
            redis_version=str(info.get("redis_version", "?")),
            redis_memory=str(info.get("used_memory_human", "?")),
            namespace=store.keys.namespace,
            queue=rq.name,
            workers=len(workers),
            busy_workers=sum(1 for w in workers if w.get_state() == "busy"),
            scheduler=bool(store.redis.exists(RQScheduler.get_locking_key(rq.name))),
            tokens=int(store.redis.zcard(store.keys.index)),
            scheduled=rq.scheduled.count,
            queued=rq.queue.count,
            overdue=[key.encode() for key in overdue(store)],
            failed=FailedJobRegistry(queue=rq.queue).count,
            failing=failing,
        )
    return Health(**{**health.as_dict(), "problems": _problems(health)})
