"""A dead RQ scheduler is replaced by the pool within seconds (worker/scheduler.py).

RQ alone restarts it only in a worker's maintenance pass (10 minutes), and its lock outlives it
by up to 61 s; a scheduler dies that way when Redis goes away under it (a failover).
"""

from __future__ import annotations

import os
import signal
import time

from rq.scheduler import SCHEDULER_KEY_TEMPLATE, RQScheduler

from tokencache import Token, TokenStore
from tokencache.constants import SCHEDULER_TTL
from tokencache.worker.scheduler import scheduler_running

from .conftest import SCOPE, Workers, wait_for

REPLACED_WITHIN = SCHEDULER_TTL + 4.0
"""Seconds from the kill to a new scheduler beating: judged dead after SCHEDULER_TTL, then the next
supervision pass (1 s) starts one, which beats at once (a loaded machine gets the rest)."""


def _holder(store: TokenStore) -> str | None:
    holder = store.redis.get(RQScheduler.get_locking_key(store.refresh_queue.name))
    return None if holder is None else holder.decode()


def test_a_killed_scheduler_is_replaced_and_scheduled_refreshes_run(
    store: TokenStore, workers: Workers
) -> None:
    workers.start(1)
    queue = store.refresh_queue.name
    wait_for(lambda: scheduler_running(store.redis, queue, time.time()), 15, what="a scheduler running")
    holder = _holder(store)
    assert holder is not None
    pid = int(store.redis.hget(SCHEDULER_KEY_TEMPLATE % holder, "pid") or 0)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    token = Token(token="ya29.due-soon", scope=SCOPE, expires=int(time.time()) + store.refresh_before + 2)
    store.store(token)  # due in 2 s: only a scheduler (or repair, seconds late) enqueues it
    wait_for(
        lambda: _holder(store) not in (None, holder) and scheduler_running(store.redis, queue, time.time()),
        REPLACED_WITHIN,
        what="another scheduler holding the lock and beating",
    )
    replaced = time.monotonic() - killed
    refreshed = wait_for(
        lambda: (t := store.find(SCOPE)) and t.token != token.token and t, 15, what="refresh"
    )
    assert refreshed.expires > token.expires
    print(f"\nscheduler replaced {replaced:.1f} s after its SIGKILL")
