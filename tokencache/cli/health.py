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

It only reads (what it forgets is a pool heartbeat an hour dead), so a least-privilege Redis user can
run it (docs/security.md): what that user may not read, such as INFO for the server's version and
memory, is reported as ``unknown`` rather than failing the report. RQ's own listings would write
(``Worker.all`` drops registrations whose hash is gone, a registry's count cleans it up), so status
counts with plain reads instead and leaves the cleaning to the workers.

A key that a read has to skip (a malformed token hash, a key of another Redis
type, a junk index member or heartbeat) does not stop the report: it is
listed under ``skipped`` and is a problem until someone fixes it.

It reports the fleet as it is now: a refresh that gave up counts only while
that is still the last word about a token that matters (the job still failed,
the token still cached or wanted and not replaced since), so old records in
RQ's failed registry, kept a day, do not keep a healed fleet red. A cached
token that expired without a replacement (an outage its refresh is still
retrying through) is a problem of its own.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple, cast

from redis import RedisError, ResponseError
from redis.client import Pipeline
from rq import worker_registration
from rq.exceptions import DeserializationError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry

from tokencache.app.reads import WRONG_TYPE, bad_keys
from tokencache.app.tokenstore import TokenStore
from tokencache.constants import (
    AUDIT_AHEAD,
    EXPIRY_SKEW,
    FORGET_POOL,
    POOL_TTL,
    REPAIR_GRACE,
    REPAIR_SCAN,
    SCHEDULER_TTL,
)
from tokencache.core.connection import raise_other_errors, redis_errors
from tokencache.core.pipeline import per_entry
from tokencache.core.queue import job_target
from tokencache.core.record import field_number
from tokencache.crypto import PLAINTEXT
from tokencache.keys import TokenKey
from tokencache.worker.repair import fetch_jobs, overdue
from tokencache.worker.scheduler import scheduler_running

__all__ = ["UNKNOWN", "Health", "check"]

SHOWN = 3
"""Tokens a problem line names, at most (``--json`` lists them all)."""
UNKNOWN = "unknown"
"""What status says of something the Redis user may not read (INFO, for the server's version and memory)."""


@dataclass(frozen=True)
class Health:
    """One look at a namespace; :attr:`problems` lists what needs attention (empty when healthy)."""

    redis_url: str
    redis_version: str
    """INFO's ``redis_version``: the Redis the server is compatible with (Valkey 9 says 7.2.4)."""
    redis_memory: str
    namespace: str
    queue: str
    pools: int
    dead_pools: list[str]
    workers: int
    rq_registrations: int
    scheduler: bool
    tokens: int
    """Members of the namespace's index (ZCARD, one read however many): cached tokens, plus any junk
    member someone wrote, which ``ls`` reports and skips; hence shown as "index entries"."""
    scheduled: int
    queued: int
    overdue: list[str]
    failed: int
    failing: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    """Keys a read skipped (malformed, or of another Redis type) -> why."""
    gave_up: list[str] = field(default_factory=list)
    """``key: reason`` of each refresh counted in :attr:`failed`."""
    server: str = UNKNOWN
    """The server and its own version: ``Redis 7.0.15``, ``Valkey 9.1.2`` (INFO's ``valkey_version``)."""
    expired: list[str] = field(default_factory=list)
    """Cached tokens that expired more than a repair grace ago without a replacement."""
    refused: list[str] = field(default_factory=list)
    """Jobs of other namespaces that failed on this queue (refused by a worker that does not serve them)."""
    encryption: dict[str, int] = field(default_factory=dict)
    """Cached tokens by the id of the key they are encrypted with (``plaintext``): a rotation's progress."""
    undecryptable: list[str] = field(default_factory=list)
    """``key: why`` of cached tokens this process cannot decrypt (told, not a problem: status needs no
    key, and a token's next refresh replaces one that fails authentication)."""
    audit_ahead: float | None = None
    """Seconds the audit stream's last id is ahead of this host's clock (None: no stream, or the user
    may not run XINFO); more than :data:`AUDIT_AHEAD` is a problem: an id written on purpose."""
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _problems(h: Health) -> list[str]:
    return _machinery_problems(h) + _refresh_problems(h)


def _machinery_problems(h: Health) -> list[str]:
    """What is wrong with the pools, the workers and the scheduler."""
    found = [f"worker pool {name} stopped (no heartbeat for {POOL_TTL:g} s)" for name in h.dead_pools]
    if h.workers == 0:
        found.append(f"no worker is serving queue {h.queue!r}: start 'tokencache worker'")
    elif not h.scheduler:
        found.append(
            f"no RQ scheduler is running (none holds the lock, or its holder has not beaten for "
            f"{SCHEDULER_TTL:g} s): scheduled refreshes will not run on time"
        )
    if h.refused:
        found.append(
            f"{len(h.refused)} refresh job(s) of another namespace put on queue {h.queue!r} and refused "
            "(each namespace needs its own queue and workers): " + ", ".join(h.refused[:SHOWN])
        )
    return found


def _refresh_problems(h: Health) -> list[str]:
    """What is wrong with the refreshes and the keys of this namespace."""
    found = []
    if h.overdue:
        found.append(f"{len(h.overdue)} refresh(es) overdue")
    if h.failed:
        found.append(
            f"{h.failed} cached or wanted token(s) whose refresh gave up, retrying cannot help: "
            + "; ".join(h.gave_up[:SHOWN])
        )
    if h.expired:
        found.append(
            f"{len(h.expired)} cached token(s) expired without a replacement (refreshes still failing): "
            + ", ".join(h.expired[:SHOWN])
        )
    if h.failing:
        found.append(f"{len(h.failing)} token(s) failing to refresh")
    if h.audit_ahead is not None and h.audit_ahead > AUDIT_AHEAD:
        found.append(
            f"the audit stream's last id is {h.audit_ahead:.0f} s ahead of this host's clock: someone wrote "
            "an entry with an explicit id (a wedged or forged trail); later entries are refused and the "
            "writes go on unaudited (tokencache_audit_failed_total). Rename the stream as an admin "
            "(docs/security.md)"
        )
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


def _server(store: TokenStore) -> tuple[str, str, str]:
    """The server with its own version, INFO's ``redis_version`` and the memory used, or ``unknown`` where
    the user may not run INFO (a ``@dangerous`` command that the least-privilege roles of
    docs/security.md need not have). Valkey reports the Redis version it is compatible with as
    ``redis_version`` and its own as ``valkey_version``: status names the one that is running."""
    try:
        info = store.redis.info()
    except ResponseError:  # NOPERM, or a Redis-compatible server without INFO
        return UNKNOWN, UNKNOWN, UNKNOWN
    redis_version = str(info.get("redis_version", UNKNOWN))
    valkey = info.get("valkey_version")
    server = f"Valkey {valkey}" if valkey is not None else f"Redis {redis_version}"
    return server, redis_version, str(info.get("used_memory_human", UNKNOWN))


def _audit_ahead(store: TokenStore, now: float) -> float | None:
    """Seconds the audit stream's last generated id is ahead of ``now``. XINFO STREAM, not the last
    entry: ``MAXLEN 0`` empties a wedged stream. None if there is no stream or the user may not look."""
    try:
        info = store.redis.xinfo_stream(store.keys.audit)
    except ResponseError:  # no such key, another type, or NOPERM (an ACL line older than +xinfo|stream)
        return None
    last = info.get("last-generated-id") or b"0-0"
    millis = (last.decode() if isinstance(last, bytes) else str(last)).partition("-")[0]
    return int(millis) / 1000 - now if millis.isdigit() else None


def _registrations(store: TokenStore) -> int:
    """RQ's worker registrations for the refresh queue whose hash still exists (read only: RQ's own
    ``Worker.all`` also deletes the ones that are gone, a write the operator role does not have)."""
    keys = sorted(worker_registration.get_keys(queue=store.refresh_queue.queue))
    with store.redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.exists(key)
        return sum(1 for there in pipe.execute() if there)


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
    token: list[bytes | None]  # HMGET expires gave_up_at last_error

    @staticmethod
    def queue(pipe: Pipeline, store: TokenStore, key: TokenKey) -> None:
        pipe.zscore(store.keys.index, store.keys.token(key))
        pipe.exists(store.keys.want(key))
        pipe.hmget(store.keys.token(key), "expires", "gave_up_at", "last_error")

    def replaced(self, now: float) -> bool:
        """Whether a token written after the give-up is cached (a write clears ``gave_up_at``)."""
        expires, gave_up_at, _ = self.token
        return gave_up_at is None and (field_number(expires) or 0.0) > now + EXPIRY_SKEW

    def matters(self, now: float) -> bool:
        return (self.indexed_at is not None or bool(self.wanted)) and not self.replaced(now)

    def reason(self, job: Job) -> str | None:
        """Why the refresh gave up (the job's meta, or the hash of a job from before the meta had it);
        None for a job that crashed rather than gave up, which is repair's to retry."""
        _, gave_up_at, last_error = self.token
        if "gave_up" in job.meta:
            return str(job.meta["gave_up"])
        return last_error.decode(errors="replace") if gave_up_at is not None and last_error else None


def _failed(job: Job) -> bool:
    """Whether the job's last run failed: a later run or request re-arms it (its status moves on)."""
    return job.get_status(refresh=False) == JobStatus.FAILED


def _failed_jobs(store: TokenStore) -> list[Job]:
    """The jobs in the refresh queue's failed registry whose last run failed (a later run moves them on)."""
    ids = FailedJobRegistry(queue=store.refresh_queue.queue).get_job_ids(0, 999, cleanup=False)  # read only
    return [job for job in _readable_jobs(ids, fetch_jobs(store, ids)) if job is not None and _failed(job)]


def _refused(store: TokenStore, jobs: list[Job]) -> list[str]:
    """``job id (namespace)`` of the failed jobs of another namespace on this queue: a worker refused them
    (each namespace needs a queue and workers of its own). Its own namespace's repair re-enqueues each
    on its own queue, which ends the failure; until then it counts."""
    found = []
    for job in jobs:
        try:
            namespace, _ = job_target(job)
        except (ValueError, TypeError, DeserializationError):
            continue
        if namespace != store.keys.namespace:
            found.append(f"{job.id} (namespace {namespace!r})")
    return found


def _failed_that_matter(store: TokenStore, jobs: list[Job]) -> list[str]:
    """``key: reason`` of the refreshes that gave up and are still the last word about a token that is
    cached or wanted and not replaced since (an old typo's job, or one re-armed since, does not count)."""
    targets = [(key, job) for job in jobs if (key := _target(store, job)) is not None]
    with store.redis.pipeline(transaction=False) as pipe:
        for key, _ in targets:
            _Still.queue(pipe, store, key)
        still = per_entry(_Still, raise_other_errors(pipe.execute(raise_on_error=False)))
    now = time.time()
    return [
        f"{key.encode()}: {reason}"
        for (key, job), token in zip(targets, still, strict=True)
        if _readable(store, key, token) and token.matters(now) and (reason := token.reason(job)) is not None
    ]


def _readable(store: TokenStore, key: TokenKey, token: _Still) -> bool:
    """False, reported, when the token's key holds another Redis type (its HMGET failed)."""
    if isinstance(token.token, RedisError):
        bad_keys.skip(store.keys.token(key), WRONG_TYPE, "status")
        return False
    return True


def _expired(store: TokenStore, now: float) -> list[str]:
    """Cached tokens (index score > 0: not a placeholder) whose hash expired a repair grace ago or more.

    Only an index entry whose hash is gone counts: an evicted token (its score is when it was evicted)
    still has its hash until it is replaced, a key of another type is reported under ``skipped``, and
    an index member that is not a token key is junk for repair to drop.
    """
    members = cast(
        list[bytes],
        store.redis.zrangebyscore(store.keys.index, "(0", now - REPAIR_GRACE, 0, REPAIR_SCAN),
    )
    keys = [store.keys.index_member(member) for member in members]
    candidates = [(member, key) for member, key in zip(members, keys, strict=True) if key is not None]
    with store.redis.pipeline(transaction=False) as pipe:
        for member, _ in candidates:
            pipe.exists(member)
        present = pipe.execute()
    return [key.encode() for (_, key), there in zip(candidates, present, strict=True) if not there]


@dataclass
class _Tokens:
    """What one walk through the cached tokens tells: failing refreshes, and how they are stored."""

    failing: list[str] = field(default_factory=list)
    by_key: Counter[str] = field(default_factory=Counter)
    undecryptable: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, store: TokenStore, now: float) -> _Tokens:
        found = cls()
        for record in store.records():
            if record.token.expires <= now:
                continue
            if record.bookkeeping.failures:
                found.failing.append(record.key.encode())
            found.by_key[record.key_id or PLAINTEXT] += 1
            if record.unreadable is not None:
                found.undecryptable.append(f"{record.key.encode()}: {record.unreadable}")
        return found


def check(store: TokenStore, redis_url: str) -> Health:
    """Look at Redis, the workers, the scheduler and the refresh registries of ``store``'s namespace."""
    rq = store.refresh_queue
    now = time.time()
    with redis_errors(store.redis), bad_keys.collect() as skipped:
        server, version, memory = _server(store)
        live, dead = _pools(store, now)
        registrations = _registrations(store)
        tokens = _Tokens.of(store, now)
        health = Health(
            redis_url=redis_url,
            redis_version=version,
            redis_memory=memory,
            server=server,
            namespace=store.keys.namespace,
            queue=rq.name,
            pools=len(live),
            dead_pools=dead,
            # Pools' heartbeats are the truth; RQ's registrations outlive a SIGKILLed worker by minutes,
            # so they count only where no tokencache pool ever ran (plain 'rq worker').
            workers=sum(live.values()) if live or dead else registrations,
            rq_registrations=registrations,
            scheduler=scheduler_running(store.redis, store.refresh_queue.name, now),
            tokens=int(store.redis.zcard(store.keys.index)),
            scheduled=rq.scheduled.get_job_count(cleanup=False),
            queued=rq.queue.count,
            overdue=[key.encode() for key in overdue(store)],
            failed=len(gave_up := _failed_that_matter(store, failed_jobs := _failed_jobs(store))),
            failing=tokens.failing,
            gave_up=gave_up,
            expired=_expired(store, now),
            refused=_refused(store, failed_jobs),
            encryption=dict(tokens.by_key),
            undecryptable=tokens.undecryptable,
            audit_ahead=_audit_ahead(store, now),
        )
    health = replace(health, skipped=dict(skipped))  # complete now that every read is done
    return Health(**{**health.as_dict(), "problems": _problems(health)})
