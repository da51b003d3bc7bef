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
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from . import env
from .emulator import Emulator, EmulatorConfig
from .redisserver import EmbeddedRedis
from .sources import Sources
from .token import mask
from .tokenstore import TokenStore

__all__ = ["run_demo"]

NAMESPACE = "tokencache-demo"
SCOPES = (
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/devstorage.read_only",
)
APPS = 4


@dataclass
class _Counts:
    calls: Synchronized[int]
    misses: Synchronized[int]

    @classmethod
    def new(cls) -> _Counts:
        return cls(multiprocessing.Value("q", 0), multiprocessing.Value("q", 0))


def _app(url: str, stop_at: float, counts: _Counts) -> None:
    """One app process without credentials: for_scope() for every 'request'."""
    store = TokenStore.from_url(url, namespace=NAMESPACE, queue=NAMESPACE, sources=Sources(use_adc=False))
    with contextlib.suppress(KeyboardInterrupt), store:
        while time.time() < stop_at:
            _requests(store, min(stop_at, time.time() + 0.5), counts)


def _requests(store: TokenStore, until: float, counts: _Counts) -> None:
    """Serve 'requests' until ``until``, then add them to the shared counts (for the live view)."""
    calls = missed = 0
    while time.time() < until:
        token = store.for_scope(SCOPES[calls % len(SCOPES)], timeout=10)
        calls += 1
        missed += token.expires <= time.time()
        time.sleep(0.001)
    with counts.calls.get_lock():
        counts.calls.value += calls
    with counts.misses.get_lock():
        counts.misses.value += missed


@contextlib.contextmanager
def _redis(url: str | None, console: Console) -> Iterator[str]:
    url = url or os.environ.get(env.REDIS_URL)
    if url:
        console.print(f"using the Redis at {env.REDIS_URL} (namespace {NAMESPACE!r} only)")
        yield url
        return
    with EmbeddedRedis() as server:
        console.print(f"started a private redis-server at {server.url}")
        yield server.url


@contextlib.contextmanager
def _workers(url: str, key_file: Path, store: TokenStore) -> Iterator[None]:
    worker_env = dict(os.environ)
    worker_env.update({
        env.REDIS_URL: url, env.NAMESPACE: NAMESPACE, env.QUEUE: NAMESPACE,
        env.GOOGLE_APPLICATION_CREDENTIALS: str(key_file), env.CREDENTIALS: "",
    })  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokencache", "worker", "-n", "2", "--log-level", "WARNING"],
        env=worker_env, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_workers(store, proc)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_for_workers(store: TokenStore, proc: subprocess.Popen[bytes]) -> None:
    from rq import Worker

    deadline = time.monotonic() + 30
    while (
        len(Worker.all(queue=store.refresh_queue.queue)) < 2
        or store.refresh_queue.queue.scheduler_pid is None
    ):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the worker pool did not start")
        time.sleep(0.1)


@contextlib.contextmanager
def _apps(url: str, stop_at: float, counts: _Counts) -> Iterator[None]:
    apps = [multiprocessing.Process(target=_app, args=(url, stop_at, counts)) for _ in range(APPS)]
    for app in apps:
        app.start()
    try:
        yield
    finally:
        for app in apps:
            app.join(max(0.0, stop_at - time.time()) + 10)
            if app.is_alive():
                app.terminate()


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


def run_demo(redis_url: str | None, *, duration: float = 30.0, lifetime: int = 15) -> int:
    """Run the demo for ``duration`` seconds; 0 if no app ever missed a token."""
    console = Console()
    with (
        tempfile.TemporaryDirectory(prefix="tokencache-demo-") as tmp,
        _redis(redis_url, console) as url,
        Emulator(config=EmulatorConfig(lifetime=lifetime)) as emulator,
    ):
        key_file = Path(tmp) / "demo-sa.json"
        emulator.write_service_account(key_file)
        console.print(
            f"emulator at {emulator.url}: tokens live {lifetime} s; {APPS} app processes, 2 workers"
        )
        with TokenStore.from_url(url, namespace=NAMESPACE, queue=NAMESPACE) as store:
            try:
                with _workers(url, key_file, store):
                    return _watch(store, url, emulator, duration, lifetime, console)
            finally:
                for scope in SCOPES:
                    store.delete(scope)


def _watch(
    store: TokenStore, url: str, emulator: Emulator, duration: float, lifetime: int, console: Console
) -> int:
    counts = _Counts.new()
    started = (
        time.time()
    )  # the cache is cold: the apps' first for_scope() asks the workers, once for the fleet
    with _apps(url, started + duration, counts), Live(console=console, auto_refresh=False) as live:
        while time.time() < started + duration:
            live.update(_view(store, started, emulator, counts), refresh=True)
            time.sleep(1)
    return _summary(console, emulator, duration, lifetime, counts)


def _summary(console: Console, emulator: Emulator, duration: float, lifetime: int, counts: _Counts) -> int:
    requests = emulator.stats()["issued"]
    period = _refresh_period(lifetime, env.DEFAULT_REFRESH_BEFORE)
    lifetimes = len(SCOPES) * (1 + math.floor(duration / period))
    console.print()
    console.print(
        f"summary after {duration:.0f} s: {APPS} app processes made {counts.calls.value:,} for_scope() calls"
    )
    console.print(f"  misses (no token, or an expired one):  {counts.misses.value}")
    console.print(f"  token requests at the endpoint:        {requests}")
    console.print(f"  token lifetimes elapsed ({len(SCOPES)} tokens, one per {period:.1f} s): {lifetimes}")
    console.print(
        f"  per-process caching would have made:   {lifetimes * APPS} ({APPS} processes x {lifetimes})"
    )
    return 0 if counts.misses.value == 0 else 1
