"""Fault injection for tests: SIGKILL the worker pool that is fetching a token, as a crash would.

:func:`kill_fetching_pool` waits until the emulator has a token request in
flight, finds the pool whose RQ worker is running that token's refresh job, kills
its whole process group, and measures how long until another worker's request
reaches the emulator: the recovery time that docs/design.md bounds by
``RECOVERY_BUDGET``. A reader thread (:class:`Reader`) calls ``find()`` on a fixed
period meanwhile and counts every miss and every expired token it is handed.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from rq import Worker

from tokencache.app.tokenstore import TokenStore
from tokencache.keys import TokenKey
from tokencache.testing.emulator import Emulator
from tokencache.testing.workers import PoolProcess
from tokencache.token import Token

__all__ = ["Reader", "kill_fetching_pool", "wait_until"]

T = TypeVar("T")


def wait_until(condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.005) -> T:
    """Poll ``condition`` every ``interval`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:g} s")
        time.sleep(interval)
    return value


def _fetching_pool(store: TokenStore, key: TokenKey, pools: Sequence[PoolProcess]) -> PoolProcess | None:
    """The live pool one of whose RQ workers is running ``key``'s refresh job now."""
    job_id = store.keys.job_id(key)
    live = {pool.pid: pool for pool in pools if pool.poll() is None}
    for worker in Worker.all(queue=store.refresh_queue.queue):
        if worker.pid is None or worker.get_state() != "busy" or worker.get_current_job_id() != job_id:
            continue
        with contextlib.suppress(ProcessLookupError):
            pool = live.get(os.getpgid(worker.pid))
            if pool is not None:
                return pool
    return None


def kill_fetching_pool(
    store: TokenStore,
    key: TokenKey,
    pools: Sequence[PoolProcess],
    emulator: Emulator,
    *,
    after: int,
    timeout: float,
) -> tuple[float, int]:
    """SIGKILL the pool fetching ``key`` once the emulator has seen more than ``after`` token requests.

    Returns the seconds from the kill to the next token request (another worker's fetch) and the
    request count before that fetch: pass it as ``after`` to kill that fetch in turn.
    """
    wait_until(lambda: emulator.stats()["token_requests"] > after, timeout, "token request in flight")
    victim = wait_until(lambda: _fetching_pool(store, key, pools), 2.0, "pool running the refresh")
    seen = emulator.stats()["token_requests"]
    victim.kill()
    killed_at = time.monotonic()
    wait_until(lambda: emulator.stats()["token_requests"] > seen, timeout, "fetch after the kill")
    return time.monotonic() - killed_at, seen


@dataclass
class Reader:
    """A thread calling ``store.find(info)`` every ``period`` seconds until :meth:`stop`."""

    store: TokenStore
    info: object
    period: float = 0.05
    reads: int = 0
    misses: int = 0
    expired: int = 0
    tokens: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Reader:
        self._thread = threading.Thread(target=self._run, name="tokencache-reader", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._read(self.store.find(self.info))

    def _read(self, token: Token | None) -> None:
        self.reads += 1
        if token is None:
            self.misses += 1
            return
        self.expired += token.expires <= time.time()
        self.tokens.add(token.token)

    def stop(self) -> Reader:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        return self
