"""Prometheus metrics: app-side counters in-process, worker-side through a real pool's endpoint."""

from __future__ import annotations

import time

import pytest
import requests
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tokencache import FetchTimeoutError, Token, TokenStore
from tokencache.core.sources import Sources
from tokencache.testing.emulator import Emulator
from tokencache.testing.redisserver import free_port

from .conftest import SCOPE, Workers, wait_for


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_app_side_hits_misses_and_fetch_waits(store: TokenStore) -> None:
    hits, misses = sample("tokencache_cache_hits_total"), sample("tokencache_cache_misses_total")
    assert store.find(SCOPE) is None
    store.store(Token(token="ya29.metrics", scope=SCOPE, expires=int(time.time()) + 600))
    assert store.find(SCOPE) is not None
    assert sample("tokencache_cache_hits_total") == hits + 1
    assert sample("tokencache_cache_misses_total") == misses + 1
    waits = sample("tokencache_fetch_wait_seconds_count", result="error")
    app = TokenStore(store.redis, namespace=store.keys.namespace, sources=Sources(use_adc=False))
    with pytest.raises(FetchTimeoutError):
        app.for_scope("other-scope", timeout=0.2)
    assert sample("tokencache_fetch_wait_seconds_count", result="error") == waits + 1


def scrape(port: int) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            values[f"{s.name}{{{label}}}"] = s.value
    return values


def test_worker_pool_exposes_refresh_metrics(store: TokenStore, workers: Workers, emulator: Emulator) -> None:
    port = free_port()
    workers.start(1, args=("--metrics-port", str(port)))
    old = Token(token="ya29.before-metrics", scope=SCOPE, expires=int(time.time()) + 12)
    store.store(old)
    wait_for(lambda: (t := store.find(SCOPE)) is not None and t.token != old.token, 12, what="refresh")
    values = wait_for(
        lambda: (v := scrape(port)).get("tokencache_refreshes_total{outcome=refreshed}") and v,
        10,
        what="metrics",
    )
    assert values["tokencache_refreshes_total{outcome=refreshed}"] == 1
    assert values["tokencache_refresh_lateness_seconds_count{}"] == 1
    assert values["tokencache_endpoint_latency_seconds_count{result=ok}"] == 1
    assert values["tokencache_refreshes_scheduled{}"] == 1
    assert values["tokencache_refreshes_overdue{}"] == 0
