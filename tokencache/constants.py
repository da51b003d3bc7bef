"""Every timing and sizing constant of tokencache, with the reason for its value.

They are tied to each other: a lock is renewed for as long as its fetch runs, a refresh
killed mid-fetch must be retried inside the refresh margin, a graceful stop must
outlast a job. Those ties are written down once, in :data:`INVARIANTS`, and
checked when this module is imported, so a change that breaks one fails at once
(and in ``tests/test_constants.py``) instead of as a rare lost token.

Units are seconds unless a name says otherwise. Nothing here is read from the
environment: the knobs users set live in :mod:`tokencache.env`.
"""

from __future__ import annotations

from collections.abc import Callable

# -- tokens --------------------------------------------------------------------

DEFAULT_REFRESH_BEFORE = 10
"""Seconds before ``expires`` that a token's refresh job runs, unless configured otherwise (Goth's 10 s)."""

EXPIRY_SKEW = 1
"""Seconds before ``expires`` at which a token is already treated as expired.

``EXPIREAT`` works in whole seconds and a caller needs a moment to use the
token, so a token in its last second is not handed out."""

MAX_EXPIRES = 253_402_300_799
"""The latest ``expires`` a Token accepts: 9999-12-31T23:59:59Z. Python's ``datetime`` (through which a
refresh is scheduled with RQ) ends in year 9999, so a later time fails deep inside ``store()`` (OSError,
OverflowError) instead of at construction; no real token lives anywhere near that long."""

# -- the token endpoint ----------------------------------------------------------

FETCH_TIMEOUT = 4.0
"""Seconds one token request may take. google-auth's own default is 120 s, far longer than the
refresh margin: a hung request would let the token expire and hold the refresh lock past its TTL."""

# -- locks and fleet-wide fetches --------------------------------------------------

LOCK_TTL = 0.5
"""A token's lock is a lease: it lapses this long after its holder's last renewal. The holder renews
it every :data:`LOCK_RENEW_EVERY` for as long as its fetch and write run (however long the endpoint
takes), so only a dead holder's lock lapses, and it lapses within this: the start of the recovery
budget (:data:`RECOVERY_BUDGET`)."""

LOCK_RENEW_EVERY = 0.125
"""How often a holder renews its leases (one thread per process renews them all). A quarter of
:data:`LOCK_TTL`: a lease survives renewals lost to a short stall; one that lapses anyway (a
process stalled longer than the lease) costs a second fetch of the token, never a wrong token."""

JOB_DISPATCH = 0.1
"""Allowance for an enqueued refresh to reach its fetch: an idle worker's blocking pop returns at
once, then RQ prepares the job and the job reads the token and takes its lock (milliseconds each)."""

RECOVERY_BUDGET = 2.0
"""Seconds from the death of the process fetching a token (a SIGKILL mid-fetch) to another worker's
fetch of it: its lease lapses (:data:`LOCK_TTL`), the next repair pass (:data:`REPAIR_INTERVAL`)
sees a started job with a free lock and re-enqueues it, and an idle worker takes it
(:data:`JOB_DISPATCH`)."""

WANT_TTL = 2 * (FETCH_TIMEOUT + 1.0)
"""How long one request to the workers stands before a waiter may repeat it (a lost job, a dead pool):
two bounded fetches and their writes, so a slow fetch is not asked for again while it runs."""

FLEET_POLL = 0.5
"""Seconds between a waiter's fallback looks at the cache (a bound, not the normal wake-up, which is
the fetch's published message)."""

SUBSCRIBE_WAIT = 1.0
"""Longest wait for the confirmation of a waiter's SUBSCRIBE, so it listens before it looks."""

ERROR_MESSAGE_LIMIT = 500
"""Characters of a fetch error kept in Redis and published to waiters (an endpoint's error page is
not worth more)."""

ERROR_TTL = 2.0
"""Seconds a failed fetch's error is kept: waiters that subscribed after it was published still see
it, and callers in that window fail at once instead of stampeding a failing endpoint."""

INVALIDATE_ATTEMPTS = 3
"""Times ``invalidate()`` runs its compare-and-evict script when the ``token`` field changed between its
read and the script but still decrypts to the rejected token (a ``tokencache rekey`` re-encrypted it in
between). Each retry needs another such rewrite within one round trip: a rekey rewrites a token once, so
two attempts would do; the third covers a rekey racing a second one (two operators), and the bound
keeps a field rewritten in a loop by someone with the key from holding a caller forever."""

INVALIDATE_EVERY = 30.0
"""Seconds during which a token key, once an API's rejection (401) has evicted its token, refuses another
eviction (``{ns}:invalidated:…``, ``SET NX PX``). A genuine revocation is replaced at once; an API that
rejects *every* token (a wrong audience, scope or project) then costs Google at most one token request
per key per window (120 an hour) instead of one per rejected call of every process, and the fleet a
miss of one fetch's length per window."""

# -- the refresh job ---------------------------------------------------------------

RQ_SCHEDULER_POLL = 1.0
"""How often RQ's scheduler moves due jobs to the queue (RQ's own default; scores are whole seconds,
so a job may start up to this much early)."""

JOB_TIMEOUT = 60
"""Seconds RQ lets one refresh job run; every fetch in it is bounded far below that."""

JOB_FAILURE_TTL = 24 * 3600
"""How long a refresh that gave up stays in RQ's failed registry for operators to see."""

EARLY_RUN = 2.0
"""Seconds before ``refresh_at`` at which a run still counts as due (RQ may start jobs ~1 s early)."""

MIN_DELAY = 1.0
"""The shortest wait before a job runs again, so nothing can make a worker fetch in a tight loop."""

BUSY_RETRY = 1.0
"""Seconds to wait before looking again when another process holds the token's lock."""

BACKOFF_BASE = 1.0
"""The first retry's delay after a failed fetch; each further failure doubles it (with jitter)."""

BACKOFF_CAP = 30.0
"""The longest delay between retries of a failing refresh, unless ``TOKENCACHE_BACKOFF_CAP`` says otherwise.

A refresh never gives up on a transient failure, so this is also how long a fleet may wait for its
token after the endpoint comes back (plus one scheduler poll and a fetch). 30 s: Google's own
clients cap their backoff at 32-64 s; half a minute keeps that recovery short and costs a failing
endpoint two to four requests a minute per token once at the cap (equal jitter: 15 to 30 s apart),
more while the retries are pulled in to land before the current token expires."""

RETRY_FLOOR = 0.5
"""The shortest delay before a failed refresh is retried, and how long before the current token's
last usable second a retry is pulled in to land: the retry itself takes a moment."""

RETRY_AFTER_MAX = 300.0
"""The longest ``Retry-After`` of a rate-limited answer that is honoured as given: longer than any
Google sends for token requests (seconds to a minute), short enough that a bogus header cannot park
a fleet's refreshes for hours."""

RATE_LIMIT_MIN = 2.0
"""The shortest hold after a rate-limited answer (none or a tiny ``Retry-After``): long enough that
a fleet's misses cannot turn a rate limit into a loop of requests."""

HOLD_SPREAD = 1.0
"""A refresh waiting out its account's hold runs up to this much after it ends, at random, so the
tokens of one account do not all ask again in the same instant."""

# -- batched refreshes (tokencache.worker.batch) ----------------------------------------

LOOKAHEAD = 5.0
"""Seconds ahead of its refresh time that a token may be refreshed by another token's job: long
enough to gather a burst that comes due over a few seconds, short enough to cost an hour-long
token nothing that matters."""

EARLY_SHARE = 0.1
"""A token is batched at most this share of its own refresh interval (``refresh_at -
refreshed_at``) early too, so short-lived tokens are not fetched more often for being batched: one
refreshed every 3 s may be batched 0.3 s early, one refreshed every hour the whole look-ahead. A
token no worker has fetched yet (stored by an app: no ``refreshed_at``) is batched only once due."""

BATCH_SECONDS = 20.0
"""A batch claims no new token after this long, so the job ends well inside :data:`JOB_TIMEOUT`."""

BATCH_MAX_SCAN = 2000
"""Index entries one batch looks at, at most: entries it skips must not make a round cost more and more."""

STOP_AFTER_FAILURES = 3
"""Member fetches failing in a row after which a batch stops: the members' own jobs back off."""

# -- repair (tokencache.worker.repair) --------------------------------------------------

REPAIR_INTERVAL = 1.0
"""Seconds between repair passes of the fleet (the pool's supervision loop ticks once a second)."""

AUDIT_AHEAD = 60.0
"""Seconds the audit stream's last id may be ahead of ``tokencache status``'s clock before it says the
stream is wedged or forged. ``XADD *`` ids are the Redis server's milliseconds, and a fleet's clocks
agree within well under a second under NTP: a minute leaves room for a badly kept host, while an id
written on purpose to stop the trail (the largest, ``18446744073709551615-…``) is ages ahead."""

REPAIR_GRACE = 3.0
"""Seconds a refresh may be late before repair steps in: the scheduler polls every second with
whole-second scores, so anything later than this is not normal jitter."""

DEAD_AFTER = 0.5
"""A job "started" this long ago whose token lock is free has lost its worker: a live refresh takes
the lock in its first milliseconds and renews it to its end. (Judging a live job dead costs a
second run, which finds the token fresh or the lock busy.)"""

REPAIR_SCAN = 1000
"""Due index entries one repair pass looks at, at most."""

# -- the worker pool (tokencache.worker.pool) and status ---------------------------------

RESEND_STOP_EVERY = 2.0
"""Seconds after a stop request, and between repeats, at which workers still running but not busy
are asked again (an RQ worker loses a stop signal that lands during its start-up)."""

STOP_TIMEOUT = JOB_TIMEOUT + 10
"""Seconds a graceful stop may take (a running refresh finishing) before workers are killed."""

POOL_TTL = 5.0
"""A pool whose heartbeat is older than this is dead (it beats every :data:`REPAIR_INTERVAL`)."""

FORGET_POOL = 3600.0
"""A dead pool's entry is dropped after this long, so ``status`` stops reporting it."""

SCHEDULER_SEEN_DEAD = 5.0
"""``tokencache status`` reports a dead RQ scheduler at most this long after it died."""

METRICS_HOST = "127.0.0.1"
"""Where ``tokencache worker --metrics-port`` listens unless ``--metrics-host`` says otherwise: the page
is unauthenticated and each scrape reads Redis, so only this host reaches it until an operator opens it."""

STATUS_RUN = 2.0
"""Seconds one ``tokencache status`` may take from its start to its answer on a loaded host (about
0.5 s measured: Python start-up, imports and a dozen reads)."""

SCHEDULER_TTL = 3.0
"""``status`` counts RQ's scheduler as running only while its lock's holder beat this recently.

RQ's scheduler writes ``last_heartbeat`` into its own hash every :data:`RQ_SCHEDULER_POLL`, so
3 s is two missed beats; its lock, by contrast, outlives a SIGKILL by up to 61 s. The last beat
comes before the death, so a status run reading after 3 s says "not running", and that answer is
out by 3 + :data:`STATUS_RUN` = 5 s (:data:`SCHEDULER_SEEN_DEAD`)."""

# -- Redis clients --------------------------------------------------------------------

MAX_CONNECTIONS = 50
"""Connections one client opens at most; more concurrent calls wait for one to come free."""

HEALTH_CHECK_INTERVAL = 30
"""Seconds a pooled connection may sit idle before redis-py checks it with a PING on its next use
(a connection cut while idle, by a failover or a firewall, is found before a command is lost on it)."""

SOCKET_TIMEOUT = 5.0
"""Seconds before a Redis call gives up: long enough for a loaded server, short enough for a request."""

FOLLOW_EVERY = 0.5
"""Seconds a connection to a Sentinel-managed primary trusts the sentinels' last word on which node is
the master before it asks again (before its next command). After a failover the old master stays
writable until Sentinel demotes it (8-10 s measured): a write sent to it then is lost, so each
connection checks at most this long after the switch and moves to the new master."""

SENTINEL_TIMEOUT = 1.0
"""Seconds one question to one sentinel may take: a dead sentinel must not stall a command for long
(the others are asked in turn)."""

INDEX_PAGE = 500
"""Index entries read per round trip when listing every token (``tokens()``, ``ls``)."""

MEMO_LIMIT = 4096
"""Entries a key or token memo keeps before it starts over (a process reads far fewer distinct tokens)."""

# -- the near cache (tokencache.app.nearcache) ----------------------------------------

NEAR_MAX_ENTRIES = 10_000
"""Tokens one process keeps before it starts over (far more than a process uses)."""

PING_EVERY = 1.0
"""Seconds of silence on the tracking connection after which it is pinged."""

PING_TIMEOUT = 2.0
"""Seconds a ping may go unanswered before the connection counts as lost (and the cache is emptied)."""

LEASE = PING_EVERY + PING_TIMEOUT
"""Seconds since the reader last heard from Redis after which entries are not served."""

RETRY_MIN = 0.05
"""First wait before re-establishing lost tracking; it doubles up to :data:`RETRY_MAX`."""

RETRY_MAX = 5.0
"""Longest wait between attempts to re-establish tracking."""

NEAR_POLL = 0.1
"""How often the reader thread looks up from the socket (to notice close() and ping deadlines)."""

NEAR_READ_TIMEOUT = 5.0
"""Socket timeout of the tracking connection: longer than a ping's round trip, bounded for close()."""

# -- adapters ---------------------------------------------------------------------------

RECHECK = 1.0
"""Seconds between re-reads of a token inside its refresh margin (its refresh is due but not seen yet)."""


# -- the audit trail (tokencache.core.audit) -------------------------------------------------

AUDIT_MAXLEN = 10_000
"""Entries the audit stream keeps by default (``TOKENCACHE_AUDIT_MAXLEN``): about 1.7 MB of Redis at
165 bytes an entry (measured: ``python -m bench --only audit``), less than 1,000 cached tokens take,
and a day of history for a fleet of 400 tokens that live an hour (one fetch each an hour)."""

AUDIT_MAXLEN_LIMIT = 10_000_000
"""The most entries ``TOKENCACHE_AUDIT_MAXLEN`` may ask for: about 1.7 GB of Redis at 165 bytes an entry,
more than a trail needs (a year of a 1,000-token fleet's hourly fetches is 8.8 million) and less than
any Redis can be asked to hold by mistake. Without a bound, 2**63 and up were accepted and every audited
write failed inside Redis (MAXLEN out of range)."""

AUDIT_FOLLOW_BLOCK = 1.0
"""Seconds one read of ``tokencache audit --follow`` blocks for new entries: short, so that Ctrl-C and a
dead server are noticed at once; the loop reads again right away."""

FINGERPRINT_LENGTH = 12
"""Hex characters of a token's fingerprint (a sha256 prefix): 48 bits, so that the few tokens a key gets
in a day practically never share one, and far too little to recover a token from (it is a hash)."""

# -- the ties between them ------------------------------------------------------------------

INVARIANTS: dict[str, Callable[[], bool]] = {
    "a lease survives two lost renewals": lambda: LOCK_TTL >= 3 * LOCK_RENEW_EVERY,
    "a refresh killed mid-fetch is fetched again within the recovery budget": (
        lambda: LOCK_TTL + REPAIR_INTERVAL + JOB_DISPATCH <= RECOVERY_BUDGET
    ),
    "a dead job is judged dead by the time its lease has lapsed": lambda: DEAD_AFTER <= LOCK_TTL,
    "two kills early in their fetches and a fetch at the budget fit the default margin": (
        lambda: (
            RQ_SCHEDULER_POLL + 2 * (LOCK_TTL + REPAIR_INTERVAL + JOB_DISPATCH) + FETCH_TIMEOUT
            < DEFAULT_REFRESH_BEFORE - EXPIRY_SKEW
        )
    ),
    "a request to the workers outlives a fetch at the budget": lambda: WANT_TTL > FETCH_TIMEOUT,
    "a kept error is seen by a waiter's fallback poll": lambda: ERROR_TTL > FLEET_POLL,
    "a job may run early by one scheduler poll and still count as due": lambda: EARLY_RUN > RQ_SCHEDULER_POLL,
    "repair waits out the scheduler's normal jitter": lambda: (
        REPAIR_GRACE > RQ_SCHEDULER_POLL + EARLY_RUN / 2
    ),
    "repair steps in before a token due now expires": (
        lambda: REPAIR_GRACE + REPAIR_INTERVAL < DEFAULT_REFRESH_BEFORE - EXPIRY_SKEW
    ),
    "a dead job is judged only after its lock would have been taken": lambda: DEAD_AFTER < REPAIR_GRACE,
    "a batch stops claiming with time left for its last fetch": (
        lambda: BATCH_SECONDS + FETCH_TIMEOUT + LOCK_TTL < JOB_TIMEOUT
    ),
    "backoff starts below its cap": lambda: 0 < RETRY_FLOOR <= BACKOFF_BASE <= BACKOFF_CAP,
    "a rate limit's hold has room between its floor and its ceiling": (
        lambda: 0 < RATE_LIMIT_MIN <= RETRY_AFTER_MAX and HOLD_SPREAD > 0
    ),
    "a rate limit holds off the misses' fail-fast window at least": lambda: RATE_LIMIT_MIN >= ERROR_TTL,
    "tracking is retried soon, then less often": lambda: 0 < RETRY_MIN < RETRY_MAX,
    "nothing reruns in a tight loop": lambda: MIN_DELAY > 0 and BUSY_RETRY > 0,
    "a graceful stop outlasts a running job": lambda: STOP_TIMEOUT > JOB_TIMEOUT,
    "a live pool beats several times per heartbeat lifetime": lambda: POOL_TTL >= 2 * REPAIR_INTERVAL,
    "a dead pool is reported before it is forgotten": lambda: FORGET_POOL > POOL_TTL,
    "a live scheduler beats at least twice per heartbeat lifetime": (
        lambda: SCHEDULER_TTL >= 2 * RQ_SCHEDULER_POLL
    ),
    "a dead scheduler is reported in time, status's own run included": (
        lambda: SCHEDULER_TTL + STATUS_RUN <= SCHEDULER_SEEN_DEAD
    ),
    "the near cache's lease covers one ping and its answer": lambda: LEASE >= PING_EVERY + PING_TIMEOUT,
    "the near cache's reader looks up between pings": lambda: NEAR_POLL < PING_EVERY,
    "a follow read returns before the client's socket times out": lambda: AUDIT_FOLLOW_BLOCK < SOCKET_TIMEOUT,
}
"""Each tie between the constants above, in words, with its check."""


def broken_invariants() -> list[str]:
    """The invariants that do not hold (empty for the values above)."""
    return [name for name, holds in INVARIANTS.items() if not holds()]


if _broken := broken_invariants():  # not ``assert``: python -O must not skip it
    raise RuntimeError(f"tokencache.constants: broken invariants: {', '.join(_broken)}")
