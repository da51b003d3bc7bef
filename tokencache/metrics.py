"""Prometheus metrics, for the worker pool and for apps.

Worker side (``tokencache worker --metrics-port 9108`` serves them, with the scrape-time gauges of
:mod:`tokencache.worker.scrape`):

- ``tokencache_refreshes_total{outcome}`` (counter): refresh-job runs by outcome (the
  :attr:`~tokencache.outcomes.Outcome.label` of each): ``refreshed``, ``not_due``, ``busy``,
  ``failed``, ``gave_up``, ``held_back``, ``deleted``, ``crashed``, ``skipped`` (the token's key
  holds another Redis type), ``refused`` (a job of a namespace this worker does not serve: someone put
  it on this pool's queue; any count of it needs looking into); and ``batched``: tokens refreshed by
  another token's job (see :mod:`tokencache.worker.batch`);
- ``tokencache_refresh_lateness_seconds`` (histogram): when a refresh ran minus when it was due;
- ``tokencache_endpoint_latency_seconds{result}`` (histogram): token requests to Google, ok/error;
- ``tokencache_endpoint_rate_limited_total`` (counter): rate-limited answers (429, or 403 "rate limit
  exceeded") of the token endpoint; also counted by apps that fetch with credentials of their own;
- ``tokencache_refreshes_scheduled`` (gauge, read at scrape): refresh jobs in RQ's schedule;
- ``tokencache_refreshes_overdue`` (gauge, read at scrape): refreshes repair would re-enqueue now;
- ``tokencache_redis_up`` (gauge): whether that scrape could read Redis.

The gauges describe the whole fleet, and every pool exports them: aggregate them with ``max``,
not ``sum``. A respawned worker adds its own counter files (their counts are kept).

App side (any process; expose them with your own Prometheus endpoint, or
:func:`start_http_server`):

- ``tokencache_cache_hits_total`` (counter): ``find``/``for_scope`` reads that found a token;
- ``tokencache_cache_misses_total`` (counter): reads that did not;
- ``tokencache_fetch_wait_seconds{result}`` (histogram): how long ``for_scope`` waited on a miss;
- ``tokencache_invalidations_total{result}`` (counter): reports of a token an API rejected, by what
  they did (the :attr:`~tokencache.outcomes.Invalidation.label` of each): ``evicted``,
  ``not_stored``, ``pending``, ``rate_limited`` (a steady count of it: an API rejects every token).

Both sides:

- ``tokencache_bad_keys_total{where}`` (counter): reads that met a malformed or wrong-type key and
  skipped it (each key is also logged once per process, by name), by the read that met it:
  ``find`` (``find``/``for_scope``), ``record`` (a refresh job's or a batch's re-read), ``listing``
  (``tokens``/``records``, so ``ls`` and ``status``), ``repair``, ``batch``, ``status`` (failed
  jobs). A repair pass meets a bad key every second until it is fixed, so a rate above zero means
  one is still there.

The metric objects are created on first use, not at import, so a process can
choose prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``)
before anything is counted; the worker pool does that for its workers.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tokencache.outcomes import Invalidation, Outcome

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram


__all__ = [
    "Where",
    "enable_multiprocess",
    "observe_endpoint",
    "observe_fetch_wait",
    "record_audit_failure",
    "record_bad_key",
    "record_invalidation",
    "record_rate_limited",
    "record_read",
    "record_refresh",
    "start_http_server",
]

Where = Literal["find", "record", "listing", "repair", "batch", "status"]
"""The values of the ``where`` label of ``tokencache_bad_keys_total``: which read met the bad key."""

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENESS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class _Metrics:
    refreshes: Counter
    lateness: Histogram
    endpoint: Histogram
    rate_limited: Counter
    hits: Counter
    misses: Counter
    fetch_wait: Histogram
    bad_keys: Counter
    invalidations: Counter
    audit_failed: Counter


_metrics: _Metrics | None = None
_lock = threading.Lock()


def _get() -> _Metrics:
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _create()
    return _metrics


def _create() -> _Metrics:
    from prometheus_client import Counter, Histogram

    return _Metrics(
        refreshes=Counter("tokencache_refreshes", "Refresh-job runs by outcome", ["outcome"]),
        lateness=Histogram(
            "tokencache_refresh_lateness_seconds",
            "When a refresh ran minus when it was due",
            buckets=LATENESS_BUCKETS,
        ),
        endpoint=Histogram(
            "tokencache_endpoint_latency_seconds",
            "Token requests to the endpoint",
            ["result"],
            buckets=LATENCY_BUCKETS,
        ),
        rate_limited=Counter(
            "tokencache_endpoint_rate_limited",
            "Rate-limited answers (429, 403 rate limit) of the token endpoint",
        ),
        hits=Counter("tokencache_cache_hits", "Cache reads that found a usable token"),
        misses=Counter("tokencache_cache_misses", "Cache reads that found no usable token"),
        fetch_wait=Histogram(
            "tokencache_fetch_wait_seconds",
            "How long for_scope waited on a miss",
            ["result"],
            buckets=LATENCY_BUCKETS,
        ),
        bad_keys=Counter("tokencache_bad_keys", "Reads that skipped a bad key", ["where"]),
        invalidations=Counter(
            "tokencache_invalidations", "Reports of a token an API rejected, by what they did", ["result"]
        ),
        audit_failed=Counter(
            "tokencache_audit_failed", "Audited writes whose audit entry Redis refused (the write stood)"
        ),
    )


def record_refresh(outcome: Outcome, lateness: float | None = None) -> None:
    """Count one refresh run under its outcome's label, with its lateness if it refreshed a due token."""
    metrics = _get()
    metrics.refreshes.labels(outcome.label).inc()
    if lateness is not None:
        metrics.lateness.observe(max(0.0, lateness))


def observe_endpoint(seconds: float, ok: bool) -> None:
    _get().endpoint.labels("ok" if ok else "error").observe(seconds)


def record_rate_limited() -> None:
    _get().rate_limited.inc()


def record_read(hit: bool) -> None:
    metrics = _get()
    (metrics.hits if hit else metrics.misses).inc()


def observe_fetch_wait(seconds: float, ok: bool) -> None:
    _get().fetch_wait.labels("ok" if ok else "error").observe(seconds)


def record_bad_key(where: Where) -> None:
    """Count one read that skipped a malformed or wrong-type key."""
    _get().bad_keys.labels(where).inc()


def record_invalidation(result: Invalidation) -> None:
    _get().invalidations.labels(result.label).inc()


def record_audit_failure() -> None:
    _get().audit_failed.inc()


def enable_multiprocess() -> str:
    """Switch this process (and the workers it forks later) to prometheus_client's multiprocess mode.

    Returns the folder the processes share: ``PROMETHEUS_MULTIPROC_DIR`` (emptied of an earlier run's
    files, whose counts would otherwise be summed in) or a fresh temporary one, removed at exit.
    """
    from prometheus_client import values

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        for stale in Path(folder).glob("*.db"):
            stale.unlink(missing_ok=True)
    else:
        folder = tempfile.mkdtemp(prefix="tokencache-metrics-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return folder


def start_http_server(port: int, host: str = "0.0.0.0") -> None:
    """Serve this process's metrics (the default registry) for an app that has no endpoint of its own."""
    from prometheus_client import start_http_server as serve

    serve(port, addr=host)
