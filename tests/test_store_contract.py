"""The TokenStore contract, run against a real redis-server and against fakeredis."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry

import tokencache
from tokencache import RedisUnavailableError, Token, TokenStore, aio
from tokencache.app import core as store_core
from tokencache.app.core import TokenRecord
from tokencache.core.queue import DESCRIPTION, SERVER_VERSION, RefreshJob, job_target
from tokencache.core.sources import Sources
from tokencache.keys import parse_job_id
from tokencache.testing.emulator import Emulator

from .conftest import async_client_like, sync_or_async_store, wait_for

SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def token(expires_in: int = 3600, **kw: object) -> Token:
    fields: dict[str, object] = dict(
        token="ya29.a0-secret-value-f3k", scope=SCOPE, expires=int(time.time()) + expires_in
    )
    fields.update(kw)
    return Token(**fields)  # type: ignore[arg-type]


@pytest.fixture(params=["sync", "async"])
def ts(request: pytest.FixtureRequest, any_redis: Redis) -> Iterator[TokenStore]:
    """The sync store, or the asyncio one driven through a facade: one suite for both APIs."""
    yield from sync_or_async_store(request, any_redis, "contract")


def scheduled(ts: TokenStore) -> list[tuple[str, float]]:
    registry = ScheduledJobRegistry(queue=ts.refresh_queue.queue)
    return [(m.decode(), s) for m, s in ts.redis.zrange(registry.key, 0, -1, withscores=True)]


def test_store_then_find(ts: TokenStore) -> None:
    t = token()
    ts.store(t)
    assert ts.find(SCOPE) == t
    assert ts.find(("default", SCOPE)) == t
    assert ts.find(SCOPE, "someone@example.com") is None


def test_scope_spellings_share_a_key(ts: TokenStore) -> None:
    t = token(scope="b a")
    ts.store(t)
    assert ts.find("a,b") == t
    assert ts.find("a  b").scope == "b a"  # the stored spelling is kept


def test_info_and_sub_override_the_key(ts: TokenStore) -> None:
    t = token(sub="token-sub@example.com", account="acct@example.com")
    ts.store(t, ("other@example.com", "x"), "u@example.com")
    assert ts.find(("other@example.com", "x"), "u@example.com") == t
    assert ts.find(("acct@example.com", SCOPE), "token-sub@example.com") is None
    ts.store(t, "y")  # sub left out falls back to token.sub
    assert ts.find("y", "token-sub@example.com") == t


def test_expired_token_is_never_returned(ts: TokenStore) -> None:
    ts.store(token(expires_in=3600))
    later = TokenStore(
        ts.redis, namespace="contract", refresh_before=10, queue="contract", clock=lambda: time.time() + 3600
    )
    assert later.find(SCOPE) is None
    assert list(later.tokens()) == []


def test_store_writes_ttl_and_index(ts: TokenStore) -> None:
    t = token(expires_in=100)
    ts.store(t)
    key = ts.keys.token(ts.key_for(t))
    assert 95 <= ts.redis.ttl(key) <= 100
    assert ts.redis.zscore(ts.keys.index, key) == t.expires
    fields = {k.decode(): v.decode() for k, v in ts.redis.hgetall(key).items()}
    assert {f: fields[f] for f in ("token", "type", "scope", "sub", "account", "expires")} == {
        "token": t.token,
        "type": "Bearer",
        "scope": SCOPE,
        "sub": "",
        "account": "",
        "expires": str(t.expires),
    }
    assert fields["refresh_at"] == str(t.expires - 10)


def test_store_schedules_one_job_at_expires_minus_margin(ts: TokenStore) -> None:
    t = token(expires_in=600)
    job = ts.store(t)
    assert isinstance(job, Job)
    assert scheduled(ts) == [(job.id, t.expires - 10)]
    assert parse_job_id(job.id) == ("contract", ts.key_for(t))  # the id names the token: no key in args
    assert job.args == [10] and job.kwargs == {}
    stored = ts.redis.hgetall(Job.key_for(job.id))
    assert t.token.encode() not in b"".join(stored.values())
    assert Job.fetch(job.id, ts.redis, serializer=job.serializer).get_status() == JobStatus.SCHEDULED


def test_thousand_stores_leave_one_job(ts: TokenStore) -> None:
    for i in range(1000):
        ts.store(token(expires_in=600 + i))
    jobs = scheduled(ts)
    assert len(jobs) == 1
    assert jobs[0][1] == int(time.time()) + 600 + 999 - 10 or abs(jobs[0][1] - (time.time() + 1589)) <= 2


def test_expired_or_inside_margin_is_refreshed_at_once(ts: TokenStore) -> None:
    now = time.time()
    ts.store(token(expires_in=-5))
    ts.store(token(expires_in=5), "inside-margin")
    assert len(scheduled(ts)) == 2
    for _, at in scheduled(ts):
        assert now - 1 <= at <= now + 1


def test_delete_cancels_refresh(ts: TokenStore) -> None:
    t = token()
    job = ts.store(t)
    assert ts.delete(SCOPE) is True
    assert ts.find(SCOPE) is None
    assert scheduled(ts) == []
    assert not ts.redis.exists(Job.key_for(job.id))
    assert ts.redis.zcard(ts.keys.index) == 0
    assert ts.delete(SCOPE) is False


def test_tokens_lists_everything_valid(ts: TokenStore) -> None:
    stored = {token(scope=f"s{i}") for i in range(1203)}
    for t in stored:
        ts.store(t)
    assert set(ts.tokens()) == stored


def test_malformed_hash_is_reported_not_returned(ts: TokenStore, caplog: pytest.LogCaptureFixture) -> None:
    t = token()
    ts.store(t)
    key = ts.keys.token(ts.key_for(t))
    ts.redis.hset(key, "expires", "soon")
    assert ts.find(SCOPE) is None
    assert "malformed" in caplog.text and key in caplog.text and t.token not in caplog.text
    ts.redis.hdel(key, "token")
    assert ts.find(SCOPE) is None


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda ts: ts.store("ya29.x"), TypeError, "token"),
        (lambda ts: ts.find(42), TypeError, "info"),
        (lambda ts: ts.find(("a", "")), ValueError, "scope"),
        (lambda ts: ts.find("s", sub=""), ValueError, "sub"),
        (lambda ts: ts.delete(("", "s")), ValueError, "account"),
    ],
)
def test_bad_arguments_name_the_argument(ts: TokenStore, call, error, name) -> None:  # type: ignore[no-untyped-def]
    t = token()
    ts.store(t)
    with pytest.raises(error, match=name):
        call(ts)
    assert ts.find(SCOPE) == t  # nothing stored was touched


def test_constructor_validation(any_redis: Redis) -> None:
    with pytest.raises(TypeError, match="redis"):
        TokenStore("redis://x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="refresh_before"):
        TokenStore(any_redis, refresh_before=-1)
    with pytest.raises(ValueError, match="namespace"):
        TokenStore(any_redis, namespace="")


def test_unreachable_redis_names_the_url_without_password() -> None:
    from tokencache.testing.redisserver import free_port

    ts = TokenStore.from_url(f"redis://user:hunter2@127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    with pytest.raises(RedisUnavailableError) as info:
        ts.find(SCOPE)
    assert "127.0.0.1" in str(info.value) and "hunter2" not in str(info.value)
    assert isinstance(info.value, tokencache.TokenCacheError)


def test_scheduled_time_is_aware_utc(ts: TokenStore) -> None:
    t = token(expires_in=7200)
    ts.store(t)
    ((_, at),) = scheduled(ts)
    assert datetime.fromtimestamp(at, UTC) == datetime.fromtimestamp(t.expires - 10, UTC)


def test_module_level_defaults(monkeypatch: pytest.MonkeyPatch, redis_url: str, real_redis: Redis) -> None:
    monkeypatch.setenv("TOKENCACHE_REDIS_URL", redis_url)
    monkeypatch.setenv("TOKENCACHE_NAMESPACE", "defaults")
    tokencache.reset_default_store()
    try:
        t = token()
        tokencache.store(t)
        assert tokencache.find(SCOPE) == t
        assert real_redis.exists("defaults:token:default:" + SCOPE.replace(":", "%3A") + ":")
        assert list(tokencache.tokens()) == [t]
        assert tokencache.delete(SCOPE)
    finally:
        tokencache.reset_default_store()


def test_for_scope_hit_and_local_fetch(ts: TokenStore, emulator: Emulator, tmp_path: Path) -> None:
    t = token()
    ts.store(t)
    assert ts.for_scope(SCOPE, timeout=1) == t
    key_file = tmp_path / "key.json"
    emulator.write_service_account(key_file)
    ts.sources = Sources(files={"default": key_file})
    fetched = ts.for_scope(("default", "b a"), timeout=5)
    assert emulator.validate(fetched.token) is not None
    assert ts.find("a b") == fetched and ts.for_scope("a,b", timeout=1) == fetched
    assert emulator.stats()["token_requests"] == 1
    assert len(scheduled(ts)) == 2  # the fetched token is kept fresh like a stored one


def test_for_scope_timeout_without_credentials_or_workers(ts: TokenStore) -> None:
    with pytest.raises(tokencache.FetchTimeoutError, match="tokencache worker"):
        ts.for_scope(SCOPE, timeout=0.3)


def test_the_hash_holds_the_token_and_its_next_refresh_only(ts: TokenStore) -> None:
    """Nothing derivable is stored (the job id follows from the key; no failures field means none)."""
    t = token()
    ts.store(t)
    fields = ts.redis.hgetall(ts.keys.token(ts.key_for(t)))
    assert sorted(fields) == [b"account", b"expires", b"refresh_at", b"scope", b"sub", b"token", b"type"]


def test_rewriting_a_job_that_ran_clears_what_rq_would(ts: TokenStore) -> None:
    t = token()
    job = ts.store(t)
    assert job is not None
    ran = {"started_at": "2020-01-01T00:00:00.000000Z", "ended_at": "2020-01-01T00:00:01.000000Z",
           "worker_name": "w1", "last_heartbeat": "2020-01-01T00:00:01.000000Z"}  # fmt: skip
    ts.redis.hset(job.key, mapping=ran)
    ts.store(t)
    assert ts.redis.hmget(job.key, *ran) == [None] * len(ran)
    again = Job.fetch(job.id, ts.redis, serializer=job.serializer)
    assert again.started_at is None and again.worker_name is None
    assert again.get_status() == JobStatus.SCHEDULED and again.args == [10]


def test_the_refresh_job_hash_is_a_small_listpack(store: TokenStore) -> None:
    """Every value of the job's RQ hash is at most 64 bytes, whatever the key: Redis keeps it compact."""
    scope = " ".join(f"https://www.googleapis.com/auth/scope-number-{i}" for i in range(8))
    t = Token(token="ya29." + "x" * 400, scope=scope, expires=int(time.time()) + 3600, sub="a" * 300)
    job = store.store(t, ("someone@a-long-project-name.iam.gserviceaccount.com", scope))
    assert job is not None
    assert store.redis.object("encoding", job.key) == b"listpack"
    assert max(len(value) for value in store.redis.hvals(job.key)) <= 64


def test_the_refresh_job_hash_leaves_out_what_rq_implies(ts: TokenStore) -> None:
    """No ``created_at`` or ``description`` in a job hash (64 bytes per token); RQ reads it back with the
    fixed description, and a job an older version wrote with both is read, then rewritten without them."""
    t = token(expires_in=600)
    job = ts.store(t)
    assert job is not None
    saved = {b"status", b"data", b"origin", b"timeout", b"result_ttl", b"failure_ttl"}
    assert set(ts.redis.hkeys(job.key)) == saved
    lean = RefreshJob.fetch(job.id, connection=ts.redis)
    assert lean.description == DESCRIPTION and lean.args == [10] and lean.result_ttl == 0
    written_before = {"created_at": "2026-01-01T00:00:00.000000Z", "description": DESCRIPTION}
    ts.redis.hset(job.key, mapping=written_before)
    old = RefreshJob.fetch(job.id, connection=ts.redis)
    assert old.description == DESCRIPTION and old.created_at.year == 2026
    assert job_target(old) == (ts.keys.namespace, ts.key_for(t))
    ts.store(t)
    assert set(ts.redis.hkeys(job.key)) == saved


def test_record_and_indexed(ts: TokenStore) -> None:
    t = token(expires_in=600)
    key = ts.key_for(t)
    assert ts.record(key) is None and ts.indexed(key) is False
    ts.store(t)
    found = ts.record(key)
    assert isinstance(found, TokenRecord) and found.key == key and found.token == t
    assert found.bookkeeping.refresh_at == t.expires - 10
    assert ts.indexed(key) is True
    ts.delete(SCOPE)
    assert ts.record(key) is None and ts.indexed(key) is False


def test_listing_reads_the_index_a_page_at_a_time(ts: TokenStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """records() and tokens() page through the index; an entry whose hash is gone is skipped."""
    monkeypatch.setattr(store_core, "INDEX_PAGE", 7)  # where both stores read it
    valid = {token(scope=f"s{i}") for i in range(20)}
    for t in valid:
        ts.store(t)
    ts.store(token(expires_in=-5), "gone")  # indexed, but its hash expired at once
    pages: list[tuple[int, int]] = []
    every_page = ts.index_pages

    def spy(size: int) -> Iterator[tuple[int, int]]:
        for bounds in every_page(size):
            pages.append(bounds)
            yield bounds

    ts.index_pages = spy  # type: ignore[method-assign]
    assert {found.token for found in ts.records()} == valid
    assert pages == [(0, 6), (7, 13), (14, 20)]
    assert set(ts.tokens()) == valid


def asyncio_store(any_redis: Redis, **settings: Any) -> aio.TokenStore:
    return aio.TokenStore(async_client_like(any_redis), namespace="contract", queue="contract", **settings)


def test_asyncio_listings_are_async_iterators_that_can_be_awaited(any_redis: Redis) -> None:
    """``async for`` reads page by page; ``await store.tokens()`` still gives the list, as it did before."""
    stored = {token(scope=f"a{i}") for i in range(3)}

    async def scenario() -> None:
        async with asyncio_store(any_redis) as store:
            for t in stored:
                await store.store(t)
            assert {t async for t in store.tokens()} == stored
            assert set(await store.tokens()) == stored
            assert {found.token for found in await store.records()} == stored
            listing = store.tokens()
            assert await anext(listing) in stored
            await listing.aclose()  # stopping early leaves nothing behind

    asyncio.run(scenario())


def test_async_with_closes_the_asyncio_store(redis_url: str, real_redis: Redis) -> None:
    """Leaving ``async with`` closes the store's connections and its near cache's, as ``with`` does."""
    before = len(real_redis.client_list())

    async def scenario() -> aio.TokenStore:
        async with aio.TokenStore.from_url(redis_url, namespace="contract", near_cache=True) as store:
            assert store.near_cache is not None
            assert await asyncio.to_thread(store.near_cache.wait_active, 5)
            await store.find(SCOPE)
            assert len(real_redis.client_list()) > before
        return store

    store = asyncio.run(scenario())
    assert store.near_cache is not None and not store.near_cache.active
    wait_for(lambda: len(real_redis.client_list()) == before, 5, what="the store's connections to close")


def test_asyncio_module_level_defaults(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    monkeypatch.setenv("TOKENCACHE_REDIS_URL", redis_url)
    monkeypatch.setenv("TOKENCACHE_NAMESPACE", "aio-defaults")
    t = token()

    async def scenario() -> None:
        try:
            await aio.store(t)
            assert await aio.find(SCOPE) == t
            assert [found async for found in aio.tokens()] == [t]
            assert await aio.tokens() == [t]
            assert await aio.delete(SCOPE)
            assert await aio.tokens() == []
        finally:
            await aio.aclose_default()

    asyncio.run(scenario())


def test_rq_gets_an_offline_client_on_asyncio(any_redis: Redis) -> None:
    """RQ only builds commands for the asyncio store: its client refuses to connect, saying why."""
    from tokencache.aio.recorder import offline_client

    with pytest.raises(RuntimeError, match="never connects"):
        offline_client().ping()

    async def scenario() -> None:
        async with asyncio_store(any_redis) as store:
            rq_client = store.refresh_queue.queue.connection
            with pytest.raises(RuntimeError, match=r"tokencache\.aio"):
                rq_client.ping()
            with pytest.raises(RuntimeError, match="never connects"):
                store.refresh_queue.queue.count  # noqa: B018  RQ's own look-up: not localhost
            assert store.refresh_queue.queue.get_redis_server_version() == SERVER_VERSION  # given, not asked
            job = await store.store(token())  # RQ's commands, replayed on redis.asyncio
            assert job is not None and any_redis.exists(job.key)

    asyncio.run(scenario())


def test_listings_skip_bad_keys_and_find_names_a_wrong_type_key(
    ts: TokenStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Bound: with a token key overwritten by a string, a malformed hash and a junk index member, records()
    and tokens() return every other token (each bad key logged once over both listings, by name);
    find() of the overwritten key raises an error naming it, and every other find() is unaffected."""
    good = {token(scope=f"good{i}") for i in range(5)}
    for t in good | {token(scope="overwritten"), token(scope="malformed")}:
        ts.store(t)
    overwritten, malformed = (
        ts.keys.token(ts.key_for_info("overwritten")),
        ts.keys.token(ts.key_for_info("malformed")),
    )
    ts.redis.set(overwritten, "someone else's string")
    ts.redis.hset(malformed, "expires", "soon")
    junk = f"junk-{uuid.uuid4().hex}"  # never good again: logged once per process, so once per test here
    ts.redis.zadd(ts.keys.index, {junk: 1})

    with caplog.at_level(logging.WARNING, logger="tokencache"):
        assert {found.token for found in ts.records()} == good
        assert set(ts.tokens()) == good
    for name in (overwritten, malformed, junk):
        assert sum(name in message for message in caplog.messages) == 1, caplog.messages
    with pytest.raises(RedisUnavailableError, match=re.escape(repr(overwritten))) as raised:
        ts.find("overwritten")
    assert isinstance(raised.value, tokencache.WrongTypeError)
    with pytest.raises(tokencache.WrongTypeError, match=re.escape(repr(overwritten))):
        ts.record(ts.key_for_info("overwritten"))
    assert ts.find("malformed") is None
    assert all(ts.find(t.scope) == t for t in good)
    assert ts.redis.get(overwritten) == b"someone else's string"
    ts.delete("overwritten")  # the way to give the key back to tokencache
    ts.store(token(scope="overwritten"))
    assert ts.find("overwritten") is not None
