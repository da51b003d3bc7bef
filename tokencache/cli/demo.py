"""``tokencache demo``: the whole system on one machine, watched for a while.

It starts a private redis-server (unless ``TOKENCACHE_REDIS_URL`` or
``--redis-url`` names one; then it touches only the ``tokencache-demo``
namespace, and deletes its tokens at the end), the emulator with short-lived
tokens, a ``tokencache worker`` pool, and app processes without credentials
that call ``for_scope()`` for two scopes in a loop, as web workers would. A
live view shows the tokens and their refresh countdowns; the summary compares
the token requests Google (the emulator) saw with the token lifetimes that
elapsed, and with what per-process caching would have cost.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from tokencache import env
from tokencache.app.tokenstore import TokenStore
from tokencache.core.connection import mask_url
from tokencache.core.sources import Sources
from tokencache.errors import ConfigurationError, TokenCacheError
from tokencache.testing.emulator import Emulator, EmulatorConfig
from tokencache.testing.redisserver import EmbeddedRedis
from tokencache.testing.workers import PoolError, PoolProcess
from tokencache.token import mask

__all__ = ["run_demo"]

NAMESPACE = "tokencache-demo"
SCOPES = (
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/devstorage.read_only",
)
APPS = 4
APPS_GRACE = 1.0
"""Seconds the apps keep reading after the workers stop, so every token fetched is seen by an app."""


@dataclass
class _Counts:
    calls: Synchronized[int]
    misses: Synchronized[int]
    seen: Any  # multiprocessing.Queue of the token digests each app saw

    @classmethod
    def new(cls) -> _Counts:
        return cls(multiprocessing.Value("q", 0), multiprocessing.Value("q", 0), multiprocessing.Queue())


def _app(url: str, stop_at: float, counts: _Counts) -> None:
    """One app process without credentials: for_scope() for every 'request'."""
    store = TokenStore.from_url(url, namespace=NAMESPACE, queue=NAMESPACE, sources=Sources(use_adc=False))
    seen: set[str] = set()
    with contextlib.suppress(KeyboardInterrupt), store:
        while time.time() < stop_at:
            _requests(store, min(stop_at, time.time() + 0.5), counts, seen)
    counts.seen.put(sorted(seen))


def _requests(store: TokenStore, until: float, counts: _Counts, seen: set[str]) -> None:
    """Serve 'requests' until ``until``, then add them to the shared counts (for the live view).

    A miss is a request that got no valid token: an error, or (never, by contract) an expired one.
    """
    calls = missed = 0
    while time.time() < until:
        try:
            token = store.for_scope(SCOPES[calls % len(SCOPES)], timeout=5)
            missed += token.expires <= time.time()
            seen.add(hashlib.sha256(token.token.encode()).hexdigest()[:16])
        except TokenCacheError:
            missed += 1
        calls += 1
        time.sleep(0.001)
    with counts.calls.get_lock():
        counts.calls.value += calls
    with counts.misses.get_lock():
        counts.misses.value += missed


@contextlib.contextmanager
def _redis(url: str | None, console: Console) -> Iterator[str]:
    url = url or os.environ.get(env.REDIS_URL)
    if url:
        console.print(f"using the Redis at {mask_url(url)} (namespace {NAMESPACE!r} only)", markup=False)
        yield url
        return
    with EmbeddedRedis() as server:
        console.print(f"started a private redis-server at {server.url}")
        yield server.url


@contextlib.contextmanager
def _workers(url: str, key_file: Path, store: TokenStore) -> Iterator[PoolProcess]:
    """The demo's pool of 2 workers with the key file, ready (see :mod:`tokencache.testing.workers`)."""
    worker_env = dict(os.environ, **{env.GOOGLE_APPLICATION_CREDENTIALS: str(key_file), env.CREDENTIALS: ""})
    pool = PoolProcess.for_store(store, url, 2, env=worker_env, log_level="WARNING")
    try:
        pool.start(timeout=30)
    except PoolError as e:
        hint = "try 'tokencache worker' alone"
        raise ConfigurationError(f"the demo's worker pool did not start ({hint}): {e}") from e
    try:
        yield pool
    finally:
        pool.stop()


@contextlib.contextmanager
def _apps(url: str, stop_at: float, counts: _Counts) -> Iterator[list[multiprocessing.Process]]:
    apps = [multiprocessing.Process(target=_app, args=(url, stop_at, counts)) for _ in range(APPS)]
    for app in apps:
        app.start()
    try:
        yield apps
    except BaseException:
        for app in apps:
            app.terminate()
        raise
    finally:
        for app in apps:
            app.join(max(0.0, stop_at - time.time()) + 10)
            if app.is_alive():
                app.terminate()
                app.join(5)


def _view(store: TokenStore, started: float, emulator: Emulator, counts: _Counts) -> Group:
    now = time.time()
    table = Table("SCOPE", "TOKEN", "EXPIRES IN", "NEXT REFRESH", title=f"t = {now - started:4.0f} s")
    for scope in SCOPES:
        record = store.record(store.key_for_info(scope))
        if record is None:
            table.add_row(scope, "-", "-", "-")
            continue
        due = (record.bookkeeping.refresh_at or 0) - now
        table.add_row(
            scope, mask(record.token.token), f"{record.token.expires - now:.0f} s", f"in {max(0, due):.0f} s"
        )
    issued = emulator.stats()["issued"]
    line = (
        f"app calls {counts.calls.value:,} · misses {counts.misses.value} · token requests {issued} "
        f"(per-process caching: ≥ {issued * APPS})"
    )
    return Group(table, line)


def _refresh_period(lifetime: int, refresh_before: int) -> float:
    """Seconds a token serves before its refresh: the margin, or half-life when the margin exceeds it."""
    return max(lifetime - refresh_before, lifetime / 2)


def run_demo(redis_url: str | None, *, duration: float = 30.0, lifetime: int = 16) -> int:
    """Run the demo for ``duration`` seconds; 0 if every app request got a valid token, and the endpoint
    saw exactly one request per token the apps used."""
    console = Console()
    private = not (redis_url or os.environ.get(env.REDIS_URL))
    with (
        tempfile.TemporaryDirectory(prefix="tokencache-demo-") as tmp,
        _redis(redis_url, console) as url,
        Emulator(config=EmulatorConfig(lifetime=lifetime)) as emulator,
    ):
        key_file = Path(tmp) / "demo-sa.json"
        emulator.write_service_account(key_file)
        with TokenStore.from_url(url, namespace=NAMESPACE, queue=NAMESPACE) as store:
            period = _refresh_period(lifetime, store.refresh_before)
            console.print(
                f"emulator at {emulator.url}: tokens live {lifetime} s, refreshed {store.refresh_before} s "
                f"ahead (every {period:g} s); {APPS} app processes without credentials; 2 workers",
                markup=False,
            )
            try:
                with _workers(url, key_file, store) as pool:
                    return _watch(store, url, emulator, duration, pool, console)
            finally:
                if not private:  # a private Redis is thrown away; a shared one keeps nothing of ours
                    for scope in SCOPES:
                        store.delete(scope)


def _watch(
    store: TokenStore,
    url: str,
    emulator: Emulator,
    duration: float,
    pool: PoolProcess,
    console: Console,
) -> int:
    counts = _Counts.new()
    started = time.time()  # the cache is cold: the apps' first for_scope() asks the workers, once
    # The apps outlast the pool by a moment, so they see every token the workers fetched.
    with _apps(url, started + duration + APPS_GRACE, counts) as apps:
        with Live(console=console, auto_refresh=False) as live:
            while time.time() < started + duration and pool.poll() is None:
                live.update(_view(store, started, emulator, counts), refresh=True)
                time.sleep(1)
        pool_died = pool.poll() is not None
        pool.stop()
    seen = set().union(*(counts.seen.get(timeout=10) for app in apps if app.exitcode == 0))
    crashed = sum(1 for app in apps if app.exitcode != 0) + pool_died
    return _summary(console, emulator, duration, counts, len(seen), crashed)


def _summary(
    console: Console, emulator: Emulator, duration: float, counts: _Counts, tokens_used: int, crashed: int
) -> int:
    requests = emulator.stats()["issued"]
    lines = [
        f"summary after {duration:.0f} s: {APPS} app processes made {counts.calls.value:,} for_scope() calls",
        f"  misses (an error, or no valid token):  {counts.misses.value}",
        f"  token requests at the endpoint:        {requests}",
        f"  token lifetimes the apps used:         {tokens_used} (distinct tokens, {len(SCOPES)} scopes)",
        f"  per-process caching would have made:   >= {tokens_used * APPS} ({APPS} x {tokens_used})",
    ]
    if crashed:
        lines.append(f"  FAILED: {crashed} process(es) died (app processes or the worker pool)")
    console.print()
    for line in lines:
        console.print(line, markup=False)
    ok = counts.misses.value == 0 and requests == tokens_used and not crashed
    return 0 if ok else 1
