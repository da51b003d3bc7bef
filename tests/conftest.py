"""Fixtures: a private redis-server, the token emulator, key files and real worker processes.

The redis-server is started by these fixtures on a free port in a temporary
folder and stopped at the end; it is the only Redis any test talks to. The
redis-server and the emulator are the pytest plugin's (``tokencache_redis``,
``tokencache_emulator``), worker pools are ``tokencache.testing.workers``'s
launcher and app processes start together through its ``StartBarrier``: the
suite runs on the same tools it ships to users.
"""

from __future__ import annotations

import asyncio
import fcntl
import inspect
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from redis import Redis

from tokencache import TokenStore
from tokencache.core.sources import reset_default_sources
from tokencache.errors import ConfigurationError
from tokencache.testing.barrier import StartBarrier
from tokencache.testing.emulator import Emulator
from tokencache.testing.redisserver import EmbeddedRedis, server_executable
from tokencache.testing.workers import PoolProcess, isolated_env

SCOPE = "https://www.googleapis.com/auth/cloud-platform"

EXCLUSIVE_LOCK = Path(tempfile.gettempdir()) / f"tokencache-tests-{os.getuid()}.lock"
"""Held by each test marked ``exclusive`` while it runs, in every suite of this user on this machine.

``./run test`` runs the suite on Redis and on Valkey at the same time. The tests that release a
fleet of app processes at one instant and count the endpoint's requests (one fetch for sixteen
processes) bound what a process may stall: one starved past its 0.5 s lease costs a second fetch,
as designed. Two such fleets at once on two cores are not what those bounds are about, so they take
turns; everything else runs side by side."""

EXCLUSIVE_WAIT = 60.0
"""Seconds a test marked ``exclusive`` waits for :data:`EXCLUSIVE_LOCK`."""


def pytest_configure(config: pytest.Config) -> None:
    """``./run test`` stops its runs with SIGINT, which a run started from a background job inherits as
    ignored (Python then never raises KeyboardInterrupt): restore it, so the run's teardown stops its
    servers and workers."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_header(config: pytest.Config) -> str:
    """Which server the fixtures start (``TOKENCACHE_REDIS_SERVER``): each of ./run test's runs says what
    it tested."""
    try:
        executable = server_executable()
        version = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (ConfigurationError, OSError, subprocess.TimeoutExpired) as e:
        return f"tokencache: no server to test on: {e}"
    return f"tokencache: {executable}: {version}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``TOKENCACHE_TEST_ORDER=half-turn`` (``./run test`` sets it for its second run), the run starts
    at the module where the first half of the tests ends and comes round to the start, each module in
    its own order: two runs side by side are then about half a suite apart, so they never run the same
    module at once (tight latency bounds, such as the near cache's 50 ms, are about one run's load)."""
    if os.environ.get("TOKENCACHE_TEST_ORDER") != "half-turn" or not items:
        return
    modules: dict[Path, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.path, []).append(item)
    order = list(modules)
    counts = itertools.accumulate(len(modules[path]) for path in order)
    split = next(i for i, count in enumerate(counts, 1) if count * 2 >= len(items))  # the first half
    items[:] = [item for path in order[split:] + order[:split] for item in modules[path]]


@pytest.fixture(autouse=True)
def exclusive(request: pytest.FixtureRequest) -> Iterator[None]:
    """Take :data:`EXCLUSIVE_LOCK` around a test marked ``exclusive``. The other run holds it for at most
    four such tests in a row (about 35 s); a wait past :data:`EXCLUSIVE_WAIT` fails with a message
    rather than eating the test's own 120 s timeout."""
    if request.node.get_closest_marker("exclusive") is None:
        yield
        return
    with EXCLUSIVE_LOCK.open("a") as lock:

        def taken() -> bool:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # held by another process: no event to wait on, so polled
            return True

        wait_for(taken, EXCLUSIVE_WAIT, what=f"{EXCLUSIVE_LOCK}, held by another test run")
        yield


def token_text(text: str) -> str:
    """``text`` (a sub, a tag) as a piece of an access token: RFC 6750's b64token has no ``@``."""
    return text.replace("@", "_at_")


def wait_for(
    condition: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def redis_server(tokencache_redis: EmbeddedRedis) -> EmbeddedRedis:
    return tokencache_redis


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def real_redis(redis_server: EmbeddedRedis) -> Iterator[Redis]:
    client = redis_server.client()
    client.flushdb()  # server started by this test
    yield client
    client.close()


@pytest.fixture(params=["real", "fake"])
def any_redis(request: pytest.FixtureRequest) -> Iterator[Redis]:
    """The contract suite runs against a real redis-server and against fakeredis."""
    if request.param == "real":
        yield request.getfixturevalue("real_redis")
    else:
        yield fakeredis.FakeRedis(server=fakeredis.FakeServer())


@pytest.fixture
def store(real_redis: Redis) -> TokenStore:
    return TokenStore(real_redis, namespace="tc-test", refresh_before=10, queue="tc-test")


@pytest.fixture
def emulator(tokencache_emulator: Emulator) -> Emulator:
    return tokencache_emulator


@pytest.fixture
def credentials_env(tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A default account and one named account, as key files issued by the emulator."""
    default = emulator.write_service_account(tmp_path / "default.json")
    keys = tmp_path / "keys"
    keys.mkdir()
    named = emulator.write_service_account(
        keys / "named.json", email="named@tokencache-emulator.iam.gserviceaccount.com"
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "default.json"))
    monkeypatch.setenv("TOKENCACHE_CREDENTIALS", str(keys))
    reset_default_sources()
    yield {"default": default["client_email"], "named": named["client_email"]}
    reset_default_sources()


def app_env(redis_url: str, tmp_path: Path, *, credentials: str | None) -> dict[str, str]:
    """The environment of an app process: this Redis, and a key file only if ``credentials`` names one."""
    env = isolated_env(tmp_path / "no-gcloud", TOKENCACHE_REDIS_URL=redis_url)
    if credentials:
        env["GOOGLE_APPLICATION_CREDENTIALS"] = credentials
    return env


def app_barrier(store: TokenStore, parties: int) -> StartBarrier:
    """The start barrier of app processes (``tests.fleet_child``, ``tests.adapter_child``): ``{ns}:test``."""
    return StartBarrier(store.redis, f"{store.keys.namespace}:test", parties)


def none_exited(procs: list[subprocess.Popen[str]]) -> None:
    """Fail at once when an app process ended before its go (instead of at the barrier's timeout)."""
    for i, proc in enumerate(procs):
        if proc.poll() is not None:
            raise AssertionError(f"app process {i} exited with {proc.returncode} before its go")


def run_apps(store: TokenStore, commands: list[list[str]], env: dict[str, str], timeout: float) -> list[Any]:
    """Start one process per command, release them all at one instant, return the JSON each printed."""
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for cmd in commands]
    app_barrier(store, len(procs)).release(30, check=lambda: none_exited(procs))
    return [json.loads(p.communicate(timeout=timeout)[0]) for p in procs]


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (RQ's work-horses put themselves in their own process group)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class AsyncFacade:
    """Drives an asyncio TokenStore from synchronous tests, so one contract suite covers both APIs."""

    def __init__(self, store: Any, sync_redis: Redis) -> None:
        self._loop = asyncio.new_event_loop()
        self._store = store
        self.redis = sync_redis  # for the tests' own inspection of what was written

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not inspect.ismethod(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            # a coroutine, or a listing (an async iterator that awaits to a list)
            return self._loop.run_until_complete(result) if inspect.isawaitable(result) else result

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name == "redis":
            object.__setattr__(self, name, value)
        else:
            setattr(self._store, name, value)

    def close(self) -> None:
        async def drain() -> None:
            # e.g. a shielded fetch that outlived its caller's timeout
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await self._store.aclose()

        self._loop.run_until_complete(drain())
        self._loop.close()


def async_client_like(client: Redis) -> Any:
    """A redis.asyncio (or fakeredis async) client on the same server as ``client``."""
    import redis.asyncio

    if isinstance(client, fakeredis.FakeRedis):
        return fakeredis.FakeAsyncRedis(server=client.connection_pool.connection_kwargs["server"])
    kw = client.connection_pool.connection_kwargs
    return redis.asyncio.Redis(host=kw["host"], port=kw["port"], db=kw.get("db", 0))


def sync_or_async_store(request: pytest.FixtureRequest, redis: Redis, namespace: str) -> Iterator[TokenStore]:
    """The sync store, or the asyncio one behind a facade (``request.param``): one suite, both APIs."""
    from tokencache import aio
    from tokencache.core.sources import Sources

    settings: dict[str, Any] = dict(
        namespace=namespace, refresh_before=10, queue=namespace, sources=Sources(use_adc=False)
    )
    if request.param == "sync":
        yield TokenStore(redis, **settings)
        return
    facade = AsyncFacade(aio.TokenStore(async_client_like(redis), **settings), redis)
    yield facade  # type: ignore[misc]
    facade.close()


class Workers:
    """``tokencache worker`` pools for one test (see ``tokencache.testing.workers``), stopped at its end."""

    def __init__(self, redis_url: str, store: TokenStore) -> None:
        self.redis_url = redis_url
        self.store = store
        self.pools: list[PoolProcess] = []

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            TOKENCACHE_REDIS_URL=self.redis_url,
            TOKENCACHE_NAMESPACE=self.store.keys.namespace,
            TOKENCACHE_QUEUE=self.store.refresh_queue.name,
            TOKENCACHE_REFRESH_BEFORE=str(self.store.refresh_before),
        )
        return env

    def start(
        self,
        n: int = 1,
        *,
        wait: bool = True,
        args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
        timeout: float = 30,
    ) -> PoolProcess:
        """A pool of ``n`` workers, with ``env`` over :meth:`env`; with ``wait``, ready within ``timeout``:
        none of its processes can miss a SIGTERM."""
        pool = PoolProcess(self.redis_url, n, env={**self.env(), **(env or {})}, args=args)
        self.pools.append(pool)
        return pool.start(wait=wait, timeout=timeout)

    def count(self, *, ready: bool = False) -> int:
        from rq import Worker

        workers = Worker.all(queue=self.store.refresh_queue.queue)
        return sum(1 for w in workers if not ready or w.get_state() in ("idle", "busy"))

    def stop(self) -> None:
        for pool in self.pools:
            pool.terminate()  # all at once, then wait for each
        for pool in self.pools:
            pool.stop(15)
            # Shown by pytest only when the test failed.
            print(f"worker pool {pool.pid}: {pool.log_tail(40)}", file=sys.stderr)


@pytest.fixture
def workers(redis_url: str, store: TokenStore, credentials_env: dict[str, str]) -> Iterator[Workers]:
    pool = Workers(redis_url, store)
    yield pool
    pool.stop()
