"""The pool's signal handling: a stop request must never touch Redis from the signal handler."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from tokencache import TokenStore
from tokencache.worker.pool import RefreshPool


def test_stop_request_does_not_use_redis_and_the_loop_withdraws_the_heartbeat(
    store: TokenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM can land while the main loop holds redis-py's (non-reentrant) pool lock.

    A Redis call from the handler then waits for that lock forever: the pool hung on SIGTERM
    (seen once in ~a dozen loaded suite runs). The handler only records the request now.
    """
    pool = RefreshPool(store, 1)
    pool._heartbeat()
    assert store.redis.hexists(store.keys.pools, pool.name)
    calls: list[Any] = []
    original = store.redis.execute_command

    def no_redis(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        raise AssertionError(f"Redis used in the signal handler: {args}")

    monkeypatch.setattr(store.redis, "execute_command", no_redis)
    with store.redis.connection_pool._lock:  # as if interrupted inside the pool's lock
        pool.request_stop(signal.SIGTERM, None)
    assert calls == []
    monkeypatch.setattr(store.redis, "execute_command", original)
    assert pool.all_workers_have_stopped()  # the main loop's next step
    assert not store.redis.hexists(store.keys.pools, pool.name)
