"""Batched refreshes: a refresh job that found its token due also refreshes the others due soon.

Why: a fleet that starts all at once stores its tokens in the same second, so
an hour later they all come due in the same second. One fetch per job gives a
pool at most ``workers / endpoint latency`` refreshes a second, and RQ's own
work per job lowers that again: a large burst then takes longer than the
refresh margin (docs/performance.md has the measured burst). Spreading refresh
times earlier with jitter would fit a given burst only with a window sized to
it, and it moves every token's refresh away from ``expires - refresh_before``;
a pool with more threads per worker would mean replacing RQ's worker. So the
job that runs for a due token looks
in the index (a range query on ``expires``) for the other tokens that come due
within :data:`LOOKAHEAD` seconds (and within :data:`EARLY_SHARE` of their own
refresh interval) and refreshes them too, ``threads`` at a time
(``TOKENCACHE_REFRESH_BATCH``, 0 turns batching off).

Each member is refreshed exactly as its own job would: under the token's own
lock (never two fetches of one token), re-read, fetched with credentials of its
own, and written only if still indexed, so a ``delete()`` meanwhile is not
undone. Its own job is moved to the new refresh time in the same transaction
if it still waits in RQ's schedule; one the scheduler already queued runs,
finds the token fresh and just reschedules itself ("not due"), so RQ and
repair keep seeing one job per token, due when its token is.

What the batch leaves to a token's own job: anything that is not plainly due
and healthy. A token in backoff (``failures`` > 0), one without a hash (an
app's request to the workers), one whose lock is held, one of an account this
worker has no key for: skipped. A malformed hash or a key of another Redis
type is skipped too, and reported (logged once, counted), so that one bad key
never stops the batch for the others. A member whose fetch fails gets the failure
recorded (its own job retries with backoff, as always), and after
:data:`STOP_AFTER_FAILURES` failures in a row the batch stops claiming more, so
a failing endpoint is not hammered. A rate-limited answer stops the batch at
once (and puts the account on hold), and a member whose account is on hold is
skipped. The batch stops claiming after :data:`BATCH_SECONDS`, far inside RQ's
job timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, cast

from redis import RedisError

from tokencache import metrics
from tokencache.app.core import TokenRecord
from tokencache.app.reads import WRONG_TYPE, bad_keys
from tokencache.app.tokenstore import TokenStore
from tokencache.constants import (
    BATCH_MAX_SCAN,
    BATCH_SECONDS,
    EARLY_SHARE,
    LOCK_TTL,
    LOOKAHEAD,
    STOP_AFTER_FAILURES,
)
from tokencache.core.connection import raise_other_errors, redis_errors
from tokencache.core.locks import Lock, acquire_each
from tokencache.core.record import Bookkeeping
from tokencache.errors import HOPELESS, RateLimitedError, RefreshError, WrongTypeError
from tokencache.keys import TokenKey
from tokencache.outcomes import Outcome
from tokencache.token import Token
from tokencache.worker.writes import hold_left, record_failure, replace_if_indexed

__all__ = ["batchable", "refresh_due"]

log = logging.getLogger(__name__)


Fetch = Callable[[TokenKey, TokenRecord], Token]
"""How a member is fetched: what its own refresh job would do (raises RefreshError/ConfigurationError)."""


class _Fields(NamedTuple):
    """The token hash's fields a batch reads before claiming: HMGET in this order, named as in the hash."""

    expires: bytes | None
    refresh_at: bytes | None
    refreshed_at: bytes | None
    failures: bytes | None

    def parsed(self) -> Bookkeeping:
        return Bookkeeping.of({name.encode(): value for name, value in self._asdict().items() if value})


def batchable(book: Bookkeeping, expires: int, refresh_before: int, now: float) -> bool:
    """Whether a token may be refreshed by another token's job now: healthy, scheduled with this
    job's margin (the write will schedule it with that margin), and due within the look-ahead and
    within :data:`EARLY_SHARE` of its refresh interval."""
    due = expires - refresh_before
    if book.refresh_at != due:
        return False  # stored with another margin (or on the half-life floor): its own job knows best
    interval = due - book.refreshed_at if book.refreshed_at is not None else 0.0
    early = min(LOOKAHEAD, EARLY_SHARE * max(0.0, interval))
    return book.failures == 0 and now >= due - early


def _expires(store: TokenStore, key: TokenKey, reply: list[bytes | None] | RedisError) -> int | None:
    """The ``expires`` of an HMGET reply of :class:`_Fields`; None, reported, for a bad key."""
    redis_key = store.keys.token(key)
    if isinstance(reply, RedisError):
        bad_keys.skip(redis_key, WRONG_TYPE, "batch")
        return None
    expires = _Fields(*reply).expires
    if expires is None:
        return None  # no hash: an app's request to the workers, or gone
    try:
        return int(expires)
    except ValueError:
        why = f"field 'expires' is not whole seconds: {expires.decode(errors='replace')!r}"
        bad_keys.skip(redis_key, f"malformed token hash: {why}", "batch")
        return None


@dataclass(frozen=True, slots=True)
class _Claim:
    key: TokenKey
    lock: Lock


class _Candidates:
    """The index entries due within the look-ahead, claimed (locked) a few at a time for the threads.

    Claiming when reading, rather than when a thread gets to the entry, keeps concurrent batches,
    which all read the same head of the range, from trying each other's tokens one by one. The
    head is re-read when the claims run out instead of paging by offset: refreshed tokens leave
    the range (their ``expires`` moves on), so an offset would skip entries.
    """

    def __init__(self, store: TokenStore, exclude: TokenKey, threads: int, deadline: float) -> None:
        self.store = store
        self.threads = threads
        self.deadline = deadline
        self.held_elsewhere = 0
        self.stopped = False
        self._failures_in_a_row = 0
        self._lock = threading.Lock()
        self._seen = {store.keys.token(exclude).encode()}
        self._gone = 1  # seen entries that left the range: the excluded token was just refreshed
        self._claims: deque[_Claim] = deque()

    def next(self) -> _Claim | None:
        """A claimed token for a thread to refresh, or None when the batch is over."""
        with self._lock:
            # A main thread gone means the worker is exiting: claim nothing more, let the fetches end.
            ending = not threading.main_thread().is_alive()
            if self.stopped or ending or time.monotonic() > self.deadline:
                self._release_claims()
                return None
            if not self._claims:
                self._claim_more()
            return self._claims.popleft() if self._claims else None

    def done(self, outcome: Outcome) -> None:
        with self._lock:
            self._gone += outcome in (Outcome.REFRESHED, Outcome.DELETED)
            self.stopped = self.stopped or outcome is Outcome.HELD_BACK  # the endpoint asked for less
            if outcome is Outcome.FAILED:
                self._failures_in_a_row += 1
                self.stopped = self.stopped or self._failures_in_a_row >= STOP_AFTER_FAILURES
            elif outcome is Outcome.REFRESHED:
                self._failures_in_a_row = 0

    def stop(self) -> None:
        with self._lock:
            self.stopped = True

    def any(self) -> bool:
        """Whether there is anything to refresh (claims the first few tokens if so)."""
        with self._lock:
            if not self._claims:
                self._claim_more()
            return bool(self._claims)

    def release_claims(self) -> None:
        """Give back the claims no thread took (the batch ended, or a thread crashed)."""
        with self._lock:
            self._release_claims()

    def _claim_more(self) -> None:
        """Lock up to ``threads`` unseen, batchable entries of the range's head (a round trip each)."""
        while not self._claims:
            if len(self._seen) >= BATCH_MAX_SCAN or time.monotonic() > self.deadline:
                return  # entries it cannot take (backoff, other margins) must not make a batch crawl
            unseen = self._unseen(self.threads)
            if not unseen:
                return
            candidates = self._batchable(unseen)
            locks = [Lock(self.store.redis, self.store.keys.lock(key), LOCK_TTL) for key in candidates]
            taken = acquire_each(self.store.redis, locks)
            for key, lock, ok in zip(candidates, locks, taken, strict=True):
                if ok:
                    self._claims.append(_Claim(key, lock.keep()))
                else:
                    self.held_elsewhere += 1  # mostly in flight in a concurrent batch

    def _batchable(self, keys: list[TokenKey]) -> list[TokenKey]:
        """The keys whose hash says they may be batched now: read without their locks, so that tokens
        that are not due are not locked (their own jobs would find them busy); re-checked once locked."""
        store = self.store
        with redis_errors(store.redis), store.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(store.keys.token(key), *_Fields._fields)
            replies = raise_other_errors(pipe.execute(raise_on_error=False))
        now = store.clock()
        return [
            key
            for key, reply in zip(keys, replies, strict=True)
            if (expires := _expires(store, key, reply)) is not None
            and batchable(_Fields(*reply).parsed(), expires, store.refresh_before, now)
        ]

    def _unseen(self, want: int) -> list[TokenKey]:
        store = self.store
        horizon = store.clock() + store.refresh_before + LOOKAHEAD
        # Every entry seen and not gone from the range may still be at its head (in flight, skipped).
        limit = want + len(self._seen) - self._gone
        members = cast(list[bytes], store.redis.zrangebyscore(store.keys.index, "-inf", horizon, 0, limit))
        keys = []
        for member in members:
            if member in self._seen:
                continue
            self._seen.add(member)
            key = store.keys.index_member(member)
            if key is None:
                self._gone += 1  # junk in the index: repair drops it
                bad_keys.skip(member.decode(errors="backslashreplace"), store.junk_reason, "batch")
                continue
            keys.append(key)
            if len(keys) == want:
                break
        return keys

    def _release_claims(self) -> None:
        while self._claims:
            self._claims.popleft().lock.release()


class _Batch:
    """One batch: ``threads`` threads refreshing the claims of :class:`_Candidates`, counting outcomes."""

    def __init__(self, store: TokenStore, fetch: Fetch, candidates: _Candidates) -> None:
        self.store = store
        self.fetch = fetch
        self.candidates = candidates
        self.outcomes: Counter[Outcome] = Counter()
        self._count = threading.Lock()

    def drain(self) -> None:
        try:
            while (claim := self.candidates.next()) is not None:
                outcome = self.refresh_claimed(claim)
                self.candidates.done(outcome)
                with self._count:
                    self.outcomes[outcome] += 1
        except Exception:
            # Redis failing mid-batch, a bug: the members' own jobs are still scheduled and retry.
            log.exception("a batched refresh crashed; stopping the batch")
            self.candidates.stop()
            with self._count:
                self.outcomes[Outcome.CRASHED] += 1

    def refresh_claimed(self, claim: _Claim) -> Outcome:
        """Refresh the claimed token if it is due within the look-ahead; the outcome. Releases the claim."""
        try:
            if claim.lock.lost or not claim.lock.extend():
                return Outcome.BUSY  # the claim lapsed (a stalled process), and someone else may hold it
            try:
                current = self.store.record(claim.key)
            except WrongTypeError:
                return Outcome.SKIPPED  # turned into another type since it was read: reported, left alone
            if current is None or not batchable(
                current.bookkeeping, current.token.expires, self.store.refresh_before, self.store.clock()
            ):
                return Outcome.SKIPPED
            if hold_left(self.store, claim.key.account) > 0:
                return Outcome.SKIPPED  # its account is on hold: its own job waits it out
            return self._fetch_and_write(claim.key, current)
        finally:
            claim.lock.release()

    def _fetch_and_write(self, key: TokenKey, current: TokenRecord) -> Outcome:
        try:
            token = self.fetch(key, current)
        except HOPELESS as e:
            log.debug("batch skips %s: %s", key.encode(), e)  # its own job reports it
            return Outcome.SKIPPED
        except RateLimitedError as e:
            record_failure(self.store, key, str(e), hold=e.hold())
            log.warning("batched refresh of %s was rate-limited: %s; stopping the batch", key.encode(), e)
            return Outcome.HELD_BACK
        except RefreshError as e:
            record_failure(self.store, key, str(e))
            log.warning("batched refresh of %s failed: %s; its own job retries", key.encode(), e)
            return Outcome.FAILED
        if not replace_if_indexed(self.store, key, token, outcome=Outcome.BATCHED.value, move_job=True):
            return Outcome.DELETED
        metrics.record_refresh(Outcome.BATCHED)
        return Outcome.REFRESHED


def refresh_due(store: TokenStore, fetch: Fetch, exclude: TokenKey, threads: int) -> Counter[Outcome]:
    """Refresh the tokens other than ``exclude`` that come due within :data:`LOOKAHEAD`, ``threads`` at a
    time; counts the outcomes (refreshed, skipped, busy, failed, deleted, crashed, held elsewhere)."""
    if threads < 1:
        return Counter()
    started = time.monotonic()
    candidates = _Candidates(store, exclude, threads, started + BATCH_SECONDS)
    batch = _Batch(store, fetch, candidates)
    try:
        if candidates.any():  # most refreshes have nothing to batch: no threads for them
            with ThreadPoolExecutor(threads, thread_name_prefix="tokencache-batch") as pool:
                for _ in range(threads):
                    pool.submit(batch.drain)
    finally:
        candidates.release_claims()
    batch.outcomes[Outcome.HELD_ELSEWHERE] += candidates.held_elsewhere
    if batch.outcomes.total():
        log.info(
            "batch after %s: %s in %.1fs",
            exclude.encode(),
            ", ".join(f"{n} {outcome}" for outcome, n in sorted(batch.outcomes.items()) if n),
            time.monotonic() - started,
        )
    return batch.outcomes
