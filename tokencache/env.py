"""Environment variables tokencache reads, each defined once.

Modeled on google-auth's ``environment_vars``: the names live here with a
docstring each; everything else imports them instead of repeating strings.
"""

from __future__ import annotations

import os

from tokencache import constants
from tokencache.constants import DEFAULT_REFRESH_BEFORE
from tokencache.errors import ConfigurationError
from tokencache.validate import check_namespace

REDIS_URL = "TOKENCACHE_REDIS_URL"
"""Where tokens and refresh jobs live (``redis://``, ``rediss://``, ``unix://``)."""

NAMESPACE = "TOKENCACHE_NAMESPACE"
"""Prefix of every key tokencache writes (RQ's ``rq:`` keys aside), and the isolation boundary of the
credentials: a worker refreshes only its own namespace's tokens."""

REFRESH_BEFORE = "TOKENCACHE_REFRESH_BEFORE"
"""Seconds before ``expires`` at which the refresh job runs."""

REFRESH_BATCH = "TOKENCACHE_REFRESH_BATCH"
"""How many other due tokens a refresh job fetches at once (0: each job fetches only its own token)."""

BACKOFF_CAP = "TOKENCACHE_BACKOFF_CAP"
"""Longest delay, in whole seconds, between the retries of a failing refresh (default 30)."""

AUDIT_MAXLEN = "TOKENCACHE_AUDIT_MAXLEN"
"""Entries the audit stream ``{ns}:audit`` keeps (about; 0 turns the audit trail off)."""

QUEUE = "TOKENCACHE_QUEUE"
"""Name of the RQ queue that carries refresh jobs (default: the namespace)."""

NEAR_CACHE = "TOKENCACHE_NEAR_CACHE"
"""``1`` turns on the near cache of the default stores (see :mod:`tokencache.app.nearcache`)."""

ENCRYPTION_KEYS = "TOKENCACHE_ENCRYPTION_KEYS"
"""Opt-in encryption at rest: ``id:key`` entries (AES-256 keys in base64), the first encrypts, all decrypt
(see :mod:`tokencache.crypto`); unset: tokens are stored in plaintext."""

CREDENTIALS = "TOKENCACHE_CREDENTIALS"
"""Extra key files or folders of them (``os.pathsep``-separated), one account each."""

GOOGLE_APPLICATION_CREDENTIALS = "GOOGLE_APPLICATION_CREDENTIALS"
"""google-auth's own variable: the key file of the ``default`` account."""

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_NAMESPACE = "tokencache"
DEFAULT_QUEUE = DEFAULT_NAMESPACE
"""The default namespace's queue (the queue follows the namespace: :func:`queue_name`)."""
DEFAULT_REFRESH_BATCH = 8
DEFAULT_BACKOFF_CAP = int(constants.BACKOFF_CAP)
DEFAULT_AUDIT_MAXLEN = constants.AUDIT_MAXLEN


def redis_url() -> str:
    """The Redis URL from the environment, or the local default."""
    return os.environ.get(REDIS_URL) or DEFAULT_REDIS_URL


def namespace() -> str:
    """The key namespace from the environment, or ``tokencache`` (ConfigurationError for a name that is
    not allowed: see :func:`tokencache.validate.check_namespace`)."""
    raw = os.environ.get(NAMESPACE) or DEFAULT_NAMESPACE
    try:
        return check_namespace(raw)
    except ValueError as e:
        raise ConfigurationError(f"{NAMESPACE}={raw!r}: {e}") from None


def queue_name(ns: str | None = None) -> str:
    """The refresh queue's name: ``TOKENCACHE_QUEUE``, else the namespace (``ns``, or the
    environment's), so that each namespace's jobs reach only the workers of that namespace."""
    return os.environ.get(QUEUE) or ns or namespace()


def refresh_before() -> int:
    """The refresh margin from the environment, validated as whole seconds >= 0."""
    return _count(REFRESH_BEFORE, DEFAULT_REFRESH_BEFORE, "a whole number of seconds")


def refresh_batch() -> int:
    """The refresh jobs' batch concurrency from the environment, validated as a whole number >= 0."""
    return _count(REFRESH_BATCH, DEFAULT_REFRESH_BATCH, "a whole number")


def backoff_cap() -> float:
    """The refresh workers' backoff cap from the environment: whole seconds, at least the first delay."""
    cap = _count(BACKOFF_CAP, DEFAULT_BACKOFF_CAP, "a whole number of seconds")
    if cap < constants.BACKOFF_BASE:
        raise ConfigurationError(
            f"{BACKOFF_CAP}={cap} must be at least {constants.BACKOFF_BASE:g} (the first retry's delay)"
        )
    return float(cap)


def audit_maxlen() -> int:
    """How many entries the audit stream keeps, from the environment: a whole number >= 0 (0: no trail)."""
    maxlen = _count(AUDIT_MAXLEN, DEFAULT_AUDIT_MAXLEN, "a whole number of entries")
    if maxlen > constants.AUDIT_MAXLEN_LIMIT:
        raise ConfigurationError(
            f"{AUDIT_MAXLEN}={maxlen} is more than {constants.AUDIT_MAXLEN_LIMIT:,} entries (about 1.7 GB of "
            "Redis): copy the trail out (tokencache audit --follow --json) to keep more"
        )
    return maxlen


def _count(name: str, default: int, what: str) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not {what}") from None
    if value < 0:
        raise ConfigurationError(f"{name}={raw!r} must not be negative")
    return value


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def near_cache() -> bool:
    """Whether the default stores keep a near cache (``TOKENCACHE_NEAR_CACHE``, off by default)."""
    raw = os.environ.get(NEAR_CACHE, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigurationError(f"{NEAR_CACHE}={raw!r} must be 1 or 0 (true/false, yes/no, on/off)")
