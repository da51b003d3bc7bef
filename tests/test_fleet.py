"""for_scope across real processes: one fetch per token for the whole fleet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tokencache import FetchTimeoutError, RefreshError, TokenStore
from tokencache.core.sources import Sources
from tokencache.testing.emulator import Emulator

from .conftest import SCOPE, Workers, app_barrier, app_env, run_apps, wait_for

FLEET = 16


def run_fleet(
    store: TokenStore, redis_url: str, env: dict[str, str], n: int, timeout: float = 30, mixed: bool = False
) -> list[Any]:
    """n app processes calling for_scope once (every other one asyncio if ``mixed``), released at once."""
    ns, queue = store.keys.namespace, store.refresh_queue.name
    modes = ["async" if mixed and i % 2 else "sync" for i in range(n)]
    commands = [
        [sys.executable, "-m", "tests.fleet_child", redis_url, ns, queue, str(i), str(timeout), modes[i]]
        for i in range(n)
    ]
    return run_apps(store, commands, env, timeout + 30)


@pytest.fixture
def key_file(tmp_path: Path, emulator: Emulator) -> str:
    path = tmp_path / "app-key.json"
    emulator.write_service_account(path)
    return str(path)


@pytest.mark.exclusive
def test_cold_cache_with_credentials_fetches_once(
    store: TokenStore, redis_url: str, emulator: Emulator, key_file: str, tmp_path: Path
) -> None:
    emulator.config.latency = 0.3
    results = run_fleet(store, redis_url, app_env(redis_url, tmp_path, credentials=key_file), FLEET)
    assert all("token" in r for r in results), results
    assert len({r["token"] for r in results}) == 1
    assert emulator.stats()["token_requests"] == 1


@pytest.mark.exclusive
def test_cold_cache_without_credentials_asks_the_workers_once(
    store: TokenStore, redis_url: str, emulator: Emulator, workers: Workers, tmp_path: Path
) -> None:
    emulator.config.latency = 0.3
    workers.start(2)
    results = run_fleet(store, redis_url, app_env(redis_url, tmp_path, credentials=None), FLEET)
    assert all("token" in r for r in results), results
    assert len({r["token"] for r in results}) == 1
    assert emulator.stats()["token_requests"] == 1
    assert (
        store.find(SCOPE) is not None and store.refresh_queue.scheduled.count == 1
    )  # kept fresh from now on


@pytest.mark.exclusive
def test_a_failed_fetch_reaches_every_waiter_as_an_error(
    store: TokenStore, redis_url: str, emulator: Emulator, key_file: str, tmp_path: Path
) -> None:
    emulator.config.latency = 1.0
    emulator.config.fail_next = 1
    results = run_fleet(store, redis_url, app_env(redis_url, tmp_path, credentials=key_file), 8)
    assert all("RefreshError" in r.get("error", "") for r in results), results
    slowest = max(r["ended"] - r["started"] for r in results)
    assert slowest < 1.0 + 0.9, f"waiters heard of the failure {slowest:.2f}s after the start"


@pytest.mark.exclusive
def test_a_failed_worker_fetch_reaches_app_waiters(
    store: TokenStore, redis_url: str, emulator: Emulator, workers: Workers, tmp_path: Path
) -> None:
    workers.start(1)
    emulator.config.latency = 1.0
    emulator.config.fail_next = 1
    results = run_fleet(store, redis_url, app_env(redis_url, tmp_path, credentials=None), 4)
    assert all("RefreshError" in r.get("error", "") and "500" in r["error"] for r in results), results
    assert max(r["ended"] - r["started"] for r in results) < 1.0 + 1.5


def test_a_sigkilled_fetcher_is_taken_over_after_its_lock_ttl(
    store: TokenStore, redis_url: str, emulator: Emulator, key_file: str, tmp_path: Path
) -> None:
    from tokencache.constants import LOCK_TTL

    emulator.config.latency = 30.0
    env = app_env(redis_url, tmp_path, credentials=key_file)
    ns, queue = store.keys.namespace, store.refresh_queue.name
    victim = subprocess.Popen(
        [sys.executable, "-m", "tests.fleet_child", redis_url, ns, queue, "0", "60"],
        env=env,
        stdout=subprocess.PIPE,
    )
    app_barrier(store, 1).release(30)
    wait_for(lambda: emulator.stats()["token_requests"] == 1, 10, what="fetch in flight")
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=10)
    emulator.config.latency = 0.0
    (result,) = run_fleet(store, redis_url, env, 1)
    took = result["ended"] - result["started"]
    assert "token" in result, result
    assert took <= LOCK_TTL + 1.0, f"took over after {took:.1f}s"


def test_timeout_names_the_key_and_what_to_check(store: TokenStore, tmp_path: Path) -> None:
    app = TokenStore(
        store.redis,
        namespace=store.keys.namespace,
        queue=store.refresh_queue.name,
        sources=Sources(use_adc=False),
    )
    started = time.monotonic()
    with pytest.raises(FetchTimeoutError) as info:
        app.for_scope(SCOPE, timeout=1.0)
    assert 1.0 <= time.monotonic() - started < 2.0
    message = str(info.value)
    assert store.keys.token(app.key_for_info(SCOPE)) in message and "tokencache worker" in message


def test_hit_returns_the_cached_token_without_fetching(store: TokenStore, emulator: Emulator) -> None:
    from tokencache import Token

    token = Token(token="ya29.cached", scope=SCOPE, expires=int(time.time()) + 600)
    store.store(token)
    assert (
        TokenStore(store.redis, namespace=store.keys.namespace, sources=Sources(use_adc=False)).for_scope(
            SCOPE, timeout=0.1
        )
        == token
    )
    assert emulator.stats()["token_requests"] == 0


@pytest.mark.parametrize(("timeout", "error"), [(0, ValueError), (-1, ValueError), ("3", TypeError)])
def test_bad_timeout(store: TokenStore, timeout: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="timeout"):
        store.for_scope(SCOPE, timeout=timeout)  # type: ignore[arg-type]


def test_errors_are_refresh_errors_remembered_briefly(
    store: TokenStore, emulator: Emulator, key_file: str
) -> None:
    from tokencache.constants import ERROR_TTL

    emulator.config.fail_next = 1
    app = TokenStore(
        store.redis, namespace=store.keys.namespace, sources=Sources(files={"default": Path(key_file)})
    )
    with pytest.raises(RefreshError, match="500"):
        app.for_scope(SCOPE, timeout=5)
    with pytest.raises(RefreshError, match="500"):  # a late caller sees the same failure, no new request
        app.for_scope(SCOPE, timeout=5)
    assert emulator.stats()["token_requests"] == 1
    error_key = store.keys.error(app.key_for_info(SCOPE))
    wait_for(lambda: not store.redis.exists(error_key), ERROR_TTL + 1, what="the error forgotten")
    assert app.for_scope(SCOPE, timeout=5).token.startswith("ya29.")


@pytest.mark.exclusive
@pytest.mark.parametrize("credentials", [True, False], ids=["with-credentials", "via-workers"])
def test_sync_and_async_processes_share_one_fetch(
    store: TokenStore,
    redis_url: str,
    emulator: Emulator,
    workers: Workers,
    key_file: str,
    tmp_path: Path,
    credentials: bool,
) -> None:
    emulator.config.latency = 0.3
    if not credentials:
        workers.start(1)
    env = app_env(redis_url, tmp_path, credentials=key_file if credentials else None)
    results = run_fleet(store, redis_url, env, FLEET, mixed=True)
    assert all("token" in r for r in results), results
    assert {r["mode"] for r in results} == {"sync", "async"}
    assert len({r["token"] for r in results}) == 1
    assert emulator.stats()["token_requests"] == 1


def test_a_failure_reaches_late_waiters_too(store: TokenStore, workers: Workers, tmp_path: Path) -> None:
    workers.start(1)
    app = TokenStore(
        store.redis,
        namespace=store.keys.namespace,
        queue=store.refresh_queue.name,
        sources=Sources(use_adc=False),
    )
    unknown = ("nobody@example.com", SCOPE)
    for _ in range(2):  # the second caller arrives after the workers' answer was published
        started = time.monotonic()
        with pytest.raises(RefreshError, match=r"no credentials for account 'nobody@example\.com'"):
            app.for_scope(unknown, timeout=10)
        assert time.monotonic() - started < 3


def test_a_hundred_threads_of_one_process_share_one_fetch(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    emulator.config.latency = 0.3
    workers.start(1)
    app = TokenStore.from_url(
        workers.redis_url,
        namespace=store.keys.namespace,
        queue=store.refresh_queue.name,
        sources=Sources(use_adc=False),
    )
    with app, ThreadPoolExecutor(100) as pool:
        tokens = list(pool.map(lambda _: app.for_scope(SCOPE, timeout=10), range(100)))
    assert len({t.token for t in tokens}) == 1
    assert emulator.stats()["token_requests"] == 1


def test_a_hundred_coroutines_share_one_fetch_and_cancelling_one_does_not_refetch(
    store: TokenStore, emulator: Emulator, key_file: str, redis_url: str
) -> None:
    import asyncio

    from tokencache import aio

    emulator.config.latency = 1.0

    async def main() -> set[str]:
        app = aio.TokenStore.from_url(
            redis_url, namespace=store.keys.namespace, sources=Sources(files={"default": Path(key_file)})
        )
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(app.for_scope(SCOPE, timeout=10), 0.3)  # cancelled mid-fetch
            tokens = await asyncio.gather(*(app.for_scope(SCOPE, timeout=10) for _ in range(100)))
            return {t.token for t in tokens}
        finally:
            await app.aclose()

    assert len(asyncio.run(main())) == 1
    assert emulator.stats()["token_requests"] == 1
