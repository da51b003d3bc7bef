"""Cold-cache stampede: N app processes call for_scope at once; how many fetches, how long waiters wait.

    .venv/bin/python -m bench.stampede [--processes 16] [--rounds 20] [--latency 0.2] [--quick]

Two cases: the apps hold the account's key (one of them fetches under the
fleet lock), and the apps hold none (they ask a `tokencache worker` pool).
The waiters' extra latency is the time from the token's wake-up message (seen
by this process, subscribed to the same channel) to each waiter returning.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rq import Worker

from tokencache import TokenStore
from tokencache.core.notify import parse
from tokencache.keys import TokenKey
from tokencache.testing.emulator import Emulator, EmulatorConfig
from tokencache.testing.redisserver import EmbeddedRedis

SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def app_env(url: str, home: Path, key_file: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "TOKENCACHE_", "GCE_"))}
    env.update(TOKENCACHE_REDIS_URL=url, CLOUDSDK_CONFIG=str(home))
    if key_file is not None:
        env["GOOGLE_APPLICATION_CREDENTIALS"] = str(key_file)
    return env


def one_round(store: TokenStore, url: str, env: dict[str, str], n: int) -> tuple[list[dict[str, Any]], float]:
    """Release n processes on a cold cache; their results and when the wake-up was published."""
    import json

    ns, queue = store.keys.namespace, store.refresh_queue.name
    store.redis.delete(*[f"{ns}:test:ready"], *[f"{ns}:test:go:{i}" for i in range(n)])
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.fleet_child", url, ns, queue, str(i), "30"],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    deadline = time.monotonic() + 60
    while store.redis.llen(f"{ns}:test:ready") < n and time.monotonic() < deadline:
        time.sleep(0.05)
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(store.keys.channel(TokenKey.of(None, SCOPE, None)))
    with store.redis.pipeline() as pipe:
        for i in range(n):
            pipe.rpush(f"{ns}:test:go:{i}", 1)
        pipe.execute()
    message = None
    while message is None and time.monotonic() < deadline + 30:
        message = pubsub.get_message(timeout=1.0)  # None also for the (ignored) subscribe confirmation
    published = time.time()  # when this idle process read the wake-up: publish time + a wake-up delay
    if message is not None and parse(message["data"]) is not None:
        raise RuntimeError(f"the fetch failed: {parse(message['data'])}")
    pubsub.close()
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    if message is None:
        raise RuntimeError("no wake-up message within 30 s")
    return results, published


def run_case(
    fetcher_included: bool,
    name: str,
    store: TokenStore,
    url: str,
    env: dict[str, str],
    emulator: Emulator,
    processes: int,
    rounds: int,
) -> dict[str, Any]:
    extra: list[float] = []
    fetch: list[float] = []
    calls = []
    for _ in range(rounds):
        store.delete(SCOPE)
        emulator.reset_stats()
        results, published = one_round(store, url, env, processes)
        errors = [r["error"] for r in results if "error" in r]
        if errors or len({r["token"] for r in results}) != 1:
            raise RuntimeError(f"{name}: {errors or 'processes got different tokens'}")
        calls.append(emulator.stats()["token_requests"])
        fetch.append(published - min(r["started"] for r in results))
        # Waiters only: the fetcher itself (with the key) returns right after its own write.
        ends = sorted(r["ended"] for r in results)
        extra.extend(end - published for end in (ends[1:] if fetcher_included else ends))
    extra.sort()
    return {
        "case": name,
        "processes": processes,
        "rounds": rounds,
        "endpoint calls per cold start": f"{min(calls)}..{max(calls)}",
        "fetch p50 ms": 1000 * statistics.median(fetch),
        "waiter extra p50 ms": 1000 * statistics.median(extra),
        "waiter extra p99 ms": 1000 * extra[min(len(extra) - 1, int(0.99 * len(extra)))],
        "waiter extra max ms": 1000 * extra[-1],
    }


def start_workers(url: str, key_file: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, TOKENCACHE_REDIS_URL=url, GOOGLE_APPLICATION_CREDENTIALS=str(key_file))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokencache", "worker", "-n", "2", "--log-level", "WARNING"],
        env=env,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    store = TokenStore.from_url(url)
    deadline = time.monotonic() + 30
    while (
        len(Worker.all(queue=store.refresh_queue.queue)) < 2
        or store.refresh_queue.queue.scheduler_pid is None
    ):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the worker pool did not start")
        time.sleep(0.1)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    args = parser.parse_args()
    rounds = 5 if args.quick else args.rounds
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedRedis() as server,
        Emulator(config=EmulatorConfig(latency=args.latency)) as emulator,
    ):
        key_file = Path(tmp) / "key.json"
        emulator.write_service_account(key_file)
        store = TokenStore.from_url(server.url)
        rows = [
            run_case(
                True,
                "apps hold the key",
                store,
                server.url,
                app_env(server.url, Path(tmp), key_file),
                emulator,
                args.processes,
                rounds,
            )
        ]
        workers = start_workers(server.url, key_file)
        try:
            rows.append(
                run_case(
                    False,
                    "apps ask the workers",
                    store,
                    server.url,
                    app_env(server.url, Path(tmp), None),
                    emulator,
                    args.processes,
                    rounds,
                )
            )
        finally:
            workers.terminate()
            workers.wait(30)
    print(
        f"emulator latency {args.latency * 1000:.0f} ms, {args.processes} processes, "
        f"{rounds} cold starts each"
    )
    for row in rows:
        print(
            "  " + ", ".join(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}" for k, v in row.items())
        )


if __name__ == "__main__":
    main()
