"""pytest fixtures for suites that test code using tokencache: a private Redis, the emulator, workers.

pytest loads this plugin by itself once tokencache is installed (the ``pytest11`` entry point
``tokencache``); ``-p no:tokencache`` turns it off. Every fixture is named ``tokencache_*`` so
that none shadows a suite's own. Nothing here touches a Redis the fixtures did not start, and
no test's keys meet another's: each test gets a namespace and queue of its own.

    tokencache_redis       session  EmbeddedRedis: a private redis-server on a free port, removed after
    tokencache_emulator    test     a running Emulator (fresh counters and config), stopped after
    tokencache_key_file    test     Path of a service-account key file the emulator honours
    tokencache_store       test     TokenStore on that Redis in a namespace of its own; it holds no
                                    credentials, so a miss asks the workers; closed after
    tokencache_worker_env  test     environment of a worker subprocess: that Redis and namespace, the
                                    key file as its default account, none of the developer's settings
    tokencache_workers     test     start(n=1, ...) -> a ready PoolProcess serving tokencache_store;
                                    every pool it started is stopped after the test

Only pytest, the standard library and tokencache's leaf modules are imported here at first (the
package loads redis, RQ and google-auth on first use): pytest imports this module in every run, and
redis-server, the emulator and RQ load only when a test asks for them.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tokencache.app.tokenstore import TokenStore
    from tokencache.testing.emulator import Emulator
    from tokencache.testing.redisserver import EmbeddedRedis
    from tokencache.testing.workers import PoolProcess

__all__ = [
    "WorkerPools",
    "tokencache_emulator",
    "tokencache_key_file",
    "tokencache_redis",
    "tokencache_store",
    "tokencache_worker_env",
    "tokencache_workers",
]

REFRESH_BEFORE = 10
"""The stores' refresh margin: the library's default, so tests see what production does."""


@pytest.fixture(scope="session")
def tokencache_redis() -> Iterator[EmbeddedRedis]:
    """A private redis-server on a free port in a temporary folder, for the whole session."""
    from tokencache.testing.redisserver import EmbeddedRedis

    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture
def tokencache_emulator() -> Iterator[Emulator]:
    """A running token-endpoint emulator; its counters and config are this test's alone."""
    from tokencache.testing.emulator import Emulator

    with Emulator() as emulator:
        yield emulator


@pytest.fixture
def tokencache_key_file(tokencache_emulator: Emulator, tmp_path: Path) -> Path:
    """A service-account key file (readable by its owner only) whose token_uri is the emulator."""
    path = tmp_path / "tokencache-service-account.json"
    tokencache_emulator.write_service_account(path)
    return path


@pytest.fixture
def tokencache_store(tokencache_redis: EmbeddedRedis) -> Iterator[TokenStore]:
    """A TokenStore in a namespace (and queue) of its own that holds no credentials."""
    from tokencache.app.tokenstore import TokenStore
    from tokencache.core.sources import Sources

    namespace = f"tokencache-test-{secrets.token_hex(4)}"
    with TokenStore.from_url(
        tokencache_redis.url,
        namespace=namespace,
        queue=namespace,
        refresh_before=REFRESH_BEFORE,
        sources=Sources(use_adc=False),
    ) as store:
        yield store


@pytest.fixture
def tokencache_worker_env(
    tokencache_redis: EmbeddedRedis, tokencache_store: TokenStore, tokencache_key_file: Path, tmp_path: Path
) -> dict[str, str]:
    """Environment of a worker subprocess for ``tokencache_store``, with the key file as ``default``."""
    from tokencache import env
    from tokencache.testing.workers import isolated_env

    return {
        **isolated_env(tmp_path / "no-gcloud"),
        env.REDIS_URL: tokencache_redis.url,
        env.NAMESPACE: tokencache_store.keys.namespace,
        env.QUEUE: tokencache_store.refresh_queue.name,
        env.REFRESH_BEFORE: str(tokencache_store.refresh_before),
        env.GOOGLE_APPLICATION_CREDENTIALS: str(tokencache_key_file),
    }


class WorkerPools:
    """Starts worker pools for one test, each ready before it is returned; stops them all at the end."""

    def __init__(self, redis_url: str, env: dict[str, str]) -> None:
        self.redis_url = redis_url
        self.env = env
        self.pools: list[PoolProcess] = []

    def start(self, n: int = 1, *, wait: bool = True, **options: Any) -> PoolProcess:
        """``tokencache worker -n N`` on the test's Redis and namespace; ``options`` go to PoolProcess."""
        from tokencache.testing.workers import PoolProcess

        pool = PoolProcess(self.redis_url, n, env={**self.env, **options.pop("env", {})}, **options)
        self.pools.append(pool)
        return pool.start(wait=wait)

    __call__ = start

    def stop(self) -> None:
        """Stop every pool gracefully (each is SIGKILLed if it outlasts its grace period)."""
        for pool in self.pools:
            pool.terminate()  # all at once, then wait for each
        for pool in self.pools:
            pool.stop()


@pytest.fixture
def tokencache_workers(
    tokencache_redis: EmbeddedRedis, tokencache_worker_env: dict[str, str]
) -> Iterator[WorkerPools]:
    """A launcher of worker pools serving ``tokencache_store``; all are stopped after the test."""
    pools = WorkerPools(tokencache_redis.url, tokencache_worker_env)
    yield pools
    pools.stop()
