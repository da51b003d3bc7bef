"""What the sync TokenStore and its asyncio twin share: settings, keys, and every decision, without I/O.

Both stores issue their writes into a pipeline-like writer (a redis-py
pipeline, or a recorder that the asyncio store replays), so both write exactly
the same layout; both page through the index the same way and judge what they
read with the same methods here. The twins (:mod:`tokencache.app.tokenstore`,
:mod:`tokencache.aio.tokenstore`) only do I/O, so a diff of the two shows little
more than ``async`` and ``await``.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import Any

from redis import Redis, RedisError
from redis.asyncio import Redis as AsyncRedis
from redis.typing import EncodableT
from rq.job import Job

from tokencache import env, metrics
from tokencache.app.nearcache import NearCache
from tokencache.app.reads import WRONG_TYPE, KeyMemo, TokenMemo, bad_keys
from tokencache.constants import (
    ERROR_MESSAGE_LIMIT,
    ERROR_TTL,
    EXPIRY_SKEW,
    FLEET_POLL,
    INDEX_PAGE,
    INVALIDATE_ATTEMPTS,
    INVALIDATE_EVERY,
    WANT_TTL,
)
from tokencache.core.audit import Audit, Event, audit_failed
from tokencache.core.connection import is_wrong_type, unavailable
from tokencache.core.notify import error_message, ok_message, parse
from tokencache.core.pipeline import Pipeline
from tokencache.core.queue import RefreshQueue, utc
from tokencache.core.record import REJECTED, Bookkeeping, MalformedRecord, read_fields, to_fields
from tokencache.core.sources import Sources, default_sources
from tokencache.crypto import Keyring, key_id
from tokencache.errors import (
    ConfigurationError,
    EncryptionError,
    FetchTimeoutError,
    RateLimitedError,
    RedisUnavailableError,
    RefreshError,
    TokenCacheError,
    WrongTypeError,
)
from tokencache.keys import DEFAULT_ACCOUNT, Keys, TokenKey, parse_info
from tokencache.outcomes import Invalidation
from tokencache.token import Freshness, Token, mask
from tokencache.validate import check_access_token, check_flag, check_refresh_before

__all__ = [
    "REPORTED",
    "Clock",
    "FleetFetchCore",
    "Move",
    "Raw",
    "StoreCore",
    "TokenRecord",
    "account_arg",
    "fetch_failed",
    "held_back",
    "hold_of",
    "message_error",
    "rejected_token",
    "timeout_error",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Raw = dict[bytes, bytes]


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A cached token with its key and refresh bookkeeping (what ``ls`` shows)."""

    key: TokenKey
    token: Token
    bookkeeping: Bookkeeping
    key_id: str | None = None
    """The id of the key the stored token is encrypted with; None: it is stored in plaintext."""
    unreadable: EncryptionError | None = None
    """Why this process cannot decrypt the stored token (``token.token`` then holds the ciphertext, and
    nothing hands it out); None when it could."""


class StoreCore:
    """What the sync and the asyncio TokenStore share: settings, keys, and the commands they send.

    Writes are issued into a pipeline-like object (a redis-py pipeline, or a
    recorder that the asyncio store replays), so both stores write exactly
    the same layout.
    """

    def __init__(
        self,
        rq_connection: Redis,
        *,
        namespace: str | None,
        refresh_before: int | None,
        queue: str | None,
        clock: Clock,
        sources: Sources | None,
        audit: Audit | None = None,
        encryption: object = None,
    ) -> None:
        self.keys = Keys(env.namespace() if namespace is None else namespace)
        self.encryption = Keyring.of(encryption)
        """The key ring tokens are written and read with (from ``TOKENCACHE_ENCRYPTION_KEYS`` by default,
        so that a fleet configured by its environment agrees); with no key, tokens are stored in plaintext."""
        self.refresh_before = check_refresh_before(
            env.refresh_before() if refresh_before is None else refresh_before
        )
        self.refresh_queue = RefreshQueue(
            rq_connection, queue or env.queue_name(self.keys.namespace), self.keys
        )
        self.clock = clock
        self.audit = Audit.from_env() if audit is None else audit
        """How this store appends to the audit trail: by default as an app, ``TOKENCACHE_AUDIT_MAXLEN``
        entries kept (a refresh worker and the CLI say otherwise)."""
        self._sources = sources
        self._key_memo = KeyMemo(self.keys)
        self._token_memo = TokenMemo(self.encryption)

    @property
    def sources(self) -> Sources:
        """Where this process fetches tokens itself on a ``for_scope`` miss (default: the environment's)."""
        if self._sources is None:
            self._sources = default_sources()
        return self._sources

    @sources.setter
    def sources(self, sources: Sources) -> None:
        self._sources = sources

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(namespace={self.keys.namespace!r}, refresh_before={self.refresh_before})"
        )

    def key_for_info(self, info: object, sub: str | None = None) -> TokenKey:
        """The key ``find(info, sub)`` reads."""
        return parse_info(info, sub)

    def key_for(self, token: Token, info: object = None, sub: str | None = None) -> TokenKey:
        """The key ``store(token, info, sub)`` files the token under (Goth's override rules)."""
        if not isinstance(token, Token):
            raise TypeError(f"token must be a tokencache.Token, not {type(token).__name__}")
        sub = token.sub if sub is None else sub
        if info is None:
            return TokenKey.of(token.account, token.scope, sub)
        return parse_info(info, sub)

    def due_at(self, token: Token, *, fetched: bool) -> int:
        """When the token's refresh should run: ``refresh_before`` ahead of expiry.

        A token we just fetched whose whole life is shorter than the margin is
        refreshed at half-life instead, so short-lived tokens cannot make the
        workers fetch in a loop.
        """
        now = int(self.clock())
        due = token.expires - self.refresh_before
        if fetched:
            due = max(due, now + (token.expires - now) // 2)
        return max(due, now)

    def write_commands(self, pipe: Pipeline, key: TokenKey, token: Token, *, fetched: bool) -> Job:
        """Queue the commands of a store into ``pipe``: hash, TTL, index entry, refresh job, wake-up, and
        the audit entry (``fetched``: on a ``for_scope`` miss; else a token the caller brought)."""
        now = int(self.clock())
        refresh_at = self.due_at(token, fetched=fetched)
        redis_key = self.keys.token(key)
        fields = to_fields(
            token,
            redis_key=redis_key,
            ring=self.encryption,
            refresh_at=refresh_at,
            refreshed_at=now if fetched else None,
        )
        pipe.delete(redis_key)
        pipe.hset(redis_key, mapping=fields)
        pipe.expireat(redis_key, token.expires)
        pipe.zadd(self.keys.index, {redis_key: token.expires})
        job = self.refresh_queue.schedule(pipe, key, self.refresh_before, utc(refresh_at))
        pipe.delete(self.keys.want(key), self.keys.error(key))  # answered: a later miss may ask again at once
        pipe.publish(self.keys.channel(key), ok_message())
        event, outcome = (Event.FETCHED, "miss") if fetched else (Event.STORED, "")
        entry = self.audit.entry(event, key, outcome=outcome, token=token.token, expires=token.expires)
        self.audit.append(pipe, self.keys.audit, entry)  # last: see written()
        return job

    def written(self, replies: list[Any]) -> None:
        """Check the replies of :meth:`write_commands`, executed with ``raise_on_error=False``: an error
        of the write raises; one of its audit entry (the last command, when the trail is on) is logged
        and counted, and the write stands (:func:`~tokencache.core.audit.audit_failed` says why)."""
        audited = bool(self.audit.maxlen) and bool(replies)
        for reply in replies[:-1] if audited else replies:
            if isinstance(reply, Exception):
                raise reply
        if audited and isinstance(replies[-1], Exception):
            audit_failed(self.keys.audit, replies[-1])

    def failure_commands(
        self,
        pipe: Pipeline,
        key: TokenKey,
        message: str,
        *,
        gave_up: bool,
        hold: float | None = None,
        retry_in: float | None = None,
    ) -> None:
        """Queue what tells the fleet a fetch failed: the error (kept for late waiters) and the wake-up.

        The error is kept :data:`ERROR_TTL` seconds. A refresh that gave up also withdraws the apps'
        request to the workers, so the next miss after that window asks again; one that retries in
        ``retry_in`` seconds keeps a standing request standing until then (and :data:`WANT_TTL` more),
        so misses meanwhile wait for that retry instead of pulling it forward. ``hold``: the endpoint
        rate-limited the account, so every fetcher of it waits that many seconds (``{ns}:backoff``).
        """
        pipe.set(self.keys.error(key), message[:ERROR_MESSAGE_LIMIT], px=int(ERROR_TTL * 1000))
        if gave_up:
            pipe.delete(self.keys.want(key))
        elif retry_in is not None:
            pipe.pexpire(self.keys.want(key), int((retry_in + WANT_TTL) * 1000))  # only if one stands
        if hold:
            pipe.set(
                self.keys.backoff(key.account), message[:ERROR_MESSAGE_LIMIT], px=max(1, int(hold * 1000))
            )
        pipe.publish(self.keys.channel(key), error_message(message))

    def ask_workers_commands(self, pipe: Pipeline, key: TokenKey) -> None:
        """Queue a request for an immediate refresh by the worker pool (inside a MULTI).

        The index placeholder (score 0) tells the refresh job the token is wanted; it goes in the
        same transaction as the job so that repair never sees one without the other.
        """
        pipe.zadd(self.keys.index, {self.keys.token(key): 0}, nx=True)
        self.refresh_queue.enqueue_into(pipe, key, self.refresh_before)

    def delete_commands(self, pipe: Pipeline, key: TokenKey) -> None:
        """Queue the commands of a delete into ``pipe``: hash, index entry, refresh job."""
        redis_key = self.keys.token(key)
        pipe.delete(redis_key)
        pipe.zrem(self.keys.index, redis_key)
        pipe.delete(self.keys.want(key))
        self.refresh_queue.cancel(pipe, key)

    # -- invalidate: a token an API rejected (the twins run the script, then ask the workers) ------

    def invalidate_call(
        self, key: TokenKey, rejected: str, stored: bytes | None
    ) -> tuple[list[str], list[EncodableT]] | None:
        """KEYS and ARGV of :data:`~tokencache.core.scripts.INVALIDATE` if ``stored`` (the hash's ``token``
        field as read just before) holds the ``rejected`` access token; None if it does not.

        The comparison is made here, on the decrypted value (an encrypted field never equals the token
        itself), and the script compares the field with the very value read, so a token replaced
        in between is left alone. EncryptionError if this process cannot decrypt the field.
        """
        if stored is None:
            return None
        redis_key = self.keys.token(key)
        try:
            text = stored.decode()
        except UnicodeDecodeError:
            return None  # not a token tokencache wrote: not the reported one
        if not hmac.compare_digest(self.encryption.open(text, redis_key).encode(), rejected.encode()):
            return None
        keys = [redis_key, self.keys.index, self.keys.invalidated(key), self.keys.audit]
        entry = self.audit.entry(Event.INVALIDATED, key, outcome=Invalidation.EVICTED.value, token=rejected)
        args: list[EncodableT] = [stored, int(self.clock()), int(INVALIDATE_EVERY * 1000)]
        return keys, [*args, *self.audit.script_args(entry)]

    def invalidate_again(self, reply: object, attempt: int) -> bool:
        """Whether the twin reads the ``token`` field again after the script's ``reply`` to its
        ``attempt``-th call: only after 0 ("not the stored token"), which a rekey between the read and the
        script also answers (the same token, re-encrypted), and at most :data:`INVALIDATE_ATTEMPTS` calls."""
        return Invalidation.of_reply(reply) is Invalidation.NOT_STORED and attempt < INVALIDATE_ATTEMPTS

    def invalidate_retry(
        self, key: TokenKey, rejected: str, stored: bytes | None, reread: bytes | None
    ) -> tuple[list[str], list[EncodableT]] | None:
        """The script's call again if the field changed from ``stored`` to ``reread`` and still holds the
        ``rejected`` token (a rekey rewrote it); None if the "not the stored token" answer stands (it was
        replaced by another token, deleted, or left as it was)."""
        if reread is None or reread == stored:
            return None
        return self.invalidate_call(key, rejected, reread)

    def invalidated(self, key: TokenKey, token: object, reply: object) -> Invalidation:
        """What the script did, counted and logged (the token masked); this process's near cache forgets
        the key whatever it did, since a report says its copy may be stale."""
        result = Invalidation.of_reply(reply)
        metrics.record_invalidation(result)
        self._forget(key)
        shown = mask(rejected_token(token))
        if result is Invalidation.EVICTED:
            log.warning("an API rejected %s of %s: evicted, refetching it for the fleet", shown, key.encode())
        else:
            log.debug("an API rejected %s of %s: %s", shown, key.encode(), result)
        return result

    def refetch_commands(self, pipe: Pipeline, key: TokenKey) -> None:
        """After an eviction: ask the workers for the token now (inside a MULTI), as a miss would.

        The want marker tells the fleet's ``for_scope`` misses that the workers were asked already. No
        index placeholder: a ``delete()`` that landed since the eviction stands (the job finds the token
        unindexed and ends).
        """
        pipe.set(self.keys.want(key), "invalidated", px=int(WANT_TTL * 1000))
        self.refresh_queue.enqueue_into(pipe, key, self.refresh_before)

    def usable_token(self, redis_key: str, raw: dict[bytes, bytes]) -> Token | None:
        """The token in an HGETALL reply if it may be handed out (Freshness.INVALID inlined: hot path).

        Neither an expired token nor one an API rejected (evicted, its refetch on the way)."""
        if not raw or REJECTED in raw:
            return None
        try:
            token = self._token_memo.parse(redis_key, raw)
        except MalformedRecord as e:
            bad_keys.skip(redis_key, f"malformed token hash: {e}", "find")
            return None
        if token.expires - self.clock() <= EXPIRY_SKEW:
            return None
        return token

    def parse_record(
        self, key: TokenKey, raw: dict[bytes, bytes], where: metrics.Where = "record"
    ) -> TokenRecord | None:
        """The record in an HGETALL reply, valid or not (None if the hash is gone or malformed)."""
        if not raw:
            return None
        redis_key = self.keys.token(key)
        try:
            token, unreadable = read_fields(raw, redis_key=redis_key, ring=self.encryption)
        except MalformedRecord as e:
            bad_keys.skip(redis_key, f"malformed token hash: {e}", where)
            return None
        bad_keys.good(redis_key)
        return TokenRecord(key, token, Bookkeeping.of(raw), key_id(raw[b"token"].decode()), unreadable)

    def read_error(
        self, client: Redis | AsyncRedis, redis_key: str, error: RedisError, where: metrics.Where
    ) -> RedisUnavailableError:
        """The error to raise for a failed read of one token key: WrongTypeError naming the key (logged
        once, counted) if it holds another type, else the server's error."""
        if is_wrong_type(error):
            bad_keys.skip(redis_key, WRONG_TYPE, where)
            return WrongTypeError(f"{redis_key!r}: {WRONG_TYPE}")
        return unavailable(client, error)

    # -- listing: what a page of the index becomes ----------------------------

    def index_pages(self, size: int) -> Iterator[tuple[int, int]]:
        """ZRANGE bounds that read an index of ``size`` entries :data:`INDEX_PAGE` at a time.

        One page is one round trip of bounded size: listing a large fleet neither blocks Redis
        nor holds the whole index in memory.
        """
        for start in range(0, size, INDEX_PAGE):
            yield start, start + INDEX_PAGE - 1

    def page_records(self, members: list[bytes], replies: list[Raw | RedisError]) -> Iterator[TokenRecord]:
        """The records of one page of index members and their HGETALL replies (errors as replies).

        A member whose hash is gone (expired since it was indexed) is skipped. So is one that is not a
        token key, one whose hash is malformed and one that holds another type (WRONGTYPE): those are
        reported (:data:`~tokencache.app.reads.bad_keys`), and the listing goes on with the others.
        """
        for member, raw in zip(members, replies, strict=True):
            key = self._listed_key(member)
            if key is None:
                continue
            if isinstance(raw, RedisError):  # only WRONGTYPE: the twins raised any other error
                bad_keys.skip(self.keys.token(key), WRONG_TYPE, "listing")
                continue
            found = self.parse_record(key, raw, "listing")
            if found is not None:
                yield found

    def _listed_key(self, member: bytes) -> TokenKey | None:
        """The TokenKey of an index member, or None (reported) if it is not one: repair drops it."""
        key = self.keys.index_member(member)
        if key is None:
            bad_keys.skip(member.decode(errors="backslashreplace"), self.junk_reason, "listing")
        return key

    @property
    def junk_reason(self) -> str:
        """Why an index member that is not a token key of this namespace is skipped."""
        return f"not a token key of namespace {self.keys.namespace!r}, in its index (repair drops it)"

    def listable(self, found: TokenRecord, now: float) -> bool:
        """Whether ``tokens()`` lists a record: only a token that may still be handed out.

        One this process cannot decrypt is skipped and reported (logged once, counted) like a bad key:
        one token encrypted with a key this process lacks must not stop a listing.
        """
        if found.unreadable is not None:
            bad_keys.skip(self.keys.token(found.key), str(found.unreadable), "listing")
            return False
        if found.bookkeeping.rejected_at is not None:
            return False
        return found.token.freshness(self.refresh_before, now) is not Freshness.INVALID

    @contextmanager
    def fetch_wait(self) -> Iterator[None]:
        """Time a caller's wait for the fleet's fetch into the metrics, as a success or a failure."""
        started = time.monotonic()
        try:
            yield
        except TokenCacheError:
            metrics.observe_fetch_wait(time.monotonic() - started, ok=False)
            raise
        metrics.observe_fetch_wait(time.monotonic() - started, ok=True)

    # -- the near cache --------------------------------------------------------

    near_cache: NearCache | None = None

    def start_near_cache(self, client: Redis | AsyncRedis, near_cache: object) -> None:
        """Give this store a near cache on ``client``'s server if ``near_cache`` is True."""
        enabled = check_flag("near_cache", near_cache)
        self.near_cache = NearCache(client, self.keys.token_prefix) if enabled else None

    def _forget(self, key: TokenKey) -> None:
        """Drop ``key`` from the near cache at once: this process reads its own writes."""
        redis_key = self.keys.token(key)
        bad_keys.good(redis_key)  # rewritten or deleted by this process: report it again if it goes bad
        if self.near_cache is not None:
            self.near_cache.invalidate([redis_key])


def rejected_token(token: object) -> str:
    """The access token an ``invalidate()`` reports: a Token's, or the string itself (checked)."""
    return check_access_token(token.token if isinstance(token, Token) else token)


# -- what a for_scope miss decides (tokencache.app.fleet and tokencache.aio.fleet do its I/O) --

REPORTED = (RefreshError, ConfigurationError)
"""Errors of a local fetch that the fleet is told about, so its waiters fail at once instead of timing out."""


def timeout_error(store: StoreCore, key: TokenKey, timeout: float, fetches_itself: bool) -> FetchTimeoutError:
    """The error a waiter raises, saying what to check."""
    if fetches_itself:
        hint = (
            "this process holds the account's credentials, but another fetch held the token's lock "
            "and never stored a result: is the token endpoint answering?"
        )
    else:
        hint = (
            f"the fetch was handed to the refresh workers on queue {store.refresh_queue.name!r}: are "
            f"'tokencache worker' processes running there, with credentials for account {key.account!r}?"
        )
    return FetchTimeoutError(f"no token for {store.keys.token(key)!r} within {timeout:g}s; {hint}")


def fetch_failed(store: StoreCore, key: TokenKey, error: str) -> RefreshError:
    """The error a waiter raises when the fleet's fetch of ``key`` failed."""
    return RefreshError(f"fetching {store.keys.token(key)!r} failed: {error}")


def held_back(store: StoreCore, key: TokenKey, hold_ms: int) -> RateLimitedError | None:
    """The error of a fetch the account's hold forbids (PTTL of ``{ns}:backoff:{account}``), or None."""
    if hold_ms <= 0:  # -2: no hold; -1 cannot happen (always written with PX)
        return None
    return RateLimitedError(
        f"the token endpoint rate-limited account {key.account!r}: no request for "
        f"{store.keys.token(key)!r} before {hold_ms / 1000:.1f}s from now",
        hold_ms / 1000,
    )


def hold_of(error: Exception) -> float | None:
    """How long the fleet holds off the account after a failed fetch: a rate-limited answer's hold."""
    return error.hold() if isinstance(error, RateLimitedError) else None


def account_arg(key: TokenKey) -> str | None:
    """The Token.account of a freshly fetched token (``default`` is stored as None)."""
    return None if key.account == DEFAULT_ACCOUNT else key.account


def message_error(message: dict[str, Any] | None) -> str | None:
    """The fetch error a wake-up message carries (None for a success, a timeout or a non-message)."""
    if message is None or message["type"] != "message":
        return None
    return parse(message["data"])


class Move(Enum):
    """What a miss does after one look at the cache."""

    DONE = "done"  # the token is there
    FETCH = "fetch"  # this process holds the credentials: fetch under the token's lock
    ASK = "ask"  # ask the worker pool (once per want marker), then wait


class FleetFetchCore:
    """The decisions of one ``for_scope`` miss, shared by the sync and the asyncio fetch (no I/O)."""

    def __init__(self, store: StoreCore, key: TokenKey, timeout: float) -> None:
        self.store, self.key, self.timeout = store, key, timeout
        self.owner = uuid.uuid4().hex
        self.deadline = time.monotonic() + timeout

    @cached_property
    def fetches_itself(self) -> bool:
        """Whether this process holds the account's credentials (looked up once, and only if needed)."""
        return self.store.sources.has(self.key.account)

    def next_move(self, token: Token | None, error: bytes | None) -> Move:
        """After a look at the token and at the fleet's last fetch error: done, fail, fetch or ask.

        The error key outlives the failed fetch by ``ERROR_TTL``, so a miss that comes late still
        fails at once instead of fetching again or waiting out its timeout.
        """
        if token is not None:
            return Move.DONE
        if error is not None:
            raise fetch_failed(self.store, self.key, error.decode(errors="replace"))
        return Move.FETCH if self.fetches_itself else Move.ASK

    def wait_time(self) -> float:
        """Seconds to wait for a wake-up before looking again; raises once ``timeout`` is spent."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.timed_out()
        return min(FLEET_POLL, left)

    def timed_out(self) -> FetchTimeoutError:
        """The error of a caller whose ``timeout`` ran out, saying what to check."""
        return timeout_error(self.store, self.key, self.timeout, self.fetches_itself)
