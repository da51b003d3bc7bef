"""find() against the round trip it cannot avoid, and the near cache against that round trip.

* **floor**: ``find()`` ops/s in one process against a raw ``HGETALL`` of the
  same key on the same client (same pool, same parser). Target ≥ 0.9.
* **near cache**: ``find()`` on ``TokenStore(near_cache=True)`` against the
  same raw ``HGETALL``. Target ≥ 20 times.
* **invalidation**: another process stores or deletes the token; how long
  until this process's near-cache ``find()`` returns the new state, measured
  from the writer's own "done" timestamp (same clock). Target ≤ 50 ms.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from tokencache import Token, TokenStore
from tokencache.core.connection import connect

from .common import ACCESS_TOKEN, SCOPE, BenchEnv, Result, alternate, ops_per_second

NS = "bench-find"


def _parser_name(store: TokenStore) -> str:
    pool = store.redis.connection_pool
    conn = pool.get_connection()
    try:
        return type(conn._parser).__name__.strip("_")
    finally:
        pool.release(conn)


def throughput(env: BenchEnv, quick: bool) -> list[Result]:
    plain = TokenStore(connect(env.url), namespace=NS)
    near = TokenStore(connect(env.url), namespace=NS, near_cache=True)
    assert near.near_cache is not None and near.near_cache.wait_active(10)
    plain.store(Token(token=ACCESS_TOKEN, scope=SCOPE, expires=int(time.time()) + 3600))
    key = plain.keys.token(plain.key_for_info(SCOPE))
    assert plain.find(SCOPE) is not None and near.find(SCOPE) is not None
    window, rounds = (0.3, 7) if quick else (0.5, 21)
    medians = alternate(
        {
            "raw": lambda: ops_per_second(lambda: plain.redis.hgetall(key), window),
            "find": lambda: ops_per_second(lambda: plain.find(SCOPE), window),
            "near": lambda: ops_per_second(lambda: near.find(SCOPE), window),
        },
        rounds,
    )
    parser = _parser_name(plain)
    near.close()
    plain.close()
    note = f"ops/s, median of {rounds} alternating rounds of {window} s; parser {parser}"
    return [
        Result(
            "find",
            "find() ops/s (floor)",
            medians["find"],
            "ops/s",
            "raw HGETALL",
            medians["raw"],
            "ratio >= 0.9",
            medians["find"] / medians["raw"] >= 0.9,
            note,
            goal=0.9,
        ),
        Result(
            "find",
            "find() near cache ops/s",
            medians["near"],
            "ops/s",
            "raw HGETALL",
            medians["raw"],
            "ratio >= 20",
            medians["near"] / medians["raw"] >= 20,
            note,
            goal=20,
        ),
    ]


def invalidation(env: BenchEnv, quick: bool) -> list[Result]:
    near = TokenStore(connect(env.url), namespace=NS, near_cache=True)
    assert near.near_cache is not None and near.near_cache.wait_active(10)
    n = 50 if quick else 300
    lags: list[float] = []
    with subprocess.Popen(
        [sys.executable, "-m", "bench.near_writer", env.url, NS, SCOPE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as writer:
        assert writer.stdin is not None and writer.stdout is not None
        for i in range(n):
            delete = i % 5 == 4
            writer.stdin.write("delete -\n" if delete else f"store {i}\n")
            writer.stdin.flush()
            done = json.loads(writer.stdout.readline())["done"]
            expected = None if delete else f"ya29.bench-{i}"
            deadline = time.monotonic() + 5
            while getattr(near.find(SCOPE), "token", None) != expected:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"write {i} not seen within 5 s")
            lags.append((time.time() - done) * 1000)
        writer.stdin.close()
    near.close()
    lags.sort()
    p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
    return [
        Result(
            "find",
            "near cache: other process's write seen after (max)",
            lags[-1],
            "ms",
            target="<= 50 ms",
            met=lags[-1] <= 50,
            note=f"{n} stores/deletes; p50 {statistics.median(lags):.2f} ms, p99 {p99:.2f} ms",
            extra={"p50_ms": statistics.median(lags), "p99_ms": p99, "samples": n},
            limit=50,
        )
    ]


def run(env: BenchEnv, quick: bool) -> list[Result]:
    return throughput(env, quick) + invalidation(env, quick)
