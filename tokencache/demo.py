"""``tokencache demo``: the whole system on one machine, watched for a while.

It starts a private redis-server (unless ``TOKENCACHE_REDIS_URL`` or
``--redis-url`` names one; then it touches only the ``tokencache-demo``
namespace), the emulator with short-lived tokens, a ``tokencache worker``
pool, and app processes (without credentials) that call ``for_scope()`` in a loop. Every second it prints
the token's state; at the end, how many token requests Google (the emulator)
saw against how many token lifetimes elapsed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from . import env
from .emulator import Emulator, EmulatorConfig
from .keys import TokenKey
from .redisserver import EmbeddedRedis
from .sources import Sources
from .token import mask
from .tokenstore import TokenStore

__all__ = ["run_demo"]

NAMESPACE = "tokencache-demo"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
APPS = 4


def _app(
    url: str,
    stop_at: float,
    finds: multiprocessing.sharedctypes.Synchronized[int],
    misses: multiprocessing.sharedctypes.Synchronized[int],
) -> None:
    """One app process without credentials: for_scope() for every 'request', as a web worker would."""
    store = TokenStore.from_url(url, namespace=NAMESPACE, queue=NAMESPACE, sources=Sources(use_adc=False))
    done = missed = 0
    while time.time() < stop_at:
        token = store.for_scope(SCOPE, timeout=10)
        done += 1
        if token is None or token.expires <= time.time():
            missed += 1
        time.sleep(0.001)
    with finds.get_lock():
        finds.value += done
    with misses.get_lock():
        misses.value += missed


@contextlib.contextmanager
def _redis(url: str | None) -> Iterator[str]:
    url = url or os.environ.get(env.REDIS_URL)
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        print(f"started a private redis-server at {server.url}")
        yield server.url


@contextlib.contextmanager
def _workers(url: str, key_file: Path, store: TokenStore) -> Iterator[None]:
    worker_env = dict(
        os.environ,
        **{
            env.REDIS_URL: url,
            env.NAMESPACE: NAMESPACE,
            env.QUEUE: NAMESPACE,
            env.GOOGLE_APPLICATION_CREDENTIALS: str(key_file),
            env.CREDENTIALS: "",
        },
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokencache", "worker", "-n", "2", "--log-level", "WARNING"],
        env=worker_env,
        start_new_session=True,
    )
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
    while len(Worker.all(queue=store.refresh_queue.queue)) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the worker pool did not start")
        time.sleep(0.1)


def _status_line(store: TokenStore, started: float, emulator: Emulator, finds: int) -> str:
    now = time.time()
    record = store.record(TokenKey.of(None, SCOPE, None))
    if record is None:
        state = "no token cached"
    else:
        due = (record.bookkeeping.refresh_at or 0) - now
        state = (
            f"token {mask(record.token.token)} expires in {record.token.expires - now:4.0f}s, "
            f"refresh in {max(0.0, due):4.0f}s"
        )
    return f"t={now - started:5.1f}s  {state}  | token requests so far: {emulator.stats()['issued']}"


def run_demo(redis_url: str | None, *, duration: float = 30.0, lifetime: int = 15) -> int:
    """Run the demo for ``duration`` seconds; 0 if no app ever missed a token."""
    with (
        tempfile.TemporaryDirectory(prefix="tokencache-demo-") as tmp,
        _redis(redis_url) as url,
        Emulator(config=EmulatorConfig(lifetime=lifetime)) as emulator,
    ):
        key_file = Path(tmp) / "demo-sa.json"
        emulator.write_service_account(key_file)
        print(
            f"emulator at {emulator.url} issues tokens living {lifetime}s; refresh margin "
            f"{env.DEFAULT_REFRESH_BEFORE}s"
        )
        store = TokenStore.from_url(url, namespace=NAMESPACE, queue=NAMESPACE)
        try:
            with _workers(url, key_file, store):
                return _watch(store, url, emulator, duration, lifetime)
        finally:
            store.delete(SCOPE)


def _watch(store: TokenStore, url: str, emulator: Emulator, duration: float, lifetime: int) -> int:
    # The cache starts cold: the apps' first for_scope() asks the workers, once for the whole fleet.
    started = time.time()
    finds = multiprocessing.Value("q", 0)
    misses = multiprocessing.Value("q", 0)
    apps = [
        multiprocessing.Process(target=_app, args=(url, started + duration, finds, misses))
        for _ in range(APPS)
    ]
    for app in apps:
        app.start()
    while time.time() < started + duration:
        print(_status_line(store, started, emulator, finds.value), flush=True)
        time.sleep(1)
    for app in apps:
        app.join(10)
    return _summary(emulator, duration, lifetime, finds.value, misses.value)


def _summary(emulator: Emulator, duration: float, lifetime: int, finds: int, misses: int) -> int:
    requests = emulator.stats()["issued"]
    lifetimes = duration / max(1, lifetime - env.DEFAULT_REFRESH_BEFORE)
    print()
    print(f"summary: {APPS} app processes made {finds} for_scope() calls, {misses} misses")
    print(
        f"  token requests at the endpoint: {requests} "
        f"(one per refresh interval: ~{lifetimes:.0f} in {duration:.0f}s, plus the first)"
    )
    print(f"  per-process caching would have made at least {APPS * requests}")
    return 0 if misses == 0 else 1
