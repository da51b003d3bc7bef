"""What every benchmark shares: a private Redis and emulator, alternating rounds, and result rows.

A benchmark module exposes ``run(env: BenchEnv, quick: bool) -> list[Result]``.
It measures its case and its baseline in the same run, alternating rounds
(case, baseline, case, baseline, ...) so that drift of a noisy machine hits
both sides alike, and reports medians.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from redis import ConnectionPool, Redis
from redis.connection import Connection

from tokencache.testing.emulator import Emulator
from tokencache.testing.redisserver import EmbeddedRedis
from tokencache.testing.workers import isolated_env

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
ACCESS_TOKEN = "ya29." + "x" * 180
"""A stand-in access token of a real one's length (Google's are ~180-250 characters)."""


@dataclass
class Result:
    """One row of the results table: a measured value, its baseline from the same run, and the goal."""

    benchmark: str
    metric: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    target: str | None = None
    met: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    goal: float | None = field(default=None, kw_only=True)
    """For the chart: the ratio to the baseline must be at least this."""
    limit: float | None = field(default=None, kw_only=True)
    """For the chart: the value must be at most this (a budget, in ``unit``)."""

    @property
    def ratio(self) -> float | None:
        if self.baseline_value in (None, 0):
            return None
        return self.value / self.baseline_value  # type: ignore[operator]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class BenchEnv:
    """A private redis-server and a running emulator with a service-account key file."""

    redis: EmbeddedRedis
    emulator: Emulator
    dir: Path
    key_file: Path

    @property
    def url(self) -> str:
        return self.redis.url

    def client(self, **options: Any) -> Redis:
        return Redis.from_url(self.url, **options)

    def flush(self) -> None:
        self.client().flushdb()  # server started by this test (this benchmark run's own)

    def child_env(self, *, credentials: bool, **extra: str) -> dict[str, str]:
        """Environment of a worker or app subprocess on this Redis (a key file only if ``credentials``)."""
        env = isolated_env(self.dir / "no-gcloud", TOKENCACHE_REDIS_URL=self.url, **extra)
        if credentials:
            env["GOOGLE_APPLICATION_CREDENTIALS"] = str(self.key_file)
        return env


@contextmanager
def bench_env() -> Iterator[BenchEnv]:
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tokencache-bench-")))
        server = stack.enter_context(EmbeddedRedis())
        emulator = stack.enter_context(Emulator())
        key_file = folder / "default.json"
        emulator.write_service_account(key_file)
        yield BenchEnv(server, emulator, folder, key_file)


def ops_per_second(call: Callable[[], object], seconds: float) -> float:
    """How many times ``call`` runs per second, over about ``seconds``."""
    n, batch = 0, 64
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            call()
        n += batch
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def alternate(cases: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median of each case's measurement over ``rounds`` rounds, cases interleaved in every round."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(rounds):
        order = list(cases.items())
        if i % 2:
            order.reverse()
        for name, measure in order:
            samples[name].append(measure())
    return {name: statistics.median(values) for name, values in samples.items()}


class CountingConnection(Connection):
    """A redis-py connection that counts what it sends: one send is one round trip (a pipeline is one)."""

    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        super().send_packed_command(command, check_health)


def counting_client(env: BenchEnv) -> Redis:
    """A client on the bench Redis whose round trips :func:`round_trips` can count."""
    pool = ConnectionPool(connection_class=CountingConnection, host="127.0.0.1", port=env.redis.port)
    client = Redis(connection_pool=pool)
    client.ping()  # connect (and its handshake) outside any count
    return client


def round_trips(call: Callable[[], object]) -> int:
    """How many requests ``call`` sends through counting clients."""
    before = CountingConnection.sent
    call()
    return CountingConnection.sent - before
