"""Namespaces are isolation boundaries: a namespace's refreshes run only with its own credentials.

Issue 11's findings 1 and 2, end to end on one real Redis with real worker pools and the emulator:
the refresh queue follows the namespace, a worker refuses (and reports) a job of a namespace it
does not serve, a worker runs no function but the refresh, and a namespace name cannot reach into
another namespace's keys.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis import Redis
from rq import Callback, Queue
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import DefaultSerializer, JSONSerializer
from rq.webhook import Webhook
from rq.worker import SimpleWorker

from tokencache import ConfigurationError, FetchTimeoutError, Token, TokenStore, aio, env
from tokencache.cli.health import check
from tokencache.core.queue import REFRESH_FUNC, RefreshJob, RefreshQueue
from tokencache.core.sources import Sources
from tokencache.keys import Keys, TokenKey
from tokencache.testing.emulator import Emulator
from tokencache.testing.redisserver import free_port
from tokencache.testing.workers import PoolProcess, isolated_env
from tokencache.worker.repair import repair

from . import planted_job
from .conftest import SCOPE, Workers, wait_for
from .test_metrics import scrape

NAMESPACES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True).filter(lambda s: s != "rq")


@pytest.fixture
def pools() -> Iterator[list[PoolProcess]]:
    started: list[PoolProcess] = []
    yield started
    for pool in started:
        pool.terminate()
    for pool in started:
        pool.stop(15)


def team_pool(
    pools: list[PoolProcess], redis_url: str, tmp_path: Path, namespace: str, key_file: Path, *args: str
) -> PoolProcess:
    """``tokencache worker`` of one team: its namespace and key, TOKENCACHE_QUEUE left at its default."""
    environ = isolated_env(
        tmp_path / "no-gcloud",
        TOKENCACHE_REDIS_URL=redis_url,
        TOKENCACHE_NAMESPACE=namespace,
        GOOGLE_APPLICATION_CREDENTIALS=str(key_file),
    )
    pool = PoolProcess(redis_url, 1, env=environ, args=args)
    pools.append(pool)
    return pool.start(timeout=30)


def team_key(emulator: Emulator, tmp_path: Path, team: str) -> tuple[Path, str]:
    path = tmp_path / f"{team}.json"
    info = emulator.write_service_account(path, email=f"{team}@tokencache-emulator.iam.gserviceaccount.com")
    return path, info["client_email"]


def app_store(redis: Redis, namespace: str, **options: object) -> TokenStore:
    """An app of ``namespace`` that holds no credentials: a miss is the workers' to fetch."""
    return TokenStore(redis, namespace=namespace, sources=Sources(use_adc=False), **options)  # type: ignore[arg-type]


# -- finding 1: the queue follows the namespace -------------------------------------------------


def test_an_app_of_another_namespace_never_gets_a_token_minted_with_team_as_key(
    real_redis: Redis,
    redis_url: str,
    emulator: Emulator,
    tmp_path: Path,
    pools: list[PoolProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding 1 as reported: team-a's pool (its key, TOKENCACHE_QUEUE unset), an app of team-b
    without credentials. Team-b gets no token until a pool of its own, with its own key, runs."""
    monkeypatch.delenv(env.QUEUE, raising=False)
    a_key, _ = team_key(emulator, tmp_path, "team-a")
    b_key, b_email = team_key(emulator, tmp_path, "team-b")
    team_pool(pools, redis_url, tmp_path, "team-a", a_key)
    app = app_store(real_redis, "team-b")
    with pytest.raises(FetchTimeoutError, match="'team-b'"):
        app.for_scope("team-b-scope", timeout=3)
    assert emulator.stats()["issued"] == 0, "team-a's pool fetched a token for team-b"
    assert app.refresh_queue.name == "team-b"
    team_pool(pools, redis_url, tmp_path, "team-b", b_key)
    token = app.for_scope("team-b-scope", timeout=15)
    info = emulator.validate(token.token)
    assert info is not None and info["email"] == b_email


def test_a_worker_refuses_and_reports_a_job_of_another_namespace(
    real_redis: Redis,
    redis_url: str,
    emulator: Emulator,
    tmp_path: Path,
    pools: list[PoolProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding 1's second half: team-b's stale tokens, one of their jobs put on team-a's queue by hand.
    Team-a's worker fetches and writes nothing (nor batches team-b's other due tokens), fails the job
    into its queue's failed registry naming both namespaces, logs a warning and counts it."""
    monkeypatch.delenv(env.QUEUE, raising=False)
    a_key, _ = team_key(emulator, tmp_path, "team-a")
    port = free_port()
    pool = team_pool(pools, redis_url, tmp_path, "team-a", a_key, "--metrics-port", str(port))
    b = app_store(real_redis, "team-b", refresh_before=40)
    now = int(time.time())
    stale = [
        Token(token=f"ya29.team-b-original-{i}-0000", scope=SCOPE, sub=f"u{i}@b.example", expires=now + 41)
        for i in range(4)
    ]  # each due at once (refresh_at = expires - 40): batchable by any refresh of team-b
    for token in stale:
        b.store(token)
    key = b.key_for(stale[0])
    job = RefreshQueue(real_redis, pool.queue, b.keys).enqueue(key, 40)  # as any writer of RQ's keys could
    wait_for(lambda: ran(real_redis, job.id), 20, what="team-a's worker to take the job")
    assert [real_redis.hget(b.keys.token(b.key_for(t)), "token") for t in stale] == [
        t.token.encode() for t in stale
    ]
    assert emulator.stats()["token_requests"] == 0
    failed = FailedJobRegistry(pool.queue, connection=real_redis, serializer=JSONSerializer)
    assert job.id in failed.get_job_ids()
    result = Job.fetch(job.id, connection=real_redis, serializer=JSONSerializer).latest_result()
    assert result is not None and result.exc_string is not None
    assert "'team-b'" in result.exc_string and "'team-a'" in result.exc_string, result.exc_string
    health = check(TokenStore(real_redis, namespace="team-a"), "redis://test")
    assert health.refused == [f"{job.id} (namespace 'team-b')"]
    assert any("another namespace" in problem and job.id in problem for problem in health.problems)
    log = pool.log.read_text() if pool.log else ""
    warnings = [line for line in log.splitlines() if "WARNING" in line and job.id in line]
    assert warnings and "'team-b'" in warnings[0] and "'team-a'" in warnings[0], log[-2000:]
    assert "ya29." not in log
    refused = wait_for(
        lambda: scrape(port).get("tokencache_refreshes_total{outcome=refused}"), 10, what="the metric"
    )
    assert refused == 1


def test_an_upgraded_pool_takes_over_the_refreshes_left_on_the_old_shared_queue(
    real_redis: Redis,
    redis_url: str,
    emulator: Emulator,
    tmp_path: Path,
    pools: list[PoolProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The changelog's upgrade note: team-c ran on the shared default queue; its upgraded pool serves
    the queue ``team-c``, and its repair moves the refresh still scheduled on the old queue to the new
    one in time (no worker serves the old queue any more)."""
    monkeypatch.delenv(env.QUEUE, raising=False)
    before = app_store(real_redis, "team-c", queue="tokencache")  # what a store wrote before the upgrade
    lifetime = 50  # past the pool's start (up to 30 s on a busy machine) and its first repair pass
    token = Token(token="ya29.before-the-upgrade-0000", scope=SCOPE, expires=int(time.time()) + lifetime)
    before.store(token)
    key_file, email = team_key(emulator, tmp_path, "team-c")
    team_pool(pools, redis_url, tmp_path, "team-c", key_file)
    assert token.expires - time.time() > 15, "the pool took too long to start for this test to mean anything"
    after = app_store(real_redis, "team-c")

    def refreshed() -> Token | None:
        found = after.find(SCOPE)
        return found if found is not None and found.token != token.token else None

    fresh = wait_for(refreshed, token.expires - time.time() - 1, what="the refresh on the new queue")
    info = emulator.validate(fresh.token)
    assert info is not None and info["email"] == email


# -- a worker runs nothing but the refresh ------------------------------------------------------


def ran(redis: Redis, job_id: str) -> bool:
    """Whether a worker is done with the job: not queued or running any more (or its hash is gone)."""
    status = redis.hget(Job.key_for(job_id), "status")
    return status not in (JobStatus.QUEUED.encode(), JobStatus.STARTED.encode())


def test_a_planted_job_naming_another_function_or_a_callback_runs_nothing(
    store: TokenStore, workers: Workers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone who can write ``rq:job:*`` could name any importable function; ``tokencache worker``
    (RefreshJob) refuses all but the refresh, and refresh jobs with callbacks, importing nothing."""
    marker = tmp_path / "marker"
    monkeypatch.setenv(planted_job.MARKER, str(marker))
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    workers.start(1)
    due = Token(token="ya29.planted-original-0000", scope=SCOPE, expires=int(time.time()) + 600)
    store.store(due)
    queue = Queue(store.refresh_queue.name, connection=store.redis, serializer=JSONSerializer)
    planted = [
        queue.enqueue("os.remove", str(victim)),
        queue.enqueue("tests.planted_job.mark"),
        queue.enqueue(
            REFRESH_FUNC,
            10,
            job_id=store.keys.job_id(store.key_for(due)),
            on_success=Callback("tests.planted_job.mark"),
            on_failure=Callback("tests.planted_job.mark"),
        ),
    ]
    for job in planted:
        wait_for(lambda job=job: ran(store.redis, job.id), 20, what=f"planted job {job.func_name}")
    assert victim.exists(), "the planted os.remove ran"
    assert not marker.exists(), "a planted function or callback ran"
    assert not Path(f"{marker}.imported").exists(), "the worker imported a module a planted job named"
    for job in planted:
        job.refresh()
        assert job.get_status() == JobStatus.FAILED, job.func_name
        result = job.latest_result()
        assert result is not None and REFRESH_FUNC in (result.exc_string or ""), result
    assert store.find(SCOPE) == due  # the planted refresh did not run either


@pytest.fixture
def hook() -> Iterator[tuple[str, threading.Event, list[str]]]:
    """An HTTP endpoint on loopback: its URL, an event any request sets, and the requests it got."""
    hit = threading.Event()
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            requests.append(f"{self.command} {self.path}")
            hit.set()
            self.send_response(204)
            self.end_headers()

        do_GET = do_POST = _any

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/planted", hit, requests
    server.shutdown()
    server.server_close()


def test_a_planted_webhook_is_never_sent(
    store: TokenStore, workers: Workers, hook: tuple[str, threading.Event, list[str]]
) -> None:
    """RQ 3 jobs carry webhooks as data and the worker sends them itself: any writer of ``rq:job:*``
    (the app role) could make the credential-holding worker call any URL with chosen headers."""
    url, hit, requests = hook
    workers.start(1)
    queue = Queue(store.refresh_queue.name, connection=store.redis, serializer=JSONSerializer)
    due = Token(token="ya29.webhook-original-0000", scope=SCOPE, expires=int(time.time()) + 600)
    store.store(due)
    planted = [
        queue.enqueue("os.getcwd", webhooks=[Webhook(url + "/refused", "failed", method="POST")]),
        queue.enqueue(  # a genuine refresh job of a cached token, with webhooks added
            REFRESH_FUNC, 10, job_id=store.keys.job_id(store.key_for(due)),
            webhooks=[Webhook(url + "/refresh", status, headers={"Metadata-Flavor": "Google"})
                      for status in ("finished", "failed")],
        ),
        queue.enqueue("os.getcwd"),  # a sentinel: once it ran, the one worker is done with the others
    ]  # fmt: skip
    for job in planted:
        wait_for(lambda job=job: ran(store.redis, job.id), 20, what=f"job {job.id}")
    assert not hit.is_set(), f"the worker sent a planted job's webhook: {requests}"
    refresh = Job.fetch(planted[1].id, connection=store.redis, serializer=JSONSerializer)
    assert refresh.get_status() == JobStatus.FAILED
    result = refresh.latest_result()
    assert result is not None and "webhook" in (result.exc_string or ""), result
    assert store.find(SCOPE) == due  # the planted refresh did not run


def test_a_store_clears_a_planted_webhook(store: TokenStore) -> None:
    """A store() rewrites the token's job and clears the webhooks someone planted on it."""
    due = Token(token="ya29.webhook-cleared-0000", scope=SCOPE, expires=int(time.time()) + 600)
    job = store.store(due)
    assert job is not None
    store.redis.hset(job.key, "webhooks", '[{"url": "http://127.0.0.1:1/x", "job_status": "finished"}]')
    store.store(due)
    assert store.redis.hget(job.key, "webhooks") is None


def test_refusal_leaves_no_expiry_on_the_owners_job(
    real_redis: Redis, store: TokenStore, workers: Workers
) -> None:
    """A refused (failed) job gets EXPIRE failure_ttl on its hash; the owner's repair re-enqueues it under
    the same id, which must PERSIST it, or 24 h later the live job's hash vanishes."""
    workers.start(1)
    owner = TokenStore(real_redis, namespace="team-b", sources=Sources(use_adc=False))
    token = Token(token="ya29.team-b-ttl-0000", scope=SCOPE, expires=int(time.time()) + 5)  # overdue
    owner.store(token)
    key = owner.key_for(token)
    job = RefreshQueue(real_redis, store.refresh_queue.name, owner.keys).enqueue(key, 10)  # planted
    wait_for(lambda: ran(real_redis, job.id), 20, what="the refusal")
    assert real_redis.hget(job.key, "status") == JobStatus.FAILED.encode()
    assert real_redis.ttl(job.key) > 0  # what RQ's failed registry leaves
    assert repair(owner)  # the owner's repair re-enqueues it on its own queue
    assert real_redis.hget(job.key, "origin") == b"team-b"
    assert real_redis.ttl(job.key) == -1, f"live job {job.id} expires in {real_redis.ttl(job.key)} s"
    real_redis.expire(job.key, 100)
    owner.store(token)  # a store() that reschedules it persists it too
    assert real_redis.ttl(job.key) == -1


def test_a_worker_without_the_refresh_job_class_refreshes_nothing_and_shows_in_status(
    store: TokenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rq worker`` without ``--job-class`` loads RQ's plain Job, which runs any function a job hash
    names: the refresh fails loudly (naming the option) instead of running unguarded, and status says why."""
    monkeypatch.setenv(env.NAMESPACE, store.keys.namespace)
    token = Token(token="ya29.plain-worker-0000", scope=SCOPE, expires=int(time.time()) + 5)  # overdue
    store.store(token)
    job = store.refresh_queue.enqueue(store.key_for(token), 10)
    plain = Queue(store.refresh_queue.name, connection=store.redis, serializer=JSONSerializer)
    SimpleWorker([plain], connection=store.redis, serializer=JSONSerializer).work(burst=True)
    failed = Job.fetch(job.id, connection=store.redis, serializer=JSONSerializer)
    assert failed.get_status() == JobStatus.FAILED
    result = failed.latest_result()
    assert result is not None and "--job-class tokencache.scheduling.RefreshJob" in (result.exc_string or "")
    assert store.find(SCOPE) == token
    store.redis.delete(store.keys.token(store.key_for(token)))  # as it expires, still indexed
    health = check(store, "redis://test")
    assert any("--job-class" in problem for problem in health.problems), health.problems


def test_refresh_jobs_are_always_json(store: TokenStore) -> None:
    """``rq worker --job-class RefreshJob`` without ``--serializer`` reads jobs with RQ's pickle default:
    RefreshJob never unpickles what a job hash holds."""
    job = store.store(Token(token="ya29.json-only-0000", scope=SCOPE, expires=int(time.time()) + 600))
    assert job is not None
    store.redis.hset(job.key, "meta", '{"failures": 2}')
    loaded = RefreshJob.fetch(job.id, connection=store.redis, serializer=DefaultSerializer)
    assert loaded.serializer is JSONSerializer and loaded.meta == {"failures": 2}
    assert RefreshJob(connection=store.redis).serializer is JSONSerializer


# -- finding 2: namespace names ----------------------------------------------------------------


@pytest.mark.parametrize(
    "namespace",
    ["nsx:token:acct:sc", "nsx:index", "a:b", "team*", "te?m", "[ab]", "a\\b", "a b", " a", "a\n", "-a",
     ".a", "", "rq", "ü", "a" * 65],
)  # fmt: skip
def test_a_namespace_that_could_reach_into_another_is_refused(
    real_redis: Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="namespace"):
        TokenStore(real_redis, namespace=namespace)
    with pytest.raises(ValueError, match="namespace"):
        aio.TokenStore.from_url("redis://localhost:1/0", namespace=namespace)
    monkeypatch.setenv(env.NAMESPACE, namespace)
    if namespace:  # an empty variable means the default namespace
        with pytest.raises(ConfigurationError, match=env.NAMESPACE):
            env.namespace()


def test_finding_2_the_victim_namespace_keeps_its_tokens(real_redis: Redis) -> None:
    """The issue's pair: ``nsx:token:acct:sc`` is refused, so ``nsx`` storing sub="index" wrecks nothing;
    and a namespace that is allowed cannot overwrite the victim's index either."""
    victim = TokenStore(real_redis, namespace="nsx")
    mine = Token(token="ya29.victim-0000000", scope="sc", account="acct", expires=int(time.time()) + 600)
    victim.store(mine)
    with pytest.raises(ValueError, match="namespace"):
        TokenStore(real_redis, namespace="nsx:token:acct:sc")
    for name in ("nsx-token", "nsx.token", "nsx_index", "NSX"):
        other = TokenStore(real_redis, namespace=name)
        other.store(
            Token(token="ya29.other-00000000", scope="sc", account="acct", sub="index", expires=mine.expires)
        )
        other.store(Token(token="ya29.other-00000000", scope="sc", account="acct", expires=mine.expires))
    assert list(victim.tokens()) == [mine]
    assert real_redis.type(victim.keys.index) == b"zset"


@given(NAMESPACES, NAMESPACES, st.text(min_size=1).filter(str.strip), st.text(min_size=1).filter(str.strip))
def test_distinct_allowed_namespaces_never_share_a_key(a: str, b: str, account: str, sub: str) -> None:
    key = TokenKey.of(account, "s", sub)
    ka, kb = Keys(a), Keys(b)

    def every(keys: Keys) -> set[str]:
        return {keys.index, keys.pools, keys.repair, keys.token(key), keys.lock(key), keys.want(key),
                keys.error(key), keys.invalidated(key), keys.channel(key), keys.backoff(account)}  # fmt: skip

    assert (a == b) == bool(every(ka) & every(kb))
    assert all(not k.startswith("rq:") for k in every(ka))


@pytest.mark.parametrize("namespace", ["tokencache", "team-a", "Team_B.prod", "x", "0" * 64])
def test_allowed_namespaces(real_redis: Redis, namespace: str) -> None:
    assert TokenStore(real_redis, namespace=namespace).keys.namespace == namespace


# -- the queue follows the namespace everywhere ---------------------------------------------------


def test_the_queue_defaults_to_the_namespace(real_redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(env.QUEUE, raising=False)
    monkeypatch.delenv(env.NAMESPACE, raising=False)
    assert env.queue_name() == "tokencache" == TokenStore(real_redis).refresh_queue.name
    assert TokenStore(real_redis, namespace="team-b").refresh_queue.name == "team-b"
    assert aio.TokenStore.from_url("redis://localhost:1/0", namespace="team-b").refresh_queue.name == "team-b"
    monkeypatch.setenv(env.NAMESPACE, "team-c")
    assert env.queue_name() == "team-c" == TokenStore(real_redis).refresh_queue.name
    assert PoolProcess("redis://localhost:1/0", env={env.NAMESPACE: "team-c"}).queue == "team-c"
    from tokencache.worker import settings

    assert importlib.reload(settings).QUEUES == ["team-c"]  # plain rq worker -c
    monkeypatch.setenv(env.QUEUE, "shared")
    assert env.queue_name() == "shared" == TokenStore(real_redis, namespace="team-b").refresh_queue.name
    assert TokenStore(real_redis, namespace="team-b", queue="own").refresh_queue.name == "own"
    monkeypatch.delenv(env.QUEUE)
    importlib.reload(settings)
