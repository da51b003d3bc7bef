"""A fleet's burst: 1,000 tokens that all expire in the same second, refreshed by ``tokencache worker -n 4``.

    .venv/bin/python -m bench.burst [--tokens 1000] [--rounds 2] [--latency 0.05] [--workers 4]
                                    [--grace 30] [--only batched|single] [--emulator-process]

A fleet that starts all at once creates its tokens in the same second, so an
hour later they all come due in the same second. Each round stores N tokens
(distinct ``sub``s of the default account) that expire at the same second T,
with T chosen so that the refreshes come due about five seconds after a fresh
``tokencache worker -n 4`` is ready, sets the emulator's latency, and records
when each token's wake-up message (``{ns}:fetched:*``) arrives. A token counts
as replaced before expiry if its hash holds a new token and its wake-up came
before T.

Two cases, alternating rounds: ``batched`` (the pool as shipped: a due job also
refreshes the other tokens due within the look-ahead, concurrently) and
``single`` (``TOKENCACHE_REFRESH_BATCH=0``: one fetch per job, the old design).
Throughput is tokens replaced per second from the first due time to the last
replacement, against the ideal of one-fetch-per-job workers: workers / latency.

The emulator runs in this process (the runner's); ``--emulator-process`` runs
``tokencache emulator`` in a process of its own instead. Measured on the
2-core machine: no difference beyond noise (batched, 2 rounds each: 4.5 and
4.6 s in process, 5.0 and 3.8 s in its own), so this process's GIL is not
what limits the burst. Per-process CPU seconds of each round (pool parent,
scheduler, workers, redis-server, this process) are in the JSON's ``extra``.
Set BENCH_BURST_LOG_LEVEL=INFO and BENCH_BURST_LOGS=DIR to keep the pools' logs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis import Redis
from rq import Worker

from tokencache import Token, TokenStore
from tokencache.core.notify import parse
from tokencache.keys import TokenKey
from tokencache.testing.emulator import Emulator
from tokencache.testing.redisserver import free_port
from tokencache.testing.workers import PoolProcess, stop_group

from .common import SCOPE, BenchEnv, Result, bench_env

MARGIN = 10
"""The default refresh margin: the refreshes come due at T - MARGIN."""
LEAD = 5.0
"""Seconds from the pool being ready to the first due refresh (the stores take about one)."""
LOG_LEVEL = os.environ.get("BENCH_BURST_LOG_LEVEL", "WARNING")
"""The pools' log level; their logs go to ``{env.dir}/{namespace}.log`` (or BENCH_BURST_LOGS)."""
CASES = {"batched": None, "single": "0"}
"""Case name -> TOKENCACHE_REFRESH_BATCH for the pool (None: the default)."""


@dataclass
class Round:
    case: str
    tokens: int
    expires: int
    replaced_before: int = 0
    replaced: int = 0
    done: list[float] = field(default_factory=list)
    requests: int = 0
    issued: int = 0
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def first_due(self) -> float:
        return float(self.expires - MARGIN)

    @property
    def span(self) -> float:
        """First due refresh -> last replacement (seconds); inf if some token was never replaced."""
        if self.replaced < self.tokens or not self.done:
            return math.inf
        return max(self.done) - self.first_due

    @property
    def throughput(self) -> float:
        """Tokens replaced per second between the first due time and the last replacement."""
        if not self.done:
            return 0.0
        return len(self.done) / max(1e-3, max(self.done) - self.first_due)

    def summary(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "replaced before T": f"{self.replaced_before}/{self.tokens}",
            "first due -> first done s": round(min(self.done) - self.first_due, 2) if self.done else None,
            "first due -> last done s": round(self.span, 2),
            "throughput /s": round(self.throughput, 1),
            "endpoint requests": self.requests,
            **{f"cpu s {k}": round(v, 1) for k, v in self.cpu.items()},
        }


def _original(i: int, expires: int) -> Token:
    original = f"ya29.burst-original-{i:05d}"
    return Token(token=original, scope=SCOPE, expires=expires, sub=f"user{i}@example.com")


@contextmanager
def worker_pool(url: str, env: dict[str, str], store: TokenStore, n: int, log: Path) -> Iterator[PoolProcess]:
    """``tokencache worker -n N`` for ``store``, ready (tokencache.testing.workers), stopped at the end."""
    pool = PoolProcess.for_store(store, url, n, env=env, log_level=LOG_LEVEL, log=log)
    try:
        yield pool.start(timeout=60)
    finally:
        pool.stop(30)


class WakeUps:
    """Arrival time of the first successful wake-up of each token channel (a thread on PSUBSCRIBE)."""

    def __init__(self, redis: Redis, pattern: str) -> None:
        self.first: dict[bytes, float] = {}
        self._redis = redis  # keep it: a collected client closes its pool, and the pubsub's socket with it
        self._pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(pattern)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if message is not None and parse(message["data"]) is None:  # not a failed attempt's
                self.first.setdefault(message["channel"], time.time())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pubsub.close()
        self._redis.close()


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by one live process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _roles(store: TokenStore, pool: int, redis_pid: int | None) -> dict[str, list[int]]:
    """Process ids by role: the pool's parent (repair), its scheduler, its workers, redis-server."""
    roles = {
        "pool parent (repair)": [pool],
        "scheduler": [pid] if (pid := store.refresh_queue.queue.scheduler_pid) else [],
        "workers": [w.pid for w in Worker.all(queue=store.refresh_queue.queue) if w.pid],
    }
    if redis_pid is not None:
        roles["redis-server"] = [redis_pid]
    return roles


class CpuMeter:
    """CPU seconds used by each role (and by this process: the in-process emulator) over a stretch."""

    def __init__(self, roles: dict[str, list[int]]) -> None:
        self.roles = roles
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        used = {role: sum(_cpu_seconds(pid) for pid in pids) for role, pids in self.roles.items()}
        used["this process (emulator, bench)"] = time.process_time()
        return used

    def used(self) -> dict[str, float]:
        end = self._read()
        return {role: end[role] - self._start[role] for role in end}


def burst_round(
    env: BenchEnv, emulator: _InProcess | _Subprocess, case: str, n: int, workers: int, grace: float
) -> Round:
    """One burst of ``n`` tokens against a fresh pool, watched until all are replaced or T + ``grace``."""
    ns = f"burst-{case}-{time.time_ns() % 10**9}"
    redis = env.client()
    store = TokenStore(redis, namespace=ns, queue=ns, refresh_before=MARGIN)
    extra = {"TOKENCACHE_NAMESPACE": ns, "TOKENCACHE_QUEUE": ns, "TOKENCACHE_REFRESH_BEFORE": str(MARGIN)}
    if CASES[case] is not None:
        extra["TOKENCACHE_REFRESH_BATCH"] = CASES[case]  # type: ignore[assignment]
    child = env.child_env(credentials=True, **extra)
    child["GOOGLE_APPLICATION_CREDENTIALS"] = str(emulator.key_file)
    logs = Path(os.environ.get("BENCH_BURST_LOGS") or env.dir)
    with worker_pool(env.url, child, store, workers, logs / f"{ns}.log") as pool:
        expires = math.ceil(time.time() + LEAD) + MARGIN  # due LEAD (+ <1) s after the pool is ready
        originals = [_original(i, expires) for i in range(n)]
        for token in originals:
            store.store(token)
        if time.time() > expires - MARGIN - 1:
            raise RuntimeError(f"storing {n} tokens took over {LEAD - 1:.0f} s: the burst would start early")
        wakeups = WakeUps(env.client(), f"{ns}:fetched:*")  # after the stores: they publish too
        emulator.reset()
        redis_pid = env.redis.process.pid if env.redis.process else None
        cpu = CpuMeter(_roles(store, pool.pid, redis_pid))
        result = Round(case, n, expires)
        try:
            while time.time() < expires + grace and redis.zcount(store.keys.index, expires + 1, "+inf") < n:
                time.sleep(0.1)
        finally:
            wakeups.close()
        result.cpu = cpu.used()
        _tally(result, store, originals, wakeups.first)
        stats = emulator.get()
        result.requests, result.issued = stats["token_requests"], stats["issued"]
    redis.close()
    return result


def _tally(result: Round, store: TokenStore, originals: list[Token], first: dict[bytes, float]) -> None:
    with store.redis.pipeline(transaction=False) as pipe:
        for token in originals:
            pipe.hget(store.keys.token(store.key_for(token)), "token")
        current = pipe.execute()
    for token, now in zip(originals, current, strict=True):
        if now is None or now.decode() == token.token:
            continue
        result.replaced += 1
        channel = store.keys.channel(TokenKey.of(None, SCOPE, token.sub)).encode()
        done = first.get(channel)
        if done is not None:
            result.done.append(done)
            result.replaced_before += done < result.expires


class _InProcess:
    """The runner's emulator, in this process (its HTTP threads share this process's GIL)."""

    def __init__(self, env: BenchEnv) -> None:
        self.emulator: Emulator = env.emulator
        self.key_file = env.key_file

    def configure(self, latency: float) -> None:
        self.emulator.config.latency = latency

    def reset(self) -> None:
        self.emulator.reset_stats()

    def get(self) -> dict[str, Any]:
        return self.emulator.stats()

    def close(self) -> None:
        self.emulator.config.latency = 0.0


class _Subprocess:
    """``tokencache emulator`` in a process of its own, driven over its /config and /stats endpoints."""

    def __init__(self, env: BenchEnv) -> None:
        keys = env.dir / "burst-emulator"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokencache", "emulator", "--port", self.url.rsplit(":", 1)[1],
             "--keys", str(keys)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "listening" in line:
                break
        self.key_file = keys / "sa-1.json"

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as reply:
            answer: dict[str, Any] = json.loads(reply.read() or b"{}")
            return answer

    def configure(self, latency: float) -> None:
        self._call("/config", {"latency": latency})

    def reset(self) -> None:
        self._call("/stats/reset", {})

    def get(self) -> dict[str, Any]:
        return self._call("/stats")

    def close(self) -> None:
        stop_group(self.proc, 30)


def measure(
    env: BenchEnv,
    *,
    tokens: int,
    rounds: int,
    workers: int,
    latency: float,
    grace: float,
    cases: tuple[str, ...] = tuple(CASES),
    emulator_process: bool = False,
) -> dict[str, list[Round]]:
    """Alternating rounds of each case (batched, single, single, batched, ...)."""
    emulator = _Subprocess(env) if emulator_process else _InProcess(env)
    done: dict[str, list[Round]] = {case: [] for case in cases}
    try:
        emulator.configure(latency)
        for i in range(rounds):
            for case in cases if i % 2 == 0 else tuple(reversed(cases)):
                env.flush()
                r = burst_round(env, emulator, case, tokens, workers, grace)
                print(f"   {r.summary()}", file=sys.stderr, flush=True)
                done[case].append(r)
    finally:
        emulator.close()
    return done


def results(done: dict[str, list[Round]], *, workers: int, latency: float) -> list[Result]:
    """The table's rows: worst round for the must-hold rows, median throughput."""
    new, old = done["batched"], done["single"]
    n = new[0].tokens
    ideal = workers / latency
    rounds = f"worst of {len(new)} round(s); {n} tokens, -n {workers}, latency {latency * 1000:.0f} ms"
    span_old = max(r.span for r in old)
    details = {"batched": [r.summary() for r in new], "single": [r.summary() for r in old]}
    return [
        Result("burst", "replaced before expiry", min(r.replaced_before for r in new), f"of {n}",
               "single", min(r.replaced_before for r in old), f"{n}/{n}",
               all(r.replaced_before == n for r in new), rounds, details),
        Result("burst", "first due -> last done", max(r.span for r in new), "s",
               "single", span_old if math.isfinite(span_old) else None, f"< {MARGIN} s",
               max(r.span for r in new) < MARGIN,
               rounds if math.isfinite(span_old) else f"{rounds}; single: not all replaced by the end",
               limit=MARGIN),
        Result("burst", "throughput vs ideal", statistics.median(r.throughput for r in new), "/s",
               f"ideal {workers}/{latency:g}s", ideal, f"> {n / MARGIN:.0f}/s",
               statistics.median(r.throughput for r in new) > n / MARGIN,
               "median; ideal = one fetch per job per worker", goal=n / MARGIN / ideal),
        Result("burst", "throughput vs ideal, single", statistics.median(r.throughput for r in old), "/s",
               f"ideal {workers}/{latency:g}s", ideal, None, None, "median; one fetch per job (batch off)"),
        Result("burst", "endpoint requests per token", max(r.requests for r in new) / n, "",
               "single", max(r.requests for r in old) / n, "1", all(r.requests == n for r in new), rounds),
    ]  # fmt: skip


def run(env: BenchEnv, quick: bool) -> list[Result]:
    """The runner's entry point: 1,000 tokens either way; quick runs one round per case and stops
    watching the single-fetch baseline 2 s after expiry (it needs about 25 s to finish)."""
    workers, latency = 4, 0.05
    done = measure(
        env, tokens=1000, rounds=1 if quick else 2, workers=workers, latency=latency, grace=2 if quick else 30
    )
    return results(done, workers=workers, latency=latency)


def main() -> None:
    from .__main__ import print_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--grace", type=float, default=30, help="seconds past expiry to wait for stragglers")
    parser.add_argument("--only", choices=list(CASES), help="one case only (prints its rounds, no table)")
    parser.add_argument("--emulator-process", action="store_true", help="emulator in its own process")
    args = parser.parse_args()
    cases = (args.only,) if args.only else tuple(CASES)
    with bench_env() as env:
        done = measure(
            env, tokens=args.tokens, rounds=args.rounds, workers=args.workers, latency=args.latency,
            grace=args.grace, cases=cases, emulator_process=args.emulator_process,
        )  # fmt: skip
    if not args.only:
        print_table(results(done, workers=args.workers, latency=args.latency))


if __name__ == "__main__":
    main()
