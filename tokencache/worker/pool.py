"""The refresh worker pool: ``tokencache worker -n N``.

N RQ workers (forked by RQ's own :class:`WorkerPool`, restarted if they die)
with the scheduler on and the JSON serializer, all on the refresh queue; the
pool's parent process also runs :func:`repair` about once a second. SIGTERM or
SIGINT stops the pool gracefully: each worker finishes its current job.

The workers are RQ's ``SimpleWorker``: they run each refresh in their own
process instead of forking a work-horse per job. A refresh is one short HTTP
call, cheaper than the fork; and with a fixed set of worker processes the
Prometheus counters (multiprocess mode keeps one file per process) stay a
fixed set of files. A worker that dies mid-refresh is respawned by the pool
and its refresh re-enqueued by repair once its lock expires.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time
from typing import Any

import redis
from redis import Redis
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker, Worker
from rq.worker_pool import WorkerPool

from tokencache import env, metrics
from tokencache.app.tokenstore import TokenStore
from tokencache.constants import METRICS_HOST, REPAIR_INTERVAL, RESEND_STOP_EVERY, STOP_TIMEOUT
from tokencache.core.connection import redis_errors
from tokencache.core.queue import RefreshJob
from tokencache.core.sentinel import master_address
from tokencache.core.sources import default_sources
from tokencache.errors import TokenCacheError
from tokencache.validate import check_count
from tokencache.worker.repair import repair_if_leader, retry_gave_up
from tokencache.worker.scheduler import SchedulerKeeper
from tokencache.worker.scrape import serve_worker_metrics

__all__ = ["RefreshPool", "run_pool"]

log = logging.getLogger(__name__)


class RefreshPool(WorkerPool):
    """RQ's worker pool plus the repair pass in its once-a-second supervision loop."""

    def __init__(self, store: TokenStore, num_workers: int, **kwargs: Any) -> None:
        super().__init__(
            [store.refresh_queue.name],
            connection=store.redis,
            num_workers=num_workers,
            serializer=JSONSerializer,
            worker_class=SimpleWorker,
            job_class=RefreshJob,  # sheds each finished run's record when RQ reschedules the job
            **kwargs,
        )
        self.store = store
        self._stop_requested_at: float | None = None
        self._heartbeat_withdrawn = False
        self._next_resend = RESEND_STOP_EVERY
        self._master: tuple[str, int] | None = None
        self.scheduler = SchedulerKeeper(store.redis, store.refresh_queue.name)

    def check_workers(self, respawn: bool = True) -> None:
        self._follow_master()
        super().check_workers(respawn=respawn)
        try:
            self._heartbeat()
            if not self._burst and self.status != self.Status.STOPPED:
                self.scheduler.check(time.time())
            repair_if_leader(self.store, REPAIR_INTERVAL)
        except TokenCacheError as e:
            log.warning("repair pass skipped: %s", e)
        except Exception:
            # Supervision (respawning workers, the next repair) must outlive any one bad pass.
            log.exception("repair pass failed")

    def _follow_master(self) -> None:
        """Behind Sentinel: restart the workers when the master moved (they wait on the old one).

        A worker blocked in its queue wait sends nothing, so its connection cannot notice the
        failover (core/sentinel.py); it would wait on the old master, for minutes. Stopped (warm: a
        busy worker finishes its refresh), it is respawned by the next supervision pass, on the new
        master. Its scheduler stops with it; :class:`SchedulerKeeper` sees that one runs again.
        """
        try:
            master = master_address(self.store.redis.connection_pool)
        except redis.ConnectionError:
            return  # no master elected yet: look again next pass
        if master is None or master == self._master:
            return
        if self._master is not None and self.status != self.Status.STOPPED:
            log.warning(
                "Redis master moved from %s:%d to %s:%d: restarting the workers", *self._master, *master
            )
            for data in list(self.worker_dict.values()):
                self.stop_worker(data)
        self._master = master

    def _heartbeat(self) -> None:
        """Tell ``tokencache status`` this pool is alive, and with how many live workers."""
        beat = {"workers": self.number_of_active_workers, "at": time.time(), "host": socket.gethostname(),
                "pid": os.getpid()}  # fmt: skip
        self.store.redis.hset(self.store.keys.pools, self.name, json.dumps(beat))

    def request_stop(self, signum: int | None = None, frame: object = None) -> None:
        # A signal handler: it may interrupt the main loop inside redis-py's pool lock, so it must
        # not touch Redis (that would deadlock). The main loop withdraws the heartbeat instead.
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
        self.scheduler.stop()
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

    def all_workers_have_stopped(self) -> bool:
        if not self._heartbeat_withdrawn:
            self._heartbeat_withdrawn = True
            with contextlib.suppress(Exception):  # best effort: status ages the entry out anyway
                self.store.redis.hdel(self.store.keys.pools, self.name)
        stopped = bool(super().all_workers_have_stopped())
        waited = time.monotonic() - (self._stop_requested_at or time.monotonic())
        if not stopped and waited > STOP_TIMEOUT:
            log.warning("workers still running %.0fs after the stop request; killing them", waited)
            for data in list(self.worker_dict.values()):
                self.stop_worker(data, sig=signal.SIGKILL)
        elif not stopped and waited >= self._next_resend:
            self._next_resend = waited + RESEND_STOP_EVERY
            self._resend_stop()
        return stopped

    def _resend_stop(self) -> None:
        """Ask again the workers that are alive but not busy: they lost the first request.

        An RQ worker installs its signal handlers only after its start-up (registration, cleaning
        registries, the scheduler), and a stop signal that lands before that is lost: the worker
        then waits on the queue for good. An idle worker that got the request exits at once, so one
        still idle seconds later never saw it. A busy one is left to finish its refresh (a second
        signal would be RQ's cold shutdown).
        """
        for data in list(self.worker_dict.values()):
            with contextlib.suppress(Exception):
                state = self.store.redis.hget(f"{Worker.redis_worker_namespace_prefix}{data.name}", "state")
                if state != b"busy":
                    log.info("worker pid %d is still running: asking it to stop again", data.pid)
                    self.stop_worker(data)


def _check_redis(redis: Redis) -> None:
    with redis_errors(redis):
        redis.ping()


def run_pool(
    store: TokenStore,
    num_workers: int,
    *,
    burst: bool = False,
    logging_level: str = "INFO",
    metrics_port: int | None = None,
    metrics_host: str = METRICS_HOST,
) -> None:
    """Run the pool in the foreground until SIGTERM/SIGINT (or until idle with ``burst``).

    The metrics page (``metrics_port``) is unauthenticated, so it listens on ``metrics_host``, the
    loopback interface unless told otherwise (``0.0.0.0`` for a scraper on another host)."""
    num_workers = check_count("num_workers", num_workers)
    _check_redis(store.redis)
    accounts = default_sources().accounts()  # fail fast on a broken TOKENCACHE_CREDENTIALS
    env.refresh_batch()  # and on a bad TOKENCACHE_REFRESH_BATCH, TOKENCACHE_BACKOFF_CAP or
    env.backoff_cap()  # TOKENCACHE_AUDIT_MAXLEN, which every refresh job reads
    env.audit_maxlen()
    log.info("refreshing accounts %s on queue %r", ", ".join(accounts), store.refresh_queue.name)
    retry_gave_up(store)  # a restart is how a fixed key or configuration takes effect
    if metrics_port is not None:
        folder = metrics.enable_multiprocess()  # before the workers are forked
        serve_worker_metrics(store, metrics_port, metrics_host)
        log.info("metrics on %s:%d (multiprocess folder %s)", metrics_host, metrics_port, folder)
    RefreshPool(store, num_workers).start(burst=burst, logging_level=logging_level)
