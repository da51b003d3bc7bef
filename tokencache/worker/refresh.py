"""The refresh job: what an RQ worker runs when a token's refresh comes due.

It must be safe to run twice at once and to run early or late, because RQ
gives no exactly-once promise: the scheduler polls once a second with
whole-second scores (so a job can start up to a second early), repair may
re-enqueue a job it believes lost, and a SIGKILLed worker leaves its job
half-done. So the job takes the token's lock, re-reads the token, fetches only
if a refresh is really due, writes only if the token was not deleted
meanwhile, and always ends by telling RQ when to run it next.

A job that refreshed its token then refreshes the other tokens that come due
within a few seconds, concurrently (see :mod:`tokencache.worker.batch`): one fetch per
job cannot keep up with a fleet's tokens all coming due in the same second.

A failed fetch is retried with capped backoff for as long as the token is indexed
(cached, or asked for), however long the outage and whether or not the token's hash
has expired meanwhile: a fleet that only calls ``find()`` has nobody else to bring
its token back. Only a hopeless error (configuration, credentials the endpoint
rejects) stops the job, which then fails into RQ's failed registry with the reason
in its meta. A rate-limited answer puts the whole account on hold for its
``Retry-After`` (``{ns}:backoff:{account}``), which every fetcher honours.

A refresh reads only the hash's clear fields (scope, account, expiry, bookkeeping), never the
access token, so a token this worker cannot decrypt (encrypted with a key its ring lacks, or
failing authentication) is refreshed all the same, with a warning: the new token, written
under this worker's ring, replaces what nobody could use.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from rq import get_current_job
from rq.job import Job

from tokencache import env, metrics
from tokencache.app.core import TokenRecord
from tokencache.app.tokenstore import TokenStore
from tokencache.constants import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    BUSY_RETRY,
    EARLY_RUN,
    ERROR_MESSAGE_LIMIT,
    EXPIRY_SKEW,
    HOLD_SPREAD,
    LOCK_TTL,
    MIN_DELAY,
    RETRY_FLOOR,
)
from tokencache.core.audit import Audit, Role
from tokencache.core.locks import Lock
from tokencache.core.queue import RefreshJob, job_target, repeat_current_job
from tokencache.core.sources import Sources, default_sources
from tokencache.errors import (
    HOPELESS,
    ConfigurationError,
    RateLimitedError,
    RefreshError,
    RefusedJobError,
    WrongTypeError,
)
from tokencache.keys import DEFAULT_ACCOUNT, TokenKey
from tokencache.outcomes import Outcome
from tokencache.token import Token, mask
from tokencache.worker.batch import refresh_due
from tokencache.worker.writes import hold_left, record_failure, replace_if_indexed

__all__ = ["Refresher", "backoff", "refresh"]

log = logging.getLogger(__name__)

JOB_CLASS = "tokencache.scheduling.RefreshJob"
"""The job class a worker must load refresh jobs with (``rq worker --job-class``): the stable path."""


_DOUBLINGS = 30
"""Failures beyond which the delay stops doubling (it reached any cap long before): a refresh that
never gives up must not overflow a float after a long outage."""


def backoff(failures: int, time_left: float, cap: float = BACKOFF_CAP) -> float:
    """Delay before retry number ``failures``: exponential with equal jitter, at most ``cap``.

    While the current token is valid the retry is pulled in to land before it
    expires, so a token is not lost to the wait itself.
    """
    ceiling = min(cap, BACKOFF_BASE * 2 ** min(_DOUBLINGS, max(0, failures - 1)))
    delay = random.uniform(ceiling / 2, ceiling)
    latest = time_left - EXPIRY_SKEW - RETRY_FLOOR
    if latest > 0:
        delay = min(delay, latest)
    return max(RETRY_FLOOR, delay)


@dataclass
class Refresher:
    """One refresh attempt of one token; :meth:`run` returns (outcome, seconds until the next run)."""

    store: TokenStore
    key: TokenKey
    sources: Sources
    owner: str
    failures: int = 0
    """Consecutive failed attempts before this one (kept in the RQ job's meta between runs)."""
    lateness: float | None = None
    """How late this run came after the token's refresh was due (for the lateness metric)."""
    cap: float = BACKOFF_CAP
    """The longest delay between retries (``TOKENCACHE_BACKOFF_CAP``)."""

    def run(self) -> tuple[Outcome, float | None]:
        if not self.store.indexed(self.key):
            return Outcome.DELETED, None
        lock = Lock(self.store.redis, self.store.keys.lock(self.key), LOCK_TTL, owner=self.owner)
        if not lock.acquire():
            return Outcome.BUSY, BUSY_RETRY
        lock.keep()  # a lease: renewed while this run lives, lapsed soon after it dies
        try:
            return self._locked()
        finally:
            lock.release()

    def _locked(self) -> tuple[Outcome, float | None]:
        current = self.store.record(self.key)
        now = self.store.clock()
        if current is not None:  # the hash's count outlives a re-enqueue (a new job has no meta)
            self.failures = max(self.failures, current.bookkeeping.failures)
        if current is not None and current.token.expires_in(now) > EXPIRY_SKEW:
            due = current.bookkeeping.refresh_at or current.token.expires - self.store.refresh_before
            if now < due - EARLY_RUN:
                return Outcome.NOT_DUE, due - now
            self.lateness = now - due
        hold = hold_left(self.store, self.key.account)
        if hold > 0:  # the endpoint rate-limited this account: no request before the hold ends
            return Outcome.HELD_BACK, hold + random.uniform(0, HOLD_SPREAD)
        try:
            token = self.fetch(current)
        except (RefreshError, ConfigurationError) as e:
            return self._failed(current, e)
        if not replace_if_indexed(self.store, self.key, token, outcome=_why(current, now)):
            return Outcome.DELETED, None
        self.failures = 0
        log.info("refreshed %s: %s, expires in %ds", self.key.encode(), mask(token.token), token.expires_in())
        return Outcome.REFRESHED, max(MIN_DELAY, self.store.due_at(token, fetched=True) - self.store.clock())

    def fetch(self, current: TokenRecord | None) -> Token:
        """A new token from the key's source (RefreshError if it lives too short to be worth storing).

        Also a batch member's fetch. A stored token this worker cannot decrypt is refreshed all the same
        (see the module docstring), and said so."""
        if current is not None and current.unreadable is not None:
            log.warning(
                "refreshing %s, whose stored token this worker cannot read: %s",
                self.key.encode(),
                current.unreadable,
            )
        token = self.sources.fetch(self.key, scope=self._scope(current), account=self._account(current))
        if token.expires_in(self.store.clock()) <= EXPIRY_SKEW + 1:
            raise RefreshError(f"the token endpoint returned a token that lives {token.expires_in():.0f}s")
        return token

    def _scope(self, current: TokenRecord | None) -> str:
        return current.token.scope if current is not None else self.key.scope

    def _account(self, current: TokenRecord | None) -> str | None:
        if current is not None:
            return current.token.account
        return None if self.key.account == DEFAULT_ACCOUNT else self.key.account

    def _failed(self, current: TokenRecord | None, error: Exception) -> tuple[Outcome, float]:
        """Record a failed fetch; the delay before the retry. A hopeless error is recorded and raised."""
        self.failures += 1
        if isinstance(error, HOPELESS):
            record_failure(
                self.store, self.key, str(error), gave_up=True,
                current=current.token if current else None, outcome=type(error).__name__,
            )  # fmt: skip
            metrics.record_refresh(Outcome.GAVE_UP)
            log.error("refresh of %s gave up, retrying cannot help: %s", self.key.encode(), error)
            raise error
        left = current.token.expires_in(self.store.clock()) if current is not None else 0.0
        delay = backoff(self.failures, left, self.cap)
        hold = None
        if isinstance(error, RateLimitedError):  # not before its Retry-After, whatever the token's life
            hold = delay = error.hold(at_least=delay)
        record_failure(self.store, self.key, str(error), hold=hold, retry_in=delay)
        log.warning(
            "refresh of %s failed (%d in a row): %s; retrying in %.1fs; current token %s, %.0fs left",
            self.key.encode(),
            self.failures,
            error,
            delay,
            mask(current.token.token) if current else "-",
            left,
        )
        return Outcome.FAILED, delay


def _why(current: TokenRecord | None, now: float) -> str:
    """Why a refresh job fetched, for its audit entry: ``due`` (as scheduled), ``rejected`` (an API
    rejected the cached token), ``missing`` (none usable: an app asked for it, or it expired)."""
    if current is None or current.token.expires_in(now) <= EXPIRY_SKEW:
        return "missing"
    return "rejected" if current.bookkeeping.rejected_at is not None else "due"


def _cap() -> float:
    """``TOKENCACHE_BACKOFF_CAP`` (checked when the pool starts; a plain ``rq worker`` may not have)."""
    try:
        return env.backoff_cap()
    except ConfigurationError as e:
        log.error("%s; using %gs", e, BACKOFF_CAP)
        return BACKOFF_CAP


def _audit() -> Audit:
    """A refresh worker's audit: ``TOKENCACHE_AUDIT_MAXLEN`` (checked when the pool starts; a plain
    ``rq worker`` may not have: a bad value must not stop the refreshes, so it is reported and the default
    used)."""
    try:
        return Audit.from_env(Role.WORKER)
    except ConfigurationError as e:
        log.error("%s; using %d", e, env.DEFAULT_AUDIT_MAXLEN)
        return Audit(env.DEFAULT_AUDIT_MAXLEN, Role.WORKER)


def _mark_gave_up(job: Job, error: Exception) -> None:
    """Say in the job's meta why it stops: repair keeps a deliberate give-up failed, status shows why.

    The meta outlives the token's hash (RQ keeps a failed job a day), and RQ's failure handling
    saves the job without its meta, so what is written here stays."""
    job.meta["gave_up"] = str(error)[:ERROR_MESSAGE_LIMIT]
    job.save_meta()


def _remember_failures(job: Job, failures: int) -> None:
    """Keep the failure count in the job's meta, which RQ saves with the repeat for the next run."""
    if failures:
        job.meta["failures"] = failures
    elif isinstance(job, RefreshJob):
        job.meta.pop("failures", None)  # no meta at all in the common case: its save clears the field
    else:
        job.meta["failures"] = 0  # RQ's own Job never writes an empty meta, so reset it explicitly


def _check_job_class(job: Job) -> None:
    """Refuse to run under RQ's plain Job: such a worker runs any function a job hash names, so it must show
    up (failed registry, ``tokencache status``) instead of refreshing tokens unguarded."""
    if isinstance(job, RefreshJob):
        return
    error = ConfigurationError(
        f"refresh job {job.id} ran as {type(job).__name__}, not {JOB_CLASS}: this worker would run any "
        f"function a job hash names. Start plain rq worker with --job-class {JOB_CLASS} (or "
        f"RQ_JOB_CLASS={JOB_CLASS}); tokencache worker always uses it"
    )
    _mark_gave_up(job, error)
    raise error


def _check_served(job: Job, namespace: str) -> None:
    """Refuse a job of a namespace this worker does not serve (``TOKENCACHE_NAMESPACE``): the worker's
    credentials are its own namespace's, and a token of another namespace must never be fetched with them.

    Such a job reached this queue by hand or through a shared ``TOKENCACHE_QUEUE``. Nothing is read,
    fetched or written, so no batch of that namespace starts either. The job fails into this queue's
    failed registry with the reason (what ``rq info`` and RQ's dashboards show), the warning names both
    namespaces and the job, and ``tokencache_refreshes_total{outcome="refused"}`` counts it. It is not
    marked as given up, so the repair of the token's own namespace re-enqueues it on that namespace's
    queue, where its own workers refresh it.
    """
    served = env.namespace()
    if namespace == served:
        return
    metrics.record_refresh(Outcome.REFUSED)
    log.warning(
        "refused refresh job %s of namespace %r: this worker serves namespace %r (%s)",
        job.id,
        namespace,
        served,
        env.NAMESPACE,
    )
    raise RefusedJobError(
        f"refresh job {job.id} is of namespace {namespace!r}, but this worker serves namespace {served!r} "
        f"({env.NAMESPACE}): refused, nothing fetched or written. Run workers with that namespace's own "
        f"credentials on its own queue ({env.QUEUE} defaults to the namespace)"
    )


def refresh(refresh_before: int, **old_format: object) -> str:
    """RQ entry point (``tokencache.refresh.refresh``): refresh the token named by the job's id.

    A job of a namespace this worker does not serve is refused (:func:`_check_served`).
    A job written before ids named their token (keyword arguments ``namespace account scope sub``) hands
    over to the token's job under its current id and ends.
    """
    job = get_current_job()
    if not isinstance(job, Job):
        raise RuntimeError("tokencache.refresh.refresh runs inside an RQ worker")
    _check_job_class(job)
    namespace, key = job_target(job)
    _check_served(job, namespace)
    store = TokenStore(
        job.connection, namespace=namespace, refresh_before=refresh_before, queue=job.origin, audit=_audit()
    )
    if old_format:
        store.refresh_queue.enqueue(key, refresh_before)
        return Outcome.HANDED_OVER.value
    refresher = Refresher(
        store, key, default_sources(), owner=job.id, failures=int(job.meta.get("failures", 0)), cap=_cap()
    )
    try:
        outcome, delay = refresher.run()
    except HOPELESS as e:
        _mark_gave_up(job, e)
        raise  # a deliberate give-up: RQ's failed registry records it, and repair leaves it there
    except WrongTypeError:
        # Someone else's data at the token's key (reported by the read): never overwrite it, and do not
        # retry against it: repair judges the token again once the key is fixed.
        outcome, delay = Outcome.SKIPPED, None
    except Exception:
        # Anything else (Redis failing over mid-write, a bug) must not end the refresh chain.
        refresher.failures += 1
        outcome, delay = Outcome.CRASHED, backoff(refresher.failures, 0.0, refresher.cap)
        log.exception("refresh of %s crashed; retrying in %.1fs", key.encode(), delay)
    if outcome is Outcome.REFRESHED:
        _refresh_others(store, refresher)
    metrics.record_refresh(outcome, refresher.lateness if outcome is Outcome.REFRESHED else None)
    _remember_failures(job, refresher.failures)
    if delay is not None:
        repeat_current_job(job, delay)
    return outcome.value  # a plain str whatever serializer RQ stores the result with


def _refresh_others(store: TokenStore, refresher: Refresher) -> None:
    """Refresh the other tokens due within the look-ahead (a burst); never lets the own repeat be lost."""

    def fetch(key: TokenKey, current: TokenRecord) -> Token:
        return Refresher(store, key, refresher.sources, owner=refresher.owner).fetch(current)

    try:
        refresh_due(store, fetch, exclude=refresher.key, threads=env.refresh_batch())
    except Exception:
        log.exception("batch after %s failed; the others' own jobs refresh them", refresher.key.encode())
