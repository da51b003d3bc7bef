"""What ``tokencache status`` reports: is the refresh machinery of one namespace healthy?

Built from Redis alone, so any host with Redis access can ask: the worker
pools' heartbeats (``{ns}:pools``, written every second by ``tokencache
worker``), RQ's worker registrations (for fleets running plain ``rq worker``),
the scheduler, the refresh registries and our index.

The scheduler counts as running only while the holder of RQ's scheduler lock
keeps beating: RQ's scheduler writes ``last_heartbeat`` into its own hash every
second, whereas its lock outlives a SIGKILL by up to 61 s. That is the
scheduler process's own word, so it holds for plain ``rq worker`` fleets too,
and for a scheduler whose pool died around it but which still runs.

A key that a read has to skip (a malformed token hash, a key of another Redis
type, a junk index member or heartbeat) does not stop the report: it is
listed under ``skipped`` and is a problem until someone fixes it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple, cast

from redis import RedisError
from redis.client import Pipeline
from rq import Worker
from rq.exceptions import DeserializationError
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.scheduler import SCHEDULER_KEY_TEMPLATE, RQScheduler
from rq.utils import utcparse

from tokencache.app.reads import WRONG_TYPE, bad_keys
from tokencache.app.tokenstore import TokenStore
from tokencache.constants import FORGET_POOL, POOL_TTL, SCHEDULER_TTL
from tokencache.core.connection import redis_errors
from tokencache.core.pipeline import per_entry
from tokencache.core.queue import job_target
from tokencache.keys import TokenKey
from tokencache.worker.repair import fetch_jobs, overdue

__all__ = ["Health", "check"]


@dataclass(frozen=True)
class Health:
    """One look at a namespace; :attr:`problems` lists what needs attention (empty when healthy)."""

    redis_url: str
    redis_version: str
    redis_memory: str
    namespace: str
    queue: str
    pools: int
    dead_pools: list[str]
    workers: int
    rq_registrations: int
    scheduler: bool
    tokens: int
    scheduled: int
    queued: int
    overdue: list[str]
    failed: int
    failing: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    """Keys a read skipped (malformed, or of another Redis type) -> why."""
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _problems(h: Health) -> list[str]:
    found = [f"worker pool {name} stopped (no heartbeat for {POOL_TTL:g} s)" for name in h.dead_pools]
    if h.workers == 0:
        found.append(f"no worker is serving queue {h.queue!r}: start 'tokencache worker'")
    elif not h.scheduler:
        found.append(
            f"no RQ scheduler is running (none holds the lock, or its holder has not beaten for "
            f"{SCHEDULER_TTL:g} s): scheduled refreshes will not run on time"
        )
    if h.overdue:
        found.append(f"{len(h.overdue)} refresh(es) overdue")
    if h.failed:
        found.append(f"{h.failed} cached or wanted token(s) whose refresh gave up (see RQ's failed registry)")
    if h.failing:
        found.append(f"{len(h.failing)} token(s) failing to refresh")
    if h.skipped:
        names = ", ".join(sorted(h.skipped))
        found.append(f"{len(h.skipped)} malformed or wrong-type key(s) skipped: {names}")
    return found


def _pools(store: TokenStore, now: float) -> tuple[dict[str, int], list[str]]:
    """Live pools (name -> live workers) and the names of pools that stopped beating."""
    live: dict[str, int] = {}
    dead: list[str] = []
    raw = cast(dict[bytes, bytes], store.redis.hgetall(store.keys.pools))
    for name, value in raw.items():
        try:
            beat = json.loads(value)
            age, workers = now - float(beat["at"]), int(beat["workers"])
        except (ValueError, TypeError, KeyError) as e:
            bad_keys.skip(f"{store.keys.pools} {name!r}", f"unreadable pool heartbeat: {e!r}", "status")
            continue
        if age <= POOL_TTL:
            live[name.decode()] = workers
        elif age > FORGET_POOL:
            store.redis.hdel(store.keys.pools, name)
        else:
            dead.append(f"{name.decode()} on {beat.get('host', '?')}")
    return live, dead


def _scheduler_running(store: TokenStore, now: float) -> bool:
    """Whether the scheduler holding RQ's lock for the refresh queue beat in the last SCHEDULER_TTL s."""
    holder = cast(bytes | None, store.redis.get(RQScheduler.get_locking_key(store.refresh_queue.name)))
    if holder is None:
        return False
    pid, beat = cast(
        list[bytes | None],
        store.redis.hmget(SCHEDULER_KEY_TEMPLATE % holder.decode(), ["pid", "last_heartbeat"]),
    )
    if beat is None:
        return pid is not None  # an RQ that writes no beats: trust its lock, as before
    try:
        return now - utcparse(beat.decode()).timestamp() <= SCHEDULER_TTL
    except ValueError:
        return True  # a beat we cannot read: the lock is all we have


def _target(store: TokenStore, job: Job | None) -> TokenKey | None:
    """The token of ``store``'s namespace that a failed job was refreshing, if it is one of ours."""
    if job is None:
        return None
    try:
        namespace, key = job_target(job)
    except (ValueError, TypeError, DeserializationError):
        return None
    return key if namespace == store.keys.namespace else None


def _readable_jobs(ids: list[str], jobs: list[Job | RedisError | None]) -> list[Job | None]:
    """The jobs, a job key of another Redis type reported and left out."""
    for job_id, job in zip(ids, jobs, strict=True):
        if isinstance(job, RedisError):
            bad_keys.skip(Job.key_for(job_id), WRONG_TYPE, "status")
    return [job for job in jobs if not isinstance(job, RedisError)]


class _Still(NamedTuple):
    """Whether a failed job's token still matters: one reply per command of :meth:`queue`, in its order."""

    indexed_at: float | None
    wanted: int

    @staticmethod
    def queue(pipe: Pipeline, store: TokenStore, key: TokenKey) -> None:
        pipe.zscore(store.keys.index, store.keys.token(key))
        pipe.exists(store.keys.want(key))


def _failed_that_matter(store: TokenStore) -> int:
    """Failed refresh jobs of tokens still cached or wanted (an old typo's job does not count)."""
    registry = FailedJobRegistry(queue=store.refresh_queue.queue)
    ids = registry.get_job_ids(0, 999)
    targets = (_target(store, job) for job in _readable_jobs(ids, fetch_jobs(store, ids)))
    keys = [key for key in targets if key is not None]
    with store.redis.pipeline(transaction=False) as pipe:
        for key in keys:
            _Still.queue(pipe, store, key)
        still = per_entry(_Still, pipe.execute())
    return sum(1 for token in still if token.indexed_at is not None or token.wanted)


def check(store: TokenStore, redis_url: str) -> Health:
    """Look at Redis, the workers, the scheduler and the refresh registries of ``store``'s namespace."""
    rq = store.refresh_queue
    now = time.time()
    with redis_errors(store.redis), bad_keys.collect() as skipped:
        info = store.redis.info()
        live, dead = _pools(store, now)
        registrations = len(Worker.all(queue=rq.queue))
        failing = [
            r.key.encode() for r in store.records() if r.bookkeeping.failures and r.token.expires > now
        ]
        health = Health(
            redis_url=redis_url,
            redis_version=str(info.get("redis_version", "?")),
            redis_memory=str(info.get("used_memory_human", "?")),
            namespace=store.keys.namespace,
            queue=rq.name,
            pools=len(live),
            dead_pools=dead,
            # Pools' heartbeats are the truth; RQ's registrations outlive a SIGKILLed worker by minutes,
            # so they count only where no tokencache pool ever ran (plain 'rq worker').
            workers=sum(live.values()) if live or dead else registrations,
            rq_registrations=registrations,
            scheduler=_scheduler_running(store, now),
            tokens=int(store.redis.zcard(store.keys.index)),
            scheduled=rq.scheduled.count,
            queued=rq.queue.count,
            overdue=[key.encode() for key in overdue(store)],
            failed=_failed_that_matter(store),
            failing=failing,
        )
    health = replace(health, skipped=dict(skipped))  # complete now that every read is done
    return Health(**{**health.as_dict(), "problems": _problems(health)})
