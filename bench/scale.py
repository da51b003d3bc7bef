"""A million tokens on one Redis: what each cost is at 1,000, 100,000 and 1,000,000 tokens, in one run.

    .venv/bin/python -m bench --only scale [--quick]
    BENCH_SCALE_SIZES=1000,100000,1000000 .venv/bin/python -m bench --only scale

One redis-server at its default configuration is filled in steps to each size
(``--quick``: 1,000 / 10,000 / 50,000), with tokens of distinct ``sub``s of the
default account whose ``expires`` are spread uniformly over one hour (starting
an hour after the run began, so none comes due while the run measures). At each
size it measures:

* **memory**: ``used_memory`` growth per token (the audit trail, capped, is
  subtracted and reported as a fixed cost of its own);
* **store**: ``store()`` through the public API, one call at a time (2,000
  calls), and the bulk path the fill uses: the same commands as ``store()``,
  500 tokens to a MULTI/EXEC;
* **find()**: p50 and p99 of 2,000 calls on random cached tokens;
* **repair and scheduler in steady state**: a fleet whose lifetimes are spread
  over an hour refreshes ``n / 3600`` tokens a second (280 at a million). The
  run stores the tokens that would be due at one instant of that steady state
  (the repair horizon: refresh times from now to ``EARLY_RUN`` ahead, plus a
  second of lateness, so ``3 n / 3600``), waits until the scheduler would move
  one second's worth (``n / 3600``), and times one repair pass and one RQ
  scheduler pass (``enqueue_scheduled_jobs``), each run once a second by the
  pool: CPU of this process plus Redis's (``INFO cpu``) per pass = CPU per
  second;
* **tokencache status / ls**: wall time and peak RSS of the command as a
  subprocess (``ls`` to a pipe, its tab-separated form).

How many workers keep up is computed from a measured per-refresh cost: one
``tokencache worker -n 1`` works off 1,000 due refreshes against the emulator
(no latency) in burst mode; refreshes per second per worker give the count
for ``n / 3600`` a second.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

from tokencache import Token, TokenStore
from tokencache.testing.workers import PoolProcess
from tokencache.worker.repair import repair

from .common import ACCESS_TOKEN, SCOPE, BenchEnv, Result
from .memory import BATCH, settled_used_memory, usage, write_tokens

BENCH = "scale"
NAMESPACE = QUEUE = "tokencache"
SAMPLE = 2000
LIFETIMES = 3600
"""Seconds over which the tokens' ``expires`` are spread (a fleet fetches tokens all through the hour)."""
DUE_WINDOW = 3.0
"""Seconds of refresh times repair's pass reads at steady state: EARLY_RUN (2 s) ahead, ~1 s late."""
BURST = 1000


def sizes(quick: bool) -> list[int]:
    given = os.environ.get("BENCH_SCALE_SIZES")
    if given:
        return [int(part) for part in given.split(",")]
    return [1_000, 10_000, 50_000] if quick else [1_000, 100_000, 1_000_000]


@dataclass
class Filler:
    """Fills the store to each size in turn: the bulk path (500 ``store()`` command sets a MULTI/EXEC)."""

    store: TokenStore
    base: int
    rng: random.Random = field(default_factory=lambda: random.Random(12))
    count: int = 0
    seconds: float = 0.0

    def token(self, i: int, *, expires: int | None = None) -> Token:
        when = expires if expires is not None else self.base + self.rng.randrange(LIFETIMES)
        return Token(token=ACCESS_TOKEN, scope=SCOPE, expires=when, sub=f"user{i}@example.com")

    def bulk(self, upto: int) -> float:
        """Fill to ``upto`` tokens in MULTI/EXECs of :data:`BATCH`; tokens per second."""
        start, n = time.perf_counter(), upto - self.count
        while self.count < upto:  # a batch at a time: a million tokens are never all in memory
            end = min(upto, self.count + BATCH)
            write_tokens(self.store, [self.token(i) for i in range(self.count, end)])
            self.count = end
        return n / (time.perf_counter() - start)

    def one_by_one(self, n: int) -> float:
        """``store()`` of ``n`` more tokens, one call each; calls per second."""
        start = time.perf_counter()
        for i in range(self.count, self.count + n):
            self.store.store(self.token(i))
        self.count += n
        return n / (time.perf_counter() - start)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def find_latency(store: TokenStore, n: int, rng: random.Random) -> tuple[float, float]:
    """p50 and p99 of ``find()`` in milliseconds, over :data:`SAMPLE` random cached tokens."""
    took = []
    for _ in range(SAMPLE):
        sub = f"user{rng.randrange(n)}@example.com"
        start = time.perf_counter()
        found = store.find(SCOPE, sub)
        took.append((time.perf_counter() - start) * 1000)
        if found is None:
            raise RuntimeError(f"find() missed {sub}")
    return percentile(took, 0.5), percentile(took, 0.99)


def redis_cpu(client: Redis) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def cpu_of(client: Redis, call: Callable[[], object]) -> tuple[float, float]:
    """(this process's, Redis's) CPU seconds of one ``call``."""
    mine, server = time.process_time(), redis_cpu(client)
    call()
    return time.process_time() - mine, redis_cpu(client) - server


@dataclass
class SteadyState:
    """CPU per pass of repair and of the RQ scheduler with a steady state's due tokens in place."""

    due: int
    moved: int
    repair_ms: tuple[float, float]
    scheduler_ms: tuple[float, float]


def steady_state(store: TokenStore, filler: Filler, n: int) -> SteadyState:
    """Store the tokens a steady state of ``n`` would have due, time the passes, then remove them."""
    rate = n / LIFETIMES
    due, moved = max(1, round(rate * DUE_WINDOW)), max(1, round(rate))
    now = int(time.time())
    first = 10_000_000 + n  # subs apart from the filled ones
    # ``moved`` come due in 2 s (the scheduler's second), the rest over the 2 s after: repair's horizon.
    extra = [filler.token(first + i, expires=now + store.refresh_before + 2 + (i >= moved) * (1 + i % 2))
             for i in range(due)]  # fmt: skip
    write_tokens(store, extra)
    time.sleep(max(0.0, now + 2.2 - time.time()))  # the first ``moved`` are due, none overdue
    repair_cpu = [cpu_of(store.redis, lambda: repair(store)) for _ in range(3)]
    scheduler = RQScheduler([store.refresh_queue.queue], connection=store.redis, serializer=JSONSerializer)
    scheduler.prepare_registries([store.refresh_queue.name])  # what holding the queue's lock gives
    scheduler_cpu = cpu_of(store.redis, scheduler.enqueue_scheduled_jobs)
    moved_now = store.refresh_queue.queue.count
    for t in extra:
        store.delete(t.scope, t.sub)
    store.redis.delete(store.refresh_queue.queue.key)
    med = (statistics.median(c for c, _ in repair_cpu), statistics.median(s for _, s in repair_cpu))
    return SteadyState(due, moved_now, (med[0] * 1000, med[1] * 1000),
                       (scheduler_cpu[0] * 1000, scheduler_cpu[1] * 1000))  # fmt: skip


def command_cost(env: BenchEnv, *args: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``tokencache ARGS`` on the bench Redis."""
    command = [sys.executable, "-m", "tokencache", *args, "--redis-url", env.url]
    child_env = env.child_env(credentials=False, TOKENCACHE_NAMESPACE=NAMESPACE)
    start = time.perf_counter()
    process = subprocess.Popen(command, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    while process.stdout.read(1 << 16):
        pass
    _, _, usage = os.wait4(process.pid, 0)
    process.returncode = 0  # reaped by wait4
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def refreshes_per_worker(env: BenchEnv, store: TokenStore) -> tuple[float, float]:
    """(refreshes per second, CPU ms per refresh of the pool and Redis) of one worker on due tokens."""
    store.redis.flushdb()  # server started by this test (the bench's own)
    now = int(time.time())
    expires = now + store.refresh_before + 1
    tokens = [
        Token(token=ACCESS_TOKEN, scope=SCOPE, expires=expires, sub=f"b{i}@x.com") for i in range(BURST)
    ]
    write_tokens(store, tokens)
    time.sleep(max(0.0, now + 1.5 - time.time()))  # due: the worker fetches, not just reschedules
    for t in tokens:
        store.refresh_queue.enqueue(store.key_for(t), store.refresh_before)
    pool = PoolProcess.for_store(store, env.url, 1, env=env.child_env(credentials=True), log_level="WARNING")
    before, server = os.times(), redis_cpu(store.redis)
    start = time.perf_counter()
    pool.run_burst(timeout=600)
    wall = time.perf_counter() - start
    after = os.times()
    cpu = after.children_user + after.children_system - before.children_user - before.children_system
    replaced = sum(1 for t in tokens if (found := store.find(t.scope, t.sub)) and found.token != t.token)
    cpu += redis_cpu(store.redis) - server
    store.redis.flushdb()  # server started by this test (the bench's own)
    return replaced / wall, cpu / max(1, replaced) * 1000


def at_size(env: BenchEnv, store: TokenStore, filler: Filler, n: int) -> dict[str, Any]:
    """Every figure at ``n`` tokens (the store is filled to ``n`` first)."""
    client = store.redis
    start_count = filler.count
    one = min(SAMPLE, n - filler.count)
    single = filler.one_by_one(one) if one > 0 else float("nan")
    bulk = filler.bulk(n) if filler.count < n else float("nan")
    print(f"   filled {n:,} ({filler.count - start_count:,} this step)", file=sys.stderr, flush=True)
    audit = usage(client, store.keys.audit)
    used = settled_used_memory(client)
    figures: dict[str, Any] = {"used_memory": used, "audit": audit, "store_per_s": single, "bulk_per_s": bulk}
    figures["find_ms"] = find_latency(store, n, random.Random(n))
    figures["steady"] = steady_state(store, filler, n)
    figures["status"] = command_cost(env, "status")
    figures["ls"] = command_cost(env, "ls")
    return figures


def rows(n: int, f: dict[str, Any], baseline_memory: int) -> list[Result]:
    steady: SteadyState = f["steady"]
    per_token = (f["used_memory"] - baseline_memory - f["audit"]) / n
    label = f"{n:,} tokens"
    return [
        Result(BENCH, f"memory per token, {label}", per_token, "B", target="≤ 1.5 KB", met=per_token <= 1536,
               note=f"used_memory growth less the audit stream ({f['audit'] / 1e6:.2f} MB, capped)",
               limit=1536),
        Result(BENCH, f"store() calls/s, {label}", f["store_per_s"], "ops/s",
               note="public API, one at a time"),
        Result(BENCH, f"bulk store ops/s, {label}", f["bulk_per_s"], "ops/s",
               note="store()'s commands, 500 tokens a MULTI/EXEC"),
        Result(BENCH, f"find() p50, {label}", f["find_ms"][0], "ms"),
        Result(BENCH, f"find() p99, {label}", f["find_ms"][1], "ms"),
        Result(BENCH, f"repair CPU per second, {label}", sum(steady.repair_ms), "ms/s",
               note=f"{steady.due} due entries; client {steady.repair_ms[0]:.1f} + Redis "
               f"{steady.repair_ms[1]:.1f} ms"),
        Result(BENCH, f"scheduler CPU per second, {label}", sum(steady.scheduler_ms), "ms/s",
               note=f"{steady.moved} jobs moved; client {steady.scheduler_ms[0]:.1f} + Redis "
               f"{steady.scheduler_ms[1]:.1f} ms"),
        Result(BENCH, f"tokencache status, {label}", f["status"][0], "s",
               note=f"peak RSS {f['status'][1]:.0f} MB",
               extra={"rss_mb": f["status"][1]}),
        Result(BENCH, f"tokencache ls, {label}", f["ls"][0], "s", note=f"peak RSS {f['ls'][1]:.0f} MB",
               extra={"rss_mb": f["ls"][1]}),
    ]  # fmt: skip


def run(env: BenchEnv, quick: bool) -> list[Result]:
    store = TokenStore(env.client(), namespace=NAMESPACE, refresh_before=10, queue=QUEUE)
    rate, cpu_ms = refreshes_per_worker(env, store)
    baseline = settled_used_memory(store.redis)
    filler = Filler(store, base=int(time.time()) + LIFETIMES)
    results: list[Result] = []
    for n in sizes(quick):
        started = time.monotonic()
        figures = at_size(env, store, filler, n)
        measured = rows(n, figures, baseline)
        needed = n / LIFETIMES / rate
        measured.append(
            Result(BENCH, f"workers to keep up, {n:,} tokens", needed, "workers",
                   note=f"{n / LIFETIMES:.1f} refreshes/s ÷ {rate:.0f} per worker (emulator, no latency; "
                   f"{cpu_ms:.2f} ms CPU per refresh)", extra={"per_worker": rate, "cpu_ms": cpu_ms})
        )  # fmt: skip
        results += measured
        for row in measured:  # as measured: a run of many minutes loses nothing to a late failure
            print(f"   {row.metric}: {row.value:,.4g} {row.unit} ({row.note})", file=sys.stderr, flush=True)
        print(f"   {n:,}: measured in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    # A million keys: a blocking FLUSHDB outlasts the socket timeout.
    store.redis.flushdb(asynchronous=True)  # server started by this test
    return results
