"""What a refresh run ended with (:class:`Outcome`), what repair decided (:class:`Verdict`), and what a
report of a rejected token did (:class:`Invalidation`).

Both are ``StrEnum``: a member *is* its string, so the values that leave the process stay what they
were as bare strings (RQ's JSON serializer stores the refresh job's return value as a plain
``"refreshed"``; ``Counter`` keys compare and hash equal to ``"held elsewhere"``), while the code
names each one once. Prometheus labels cannot hold spaces: :attr:`Outcome.label` is the label
value of ``tokencache_refreshes_total{outcome}``, spaces written as underscores, and must never
change (dashboards and alerts select on it).
"""

from __future__ import annotations

import enum

__all__ = ["Invalidation", "Outcome", "Verdict"]


class Outcome(enum.StrEnum):
    """How one refresh run (a refresh job's, or a batch member's) ended."""

    REFRESHED = "refreshed"
    """A new token was fetched and written."""
    NOT_DUE = "not due"
    """The token is fresh (someone refreshed it, or the job ran early): only rescheduled."""
    BUSY = "busy"
    """Someone else holds the token's lock: retried shortly."""
    FAILED = "failed"
    """The fetch failed: counted in the hash, retried with backoff."""
    GAVE_UP = "gave up"
    """The fetch failed in a way retrying cannot fix (configuration, credentials rejected): raised."""
    HELD_BACK = "held back"
    """The account's requests are on hold after a rate-limited answer: no request, run again once it ends."""
    DELETED = "deleted"
    """The token was deleted before or while it was refreshed: nothing written, no repeat."""
    CRASHED = "crashed"
    """Anything else went wrong (Redis failing over, a bug): retried with backoff."""
    BATCHED = "batched"
    """A token refreshed by another token's job (the metric's count of batch members refreshed)."""
    SKIPPED = "skipped"
    """A batch left the token to its own job (not plainly due and healthy, or no credentials here); or a
    refresh job found another Redis type at its token's key: left alone, no repeat (repair resumes it)."""
    HELD_ELSEWHERE = "held elsewhere"
    """A batch found the token's lock taken (mostly in flight in a concurrent batch)."""
    HANDED_OVER = "handed over"
    """A job of the old format enqueued the token's job under its current id and ended."""
    REFUSED = "refused"
    """A job of a namespace this worker does not serve (its credentials are not that namespace's): nothing
    read, fetched or written; the job fails into its queue's failed registry, and a warning names it."""

    @property
    def label(self) -> str:
        """The value of the metric label ``outcome`` (``not_due``, ``gave_up``): never changes."""
        return self.value.replace(" ", "_")


class Verdict(enum.StrEnum):
    """What repair does with one due index entry (and the keys of the counts a pass returns)."""

    OK = "ok"
    """Its refresh is on its way (scheduled in time, queued, running, or failed on purpose)."""
    ENQUEUE = "enqueue"
    """Its refresh is lost or overdue: re-enqueue the token's job now."""
    DROP = "drop"
    """Nothing is cached or wanted any more: remove the index entry."""


class Invalidation(enum.StrEnum):
    """What ``invalidate()`` did with a token an API rejected (the label of its metric)."""

    EVICTED = "evicted"
    """It was the stored token: evicted, and refetched once for the fleet."""
    NOT_STORED = "not stored"
    """Another token is stored (already replaced), or none: nothing changed."""
    PENDING = "pending"
    """Another report evicted it already; its refetch is on its way."""
    RATE_LIMITED = "rate limited"
    """The key evicted a token less than ``INVALIDATE_EVERY`` seconds ago: the token stays."""

    @property
    def label(self) -> str:
        """The value of the metric label ``result`` (``not_stored``, ``rate_limited``): never changes."""
        return self.value.replace(" ", "_")

    @classmethod
    def of_reply(cls, reply: object) -> Invalidation:
        """The result a reply of the invalidate script stands for (``tokencache.core.scripts.INVALIDATE``)."""
        return _BY_REPLY[int(reply)]  # type: ignore[call-overload]


_BY_REPLY = (Invalidation.NOT_STORED, Invalidation.EVICTED, Invalidation.PENDING, Invalidation.RATE_LIMITED)
