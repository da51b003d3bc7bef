"""The worker pool's metrics endpoint: every worker's counters, plus gauges read from Redis at scrape.

The gauges (what is scheduled, what repair would re-enqueue now) describe the
whole fleet, so every pool exports them: aggregate them with ``max``, not ``sum``.
They live here, not in :mod:`tokencache.metrics`, because reading them needs the
worker side (repair's verdicts); app processes record into :mod:`tokencache.metrics`
without ever importing this.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client import start_http_server as serve
from prometheus_client.core import GaugeMetricFamily

from tokencache.app.tokenstore import TokenStore
from tokencache.constants import METRICS_HOST
from tokencache.errors import TokenCacheError
from tokencache.worker.repair import overdue

__all__ = ["serve_worker_metrics"]


class _QueueCollector:
    """Gauges read from Redis at scrape time: what is scheduled, what is overdue."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("tokencache_redis_up", "Whether the last scrape could read Redis")
        try:
            counts = (self.store.refresh_queue.scheduled.count, len(overdue(self.store)))
        except (TokenCacheError, OSError, ConnectionError):
            up.add_metric([], 0)  # the workers' own counters are still served
            return iter([up])
        up.add_metric([], 1)
        scheduled = GaugeMetricFamily("tokencache_refreshes_scheduled", "Refresh jobs in RQ's schedule")
        scheduled.add_metric([], counts[0])
        late = GaugeMetricFamily("tokencache_refreshes_overdue", "Refreshes repair would re-enqueue now")
        late.add_metric([], counts[1])
        return iter([up, scheduled, late])


def serve_worker_metrics(store: TokenStore, port: int, host: str = METRICS_HOST) -> None:
    """Serve the pool's metrics (all its workers' counters, plus the queue gauges) on ``host:port``."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(_QueueCollector(store))
    serve(port, addr=host, registry=registry)
