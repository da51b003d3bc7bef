"""Cold-cache stampede: N app processes call for_scope at once; how many fetches, how long waiters wait.

    .venv/bin/python -m bench --only stampede [--quick]
    .venv/bin/python -m bench.stampede [--processes 16] [--rounds 20] [--latency 0.2] [--quick]

Two cases: the apps hold the account's key (one of them fetches under the
fleet lock), and the apps hold none (they ask a ``tokencache worker -n 2``
pool). Each round deletes the token, starts N ``bench.stampede_child``
processes and releases them together through the start barrier
(tokencache.testing.barrier), with the emulator answering after ``--latency``.
The waiters' extra latency is the time from the token's wake-up message (seen
by this process, subscribed to the same channel) to each waiter returning.
The baseline of the endpoint count is what N processes without a shared cache
make: one fetch each.

    --quick  16 processes, 3 cold starts per case (about 30 s)
    full     16 processes, 20 cold starts per case
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from tokencache import TokenStore
from tokencache.core.notify import parse
from tokencache.keys import TokenKey
from tokencache.testing.barrier import StartBarrier
from tokencache.testing.workers import PoolProcess

from .common import SCOPE, BenchEnv, Result, bench_env

NAMESPACE = "bench-stampede"
LATENCY = 0.2
"""Seconds the emulator takes to answer: long enough that every process misses the same fetch."""
READY_WAIT = 60.0
WAKE_UP_WAIT = 30.0


def one_round(store: TokenStore, url: str, env: dict[str, str], n: int) -> tuple[list[dict[str, Any]], float]:
    """Release n processes on a cold cache; their results and when the wake-up was published."""
    ns, queue = store.keys.namespace, store.refresh_queue.name
    command = [sys.executable, "-m", "bench.stampede_child", url, ns, queue]
    procs = [
        subprocess.Popen([*command, str(i), "30"], env=env, stdout=subprocess.PIPE, text=True)
        for i in range(n)
    ]
    try:
        barrier = StartBarrier(store.redis, f"{ns}:stampede", n)
        barrier.wait_ready(READY_WAIT, check=lambda: _none_exited(procs))
        published = _release(store, barrier)
        return [json.loads(p.communicate(timeout=60)[0]) for p in procs], published
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


def _none_exited(procs: list[subprocess.Popen[str]]) -> None:
    for i, proc in enumerate(procs):
        if proc.poll() is not None:
            raise RuntimeError(f"app {i} exited with {proc.returncode} before its go")


def _release(store: TokenStore, barrier: StartBarrier) -> float:
    """Go, then wait for the token's wake-up message; when this process read it."""
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(store.keys.channel(TokenKey.of(None, SCOPE, None)))
        barrier.go()
        deadline = time.monotonic() + WAKE_UP_WAIT
        message = None
        while message is None and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=1.0)  # None also for the (ignored) subscribe confirmation
    finally:
        pubsub.close()
    published = time.time()  # when this idle process read the wake-up: publish time + a wake-up delay
    if message is None:
        raise RuntimeError(f"no wake-up message within {WAKE_UP_WAIT:g} s")
    if parse(message["data"]) is not None:
        raise RuntimeError(f"the fetch failed: {parse(message['data'])}")
    return published


KEY_CASE, POOL_CASE = "apps hold the key", "apps ask the workers"


def run_case(env: BenchEnv, store: TokenStore, case: str, processes: int, rounds: int) -> dict[str, Any]:
    """``rounds`` cold starts of ``processes`` apps: endpoint calls, fetch time and waiters' extra latency."""
    child_env = env.child_env(credentials=case == KEY_CASE)
    extra: list[float] = []
    fetch: list[float] = []
    calls = []
    for _ in range(rounds):
        store.delete(SCOPE)
        env.emulator.reset_stats()
        results, published = one_round(store, env.url, child_env, processes)
        errors = [r["error"] for r in results if "error" in r]
        if errors or len({r["token"] for r in results}) != 1:
            raise RuntimeError(f"{case}: {errors or 'processes got different tokens'}")
        calls.append(env.emulator.stats()["token_requests"])
        fetch.append(published - min(r["started"] for r in results))
        # Waiters only: an app that holds the key and fetched returns right after its own write.
        ends = sorted(r["ended"] for r in results)
        extra.extend(end - published for end in (ends[1:] if case == KEY_CASE else ends))
    extra.sort()
    return {
        "case": case,
        "processes": processes,
        "rounds": rounds,
        "calls": calls,
        "fetch p50 ms": 1000 * statistics.median(fetch),
        "waiter extra p50 ms": 1000 * statistics.median(extra),
        "waiter extra p99 ms": 1000 * extra[min(len(extra) - 1, int(0.99 * len(extra)))],
        "waiter extra max ms": 1000 * extra[-1],
    }


def measure(env: BenchEnv, processes: int, rounds: int, latency: float) -> list[dict[str, Any]]:
    """Both cases on the runner's Redis and emulator (its latency set for the run, then restored)."""
    store = TokenStore(env.client(), namespace=NAMESPACE, queue=NAMESPACE)
    pool = PoolProcess.for_store(store, env.url, 2, env=env.child_env(credentials=True), log_level="WARNING")
    saved, env.emulator.config.latency = env.emulator.config.latency, latency
    try:
        rows = [run_case(env, store, KEY_CASE, processes, rounds)]
        with pool:
            rows.append(run_case(env, store, POOL_CASE, processes, rounds))
    finally:
        env.emulator.config.latency = saved
        store.close()
    return rows


def results(rows: list[dict[str, Any]], latency: float) -> list[Result]:
    out = []
    for row in rows:
        case, n = row["case"], row["processes"]
        where = f"{n} processes, {row['rounds']} cold starts, endpoint latency {latency * 1000:.0f} ms"
        out += [
            Result("stampede", f"endpoint calls per cold start ({case})", max(row["calls"]), "calls",
                   baseline="one per process", baseline_value=n, target="1", met=set(row["calls"]) == {1},
                   note=f"worst round; {where}", extra=row, limit=1),
            Result("stampede", f"waiter extra latency p50 ({case})", row["waiter extra p50 ms"], "ms",
                   note=f"wake-up -> waiter returned; fetch p50 {row['fetch p50 ms']:.0f} ms; {where}"),
            Result("stampede", f"waiter extra latency p99 ({case})", row["waiter extra p99 ms"], "ms",
                   note=f"max {row['waiter extra max ms']:.1f} ms; {where}"),
        ]  # fmt: skip
    return out


def run(env: BenchEnv, quick: bool) -> list[Result]:
    """The runner's entry point: 16 processes, 3 cold starts per case with ``quick``, else 20."""
    processes, rounds = (16, 3) if quick else (16, 20)
    return results(measure(env, processes, rounds, LATENCY), LATENCY)


def main() -> None:
    from .__main__ import print_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--latency", type=float, default=LATENCY)
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    args = parser.parse_args()
    with bench_env() as env:
        rows = measure(env, args.processes, 5 if args.quick else args.rounds, args.latency)
    print_table(results(rows, args.latency))


if __name__ == "__main__":
    main()
