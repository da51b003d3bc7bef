"""Batched refreshes: a due refresh job also refreshes the tokens due within the look-ahead.

The first tests drive :func:`refresh_due` in this process with a stand-in fetch (deterministic:
a delete can land exactly mid-fetch); the last ones run real `tokencache worker` processes
against the emulator, with a burst of tokens all due in the same second.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import pytest
from rq.job import Job
from rq.registry import ScheduledJobRegistry

from tokencache import Token, TokenStore
from tokencache.app.core import TokenRecord
from tokencache.constants import LOOKAHEAD, STOP_AFTER_FAILURES
from tokencache.core.locks import Lock, acquire_each
from tokencache.errors import RefreshError, UnknownAccountError
from tokencache.keys import TokenKey
from tokencache.testing.emulator import Emulator
from tokencache.worker.batch import refresh_due
from tokencache.worker.repair import overdue
from tokencache.worker.writes import record_failure

from .conftest import SCOPE, Workers, token_text, wait_for

LEADER = TokenKey.of(None, SCOPE, "leader@example.com")


def original(sub: str, expires: int, account: str | None = None) -> Token:
    return Token(
        token=f"ya29.original-{token_text(sub)}",
        scope=SCOPE,
        expires=expires,
        sub=sub,
        account=account,
    )


def key(sub: str, account: str | None = None) -> TokenKey:
    return TokenKey.of(account, SCOPE, sub)


class FakeFetch:
    """Counts fetches per key; ``fail``/``hook`` pick keys that fail or trigger something mid-fetch."""

    def __init__(self, fail: set[str] | None = None, hook: dict[str, object] | None = None) -> None:
        self.calls: Counter[TokenKey] = Counter()
        self.fail = fail or set()
        self.hook = hook or {}
        self._lock = threading.Lock()

    def __call__(self, key: TokenKey, current: TokenRecord) -> Token:
        with self._lock:
            self.calls[key] += 1
        action = self.hook.get(key.sub or "")
        if callable(action):
            action()
        if key.account == "unknown@example.com":
            raise UnknownAccountError("no credentials for account 'unknown@example.com'")
        if key.sub in self.fail or "*" in self.fail:
            raise RefreshError(f"token request for {key.encode()!r} failed: injected")
        return Token(
            token=f"ya29.new-{token_text(key.sub or '')}",
            scope=current.token.scope,
            expires=int(time.time()) + 3600,
            sub=key.sub,
            account=current.token.account,
        )


class _FetchedThrough(TokenStore):
    """A store whose ``store()`` files tokens as a worker's fetch would (``refreshed_at`` set)."""

    def store(self, token: Token, info: object = None, sub: str | None = None) -> Job | None:
        return self.write(self.key_for(token, info, sub), token, fetched=True)


def an_hour_ago(store: TokenStore, refresh_before: int | None = None) -> TokenStore:
    """The store as it was an hour ago: tokens stored through it were fetched an hour ago, so they have
    an hour-long refresh interval, like those of a fleet that started all at once (batching takes
    such tokens the full look-ahead early)."""
    return _FetchedThrough(
        store.redis,
        namespace=store.keys.namespace,
        refresh_before=store.refresh_before if refresh_before is None else refresh_before,
        queue=store.refresh_queue.name,
        clock=lambda: time.time() - 3600,
    )


def scheduled_at(store: TokenStore, k: TokenKey) -> float | None:
    registry = ScheduledJobRegistry(queue=store.refresh_queue.queue)
    score: float | None = store.redis.zscore(registry.key, store.keys.job_id(k))
    return score


def test_due_tokens_are_fetched_once_each_and_their_scheduled_jobs_move_to_the_new_refresh_time(
    store: TokenStore,
) -> None:
    soon = int(time.time()) + store.refresh_before + 2  # due in 2 s: inside the look-ahead
    later = int(time.time()) + 100
    then = an_hour_ago(store)
    then.store(original("leader@example.com", soon))
    due = [f"due{i}" for i in range(30)]
    for sub in due:
        then.store(original(sub, soon))
    for i in range(5):
        then.store(original(f"later{i}", later))
    fetch = FakeFetch()

    outcomes = refresh_due(store, fetch, exclude=LEADER, threads=4)

    assert outcomes["refreshed"] == 30
    assert fetch.calls == Counter({key(sub): 1 for sub in due})
    for sub in due:
        found = store.find(SCOPE, sub=sub)
        assert found is not None and found.token == f"ya29.new-{sub}"
        refresh_at = int(store.redis.hget(store.keys.token(key(sub)), "refresh_at"))
        assert refresh_at == found.expires - store.refresh_before
        assert scheduled_at(store, key(sub)) == refresh_at  # moved along with the token
    for i in range(5):
        assert scheduled_at(store, key(f"later{i}")) == later - store.refresh_before
    assert scheduled_at(store, LEADER) == soon - store.refresh_before  # the leader's own job is its own
    assert overdue(store) == []
    assert not [k for k in store.redis.scan_iter(f"{store.keys.namespace}:lock:*")]


def test_a_token_no_worker_fetched_is_batched_only_once_due(store: TokenStore) -> None:
    """Stored by an app (no ``refreshed_at``), its refresh interval is unknown: no early batching."""
    soon = int(time.time()) + store.refresh_before + 2
    store.store(original("from-an-app", soon))
    an_hour_ago(store).store(original("fetched", soon))
    fetch = FakeFetch()
    refresh_due(store, fetch, exclude=LEADER, threads=2)
    assert fetch.calls == Counter({key("fetched"): 1})
    store.store(original("due-now", int(time.time()) + store.refresh_before))
    refresh_due(store, fetch, exclude=LEADER, threads=2)
    assert fetch.calls[key("due-now")] == 1 and fetch.calls[key("from-an-app")] == 0


def test_a_token_stored_with_another_margin_is_left_to_its_own_job(store: TokenStore) -> None:
    """The batch would reschedule it with the batching job's margin, not the one it was stored with."""
    soon = int(time.time()) + store.refresh_before + 2
    then = an_hour_ago(store)
    then.store(original("same-margin", soon))
    an_hour_ago(store, refresh_before=store.refresh_before + 1).store(original("other-margin", soon))
    fetch = FakeFetch()
    refresh_due(store, fetch, exclude=LEADER, threads=2)
    assert fetch.calls == Counter({key("same-margin"): 1})


def test_not_plainly_due_tokens_are_left_to_their_own_jobs(store: TokenStore) -> None:
    soon = int(time.time()) + store.refresh_before + 2
    then = an_hour_ago(store)
    for sub in ("backoff", "locked", "fine"):
        then.store(original(sub, soon))
    then.store(original("keyless", soon, account="unknown@example.com"))
    record_failure(store, key("backoff"), "the last attempt failed")
    holder = Lock(store.redis, store.keys.lock(key("locked")), 30)
    assert holder.acquire()
    store.redis.zadd(store.keys.index, {store.keys.token(key("wanted")): 0})  # an app's request, no hash
    fetch = FakeFetch()

    outcomes = refresh_due(store, fetch, exclude=LEADER, threads=2)

    assert outcomes == Counter({"refreshed": 1, "held elsewhere": 1, "skipped": 1})
    assert set(fetch.calls) == {key("fine"), key("keyless", "unknown@example.com")}
    assert store.redis.hget(store.keys.token(key("keyless", "unknown@example.com")), "failures") is None
    assert store.redis.get(holder.name) == holder.owner.encode()  # someone else's lock is left alone
    for sub in ("backoff", "locked"):
        assert store.find(SCOPE, sub=sub).token == f"ya29.original-{sub}"  # type: ignore[union-attr]


def test_a_member_deleted_during_its_fetch_is_not_resurrected(store: TokenStore) -> None:
    soon = int(time.time()) + store.refresh_before + 2
    for sub in ("doomed", "kept"):
        an_hour_ago(store).store(original(sub, soon))
    fetch = FakeFetch(hook={"doomed": lambda: store.delete(SCOPE, sub="doomed")})

    outcomes = refresh_due(store, fetch, exclude=LEADER, threads=2)

    assert outcomes == Counter({"deleted": 1, "refreshed": 1})
    doomed = key("doomed")
    assert store.find(SCOPE, sub="doomed") is None
    assert not store.redis.exists(store.keys.token(doomed))
    assert store.redis.zscore(store.keys.index, store.keys.token(doomed)) is None
    assert scheduled_at(store, doomed) is None  # the delete cancelled its job and the write moved nothing
    assert store.find(SCOPE, sub="kept").token == "ya29.new-kept"  # type: ignore[union-attr]


def test_a_failed_member_is_recorded_and_its_own_job_keeps_its_time(store: TokenStore) -> None:
    soon = int(time.time()) + store.refresh_before + 2
    for sub in ("flaky", "a", "b"):
        an_hour_ago(store).store(original(sub, soon))
    fetch = FakeFetch(fail={"flaky"})

    outcomes = refresh_due(store, fetch, exclude=LEADER, threads=1)

    assert outcomes == Counter({"failed": 1, "refreshed": 2})
    flaky = store.keys.token(key("flaky"))
    assert store.redis.hget(flaky, "failures") == b"1"
    assert b"injected" in store.redis.hget(flaky, "last_error")
    assert store.find(SCOPE, sub="flaky").token == "ya29.original-flaky"  # type: ignore[union-attr]
    assert scheduled_at(store, key("flaky")) == soon - store.refresh_before  # its own job retries
    assert {store.find(SCOPE, sub=s).token for s in "ab"} == {"ya29.new-a", "ya29.new-b"}  # type: ignore[union-attr]


def test_the_batch_stops_after_failures_in_a_row_and_gives_back_its_claims(store: TokenStore) -> None:
    soon = int(time.time()) + store.refresh_before + 2
    for i in range(40):
        an_hour_ago(store).store(original(f"t{i}", soon))
    fetch = FakeFetch(fail={"*"})

    outcomes = refresh_due(store, fetch, exclude=LEADER, threads=1)

    assert outcomes == Counter({"failed": STOP_AFTER_FAILURES})
    assert sum(fetch.calls.values()) == STOP_AFTER_FAILURES
    assert not [k for k in store.redis.scan_iter(f"{store.keys.namespace}:lock:*")]


def test_tokens_beyond_the_look_ahead_or_with_a_short_interval_and_zero_threads_fetch_nothing(
    store: TokenStore,
) -> None:
    beyond = int(time.time() + store.refresh_before + LOOKAHEAD) + 3
    an_hour_ago(store).store(original("beyond", beyond))
    store.store(original("due", int(time.time()) + store.refresh_before))
    # Refreshed every 3 s: batching it 2 s early would fetch it almost twice as often.
    store.store(original("short", int(time.time()) + store.refresh_before + 3))
    fetch = FakeFetch()
    assert refresh_due(store, fetch, exclude=LEADER, threads=0) == Counter()
    assert refresh_due(store, fetch, exclude=LEADER, threads=4) == Counter({"refreshed": 1})
    assert set(fetch.calls) == {key("due")}


def test_a_claim_that_waited_too_long_is_renewed_or_dropped_never_fetched_unlocked(store: TokenStore) -> None:
    from tokencache.worker.batch import _Batch, _Candidates, _Claim

    soon = int(time.time()) + store.refresh_before + 2
    for sub in ("renewed", "lapsed"):
        an_hour_ago(store).store(original(sub, soon))
    fetch = FakeFetch()
    batch = _Batch(store, fetch, _Candidates(store, LEADER, 1, time.monotonic() + 10))
    renewed = Lock(store.redis, store.keys.lock(key("renewed")), 5.0)
    assert renewed.acquire()
    lapsed = Lock(store.redis, store.keys.lock(key("lapsed")), 5.0)  # never taken: someone else's now
    other = Lock(store.redis, lapsed.name, 5.0)
    assert other.acquire()
    assert batch.refresh_claimed(_Claim(key("renewed"), renewed)) == "refreshed"
    assert batch.refresh_claimed(_Claim(key("lapsed"), lapsed)) == "busy"
    assert set(fetch.calls) == {key("renewed")}
    assert store.redis.get(other.name) == other.owner.encode()


def test_locks_are_taken_in_one_round_trip_and_renewed_only_by_their_owner(store: TokenStore) -> None:
    locks = [Lock(store.redis, f"{store.keys.namespace}:lock:t{i}", 1.0) for i in range(3)]
    assert locks[1].acquire()
    assert acquire_each(store.redis, locks) == [True, False, True]
    other = Lock(store.redis, locks[0].name, 1.0)
    assert not other.extend()
    store.redis.pexpire(locks[0].name, 100)
    assert locks[0].extend() and store.redis.pttl(locks[0].name) > 500


# -- end to end: real workers, the emulator, real google-auth ------------------------------------


def burst(store: TokenStore, n: int, due_in: float) -> tuple[int, list[Token]]:
    """Store n tokens that all expire in the same second, their refreshes due in about ``due_in`` s."""
    expires = int(time.time() + due_in) + 1 + store.refresh_before
    tokens = [original(f"user{i}@example.com", expires) for i in range(n)]
    for token in tokens:
        store.store(token)
    return expires, tokens


def all_replaced(store: TokenStore, tokens: list[Token]) -> bool:
    with store.redis.pipeline(transaction=False) as pipe:
        for token in tokens:
            pipe.hget(store.keys.token(store.key_for(token)), "token")
        now = pipe.execute()
    return all(value is not None and value.decode() != t.token for value, t in zip(now, tokens, strict=True))


def settled(store: TokenStore, n: int) -> bool:
    """Every job back in the schedule for its next refresh, nothing queued or running."""
    q = store.refresh_queue.queue
    registry = ScheduledJobRegistry(queue=q)
    scores = [score for _, score in store.redis.zrange(registry.key, 0, -1, withscores=True)]
    return (
        q.count == 0
        and q.started_job_registry.count == 0
        and len(scores) == n
        and min(scores) > time.time() + 60
    )


@pytest.mark.timeout(60)
def test_sixty_tokens_due_in_the_same_second_are_replaced_before_expiry_by_one_worker(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    emulator.config.latency = 0.2  # one fetch at a time: 60 x 0.2 s = 12 s, past the 10 s margin
    workers.start(1)
    expires, tokens = burst(store, 60, due_in=2)
    wait_for(lambda: all_replaced(store, tokens), timeout=expires - time.time(), what="all 60 replaced")
    assert time.time() < expires
    stats = emulator.stats()
    assert stats["token_requests"] == 60 and stats["issued"] == 60
    wait_for(lambda: settled(store, 60), 20, what="every job rescheduled")
    assert emulator.stats()["token_requests"] == 60


@pytest.mark.timeout(60)
def test_a_failing_batch_member_is_retried_by_its_own_job(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    emulator.config.latency = 0.5
    workers.start(1)
    expires, tokens = burst(store, 10, due_in=2)
    # The first request is the leading job's own token; fail the first of its batch.
    wait_for(lambda: emulator.stats()["token_requests"] >= 1, 10, interval=0.01, what="the first fetch")
    emulator.config.fail_next = 1
    wait_for(lambda: all_replaced(store, tokens), timeout=expires - time.time(), what="all 10 replaced")
    assert time.time() < expires
    stats = emulator.stats()
    assert stats["failed"] == 1 and stats["issued"] == 10 and stats["token_requests"] == 11
    wait_for(lambda: settled(store, 10), 20, what="every job rescheduled")


@pytest.mark.timeout(60)
def test_a_batch_member_deleted_during_the_batch_is_not_resurrected(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    emulator.config.latency = 1.0
    workers.start(1)
    _, tokens = burst(store, 4, due_in=2)
    keys = [store.key_for(t) for t in tokens]

    def members_in_flight() -> list[TokenKey]:
        if emulator.stats()["token_requests"] < 2:  # the leading job's own fetch comes first
            return []
        return [k for k in keys if store.redis.exists(store.keys.lock(k))]

    doomed = wait_for(members_in_flight, 10, interval=0.02, what="batch fetches in flight")[0]
    assert store.delete(SCOPE, sub=doomed.sub)
    wait_for(lambda: emulator.stats()["issued"] >= 4, 10, what="the fetches answered")
    wait_for(lambda: settled(store, 3), 20, what="the others' jobs rescheduled")
    assert store.find(SCOPE, sub=doomed.sub) is None
    assert store.redis.zscore(store.keys.index, store.keys.token(doomed)) is None
    assert scheduled_at(store, doomed) is None
    assert all(store.find(SCOPE, sub=k.sub) for k in keys if k != doomed)


# -- fault isolation: one bad key never stops a batch ----------------------------------------------


def test_a_malformed_or_wrong_type_member_does_not_stop_the_batch(
    store: TokenStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Bound: a due token whose ``expires`` is not a number, and a due token key overwritten by a string,
    are skipped (each logged once, by name); the other 10 due tokens are all refreshed by the batch."""
    soon = int(time.time()) + store.refresh_before + 2
    then = an_hour_ago(store)
    for sub in ["malformed", "overwritten", *(f"ok{i}" for i in range(10))]:
        then.store(original(sub, soon))
    malformed, overwritten = store.keys.token(key("malformed")), store.keys.token(key("overwritten"))
    store.redis.hset(malformed, "expires", "soon")
    store.redis.set(overwritten, "someone else's string")
    fetch = FakeFetch()

    with caplog.at_level(logging.WARNING, logger="tokencache"):
        outcomes = refresh_due(store, fetch, exclude=LEADER, threads=2)
        assert refresh_due(store, fetch, exclude=LEADER, threads=2) == Counter()  # met again, not logged

    assert outcomes == Counter({"refreshed": 10})
    assert set(fetch.calls) == {key(f"ok{i}") for i in range(10)}
    assert store.redis.get(overwritten) == b"someone else's string"
    assert store.redis.hget(malformed, "expires") == b"soon"
    for name in (malformed, overwritten):
        assert sum(name in message for message in caplog.messages) == 1, caplog.messages


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", ["malformed", "wrong type"])
def test_a_burst_is_replaced_before_expiry_beside_a_bad_key_at_the_head_of_the_range(
    store: TokenStore, workers: Workers, emulator: Emulator, bad: str
) -> None:
    """Bound: the sixty-token burst above (one worker, 0.2 s per fetch: only batching fits it in the 10 s
    margin) is replaced before it expires, beside a bad key due with it that nothing repairs and that
    sorts first in the index, so every batch meets it: a hash whose ``expires`` is not a number, of an
    account no worker holds (its own job gives up), or a token key overwritten by a string."""
    emulator.config.latency = 0.2
    workers.start(1)
    expires, tokens = burst(store, 60, due_in=2)
    head = original("bad@example.com", expires, account="absent@example.com")  # sorts before "default"
    store.store(head)
    redis_key = store.keys.token(store.key_for(head))
    assert store.redis.zrange(store.keys.index, 0, 0) == [redis_key.encode()]
    if bad == "malformed":
        store.redis.hset(redis_key, "expires", "soon")
    else:
        store.redis.set(redis_key, "someone else's string")
    wait_for(lambda: all_replaced(store, tokens), timeout=expires - time.time(), what="all 60 replaced")
    assert time.time() < expires
