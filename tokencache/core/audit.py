"""The audit trail: one entry per token the fleet's cache gained or lost, in a capped Redis stream.

What is recorded, in ``{ns}:audit`` (see :class:`Event`): a token fetched (by a refresh worker, or by
an app that holds the account's credentials), a token stored by hand (``store()``: the one other way a
token enters the cache), a token evicted because an API rejected it (``invalidate()``), and a refresh
that gave up. Each entry says who (role, host, pid), which key, the token's ``expires`` and a
fingerprint of the token (:func:`~tokencache.token.fingerprint`: a sha256 prefix, never the token).

How it stays true: an entry is appended by the same MULTI/EXEC or Lua script that writes the token
(the stream is one of the script's ``KEYS``), so an entry exists if and only if the write happened: a
refresh that finds its token deleted writes nothing and records nothing; an ``invalidate()`` that
evicted nothing records nothing. Reads (``find()``) append nothing: the hot path is untouched.

What is not recorded: a refresh that failed and will retry. During an outage every failing token
retries every few seconds (up to ``TOKENCACHE_BACKOFF_CAP``): 10,000 tokens would append some 300
entries a second and push every issuance record out of the stream within a minute, so an outage would
erase the very history one wants after it. Retries are counted in the token's hash and in the metrics;
the trail records the give-up, which happens once.

How its size is bounded: ``XADD ... MAXLEN ~ N`` (``TOKENCACHE_AUDIT_MAXLEN``, 0 turns the trail
off). A stream keeps its entries in nodes of up to 100 (``stream-node-max-entries``); with ``~`` Redis
trims only whole nodes, one free each, when the oldest node lies entirely beyond N, so an append costs
O(1) amortized and the stream holds N to N + 100 entries. Exact trimming would mark one entry deleted
inside the oldest node on every append once full, work on every write that frees no memory until the
node is empty anyway. Every entry has the same fields in the same order (:data:`FIELDS`; empty values
where one does not apply), so Redis stores the field names once per node, not once per entry.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, cast

from tokencache import env, metrics
from tokencache.constants import ERROR_MESSAGE_LIMIT
from tokencache.core.pipeline import Pipeline
from tokencache.keys import TokenKey
from tokencache.token import fingerprint, scrub

__all__ = ["FIELDS", "Audit", "Event", "Role", "audit_failed", "flat", "parse_entry", "script_result"]

log = logging.getLogger(__name__)


class Event(enum.StrEnum):
    """What happened to a token in the cache (an entry's ``event``)."""

    FETCHED = "fetched"
    """A new token was fetched from its source and stored for the fleet."""
    STORED = "stored"
    """A caller stored a token it brought (``store()``), not fetched by tokencache."""
    INVALIDATED = "invalidated"
    """An API rejected the token and ``invalidate()`` evicted it (only an eviction is recorded)."""
    GAVE_UP = "gave_up"
    """A refresh stopped for good: an error retrying cannot fix (``error`` says which)."""


class Role(enum.StrEnum):
    """Who appended an entry: the kind of process (an entry's ``role``)."""

    APP = "app"
    WORKER = "worker"
    OPERATOR = "operator"


FIELDS = ("event", "account", "scope", "sub", "outcome", "expires", "fp", "error", "role", "host", "pid")
"""Every entry's fields, always all of them and in this order (see the module docstring for why)."""


def flat(fields: Mapping[str, str]) -> list[str]:
    """A mapping as the alternating names and values a script's ARGV (or XADD) takes."""
    return [item for pair in fields.items() for item in pair]


@dataclass(frozen=True, slots=True)
class Audit:
    """How one store appends to the trail: as which role, and how many entries the stream keeps."""

    maxlen: int
    """Entries the stream keeps, about (``TOKENCACHE_AUDIT_MAXLEN``); 0: nothing is appended."""
    role: Role = Role.APP

    @classmethod
    def from_env(cls, role: Role = Role.APP) -> Audit:
        """``TOKENCACHE_AUDIT_MAXLEN`` (ConfigurationError naming it if it is not a count)."""
        return cls(env.audit_maxlen(), role)

    def as_role(self, role: Role) -> Audit:
        return replace(self, role=role)

    def entry(
        self,
        event: Event,
        key: TokenKey,
        *,
        outcome: str = "",
        token: str | None = None,
        expires: int | None = None,
        error: str = "",
    ) -> dict[str, str]:
        """One entry, its fields in :data:`FIELDS` order: of ``token`` only its fingerprint."""
        return {
            "event": event.value,
            "account": key.account,
            "scope": key.scope,
            "sub": key.sub or "",
            "outcome": outcome,
            "expires": "" if expires is None else str(expires),
            "fp": fingerprint(token) if token else "",
            "error": scrub(error[:ERROR_MESSAGE_LIMIT]),
            "role": self.role.value,
            "host": socket.gethostname(),
            "pid": str(os.getpid()),  # at each entry: an RQ work-horse is a fork
        }

    def append(self, pipe: Pipeline, stream: str, entry: dict[str, str]) -> None:
        """Queue the entry's XADD into ``pipe`` (the write's own transaction); nothing if the trail is off."""
        if self.maxlen:
            pipe.xadd(stream, entry, maxlen=self.maxlen, approximate=True)

    def script_args(self, entry: Mapping[str, str] | None) -> list[str]:
        """The ARGV tail of a script that appends ``entry``: the cap ('0': append nothing), the fields."""
        if entry is None or not self.maxlen:
            return ["0"]
        return [str(self.maxlen), *flat(entry)]


def audit_failed(stream: str, error: object) -> None:
    """Log and count an audit entry Redis refused: the write it rode with stands (see :func:`script_result`).

    Why the write is not failed: a user who may append to the stream (every role does) can make every
    later ``XADD *`` fail (an entry with the largest id, ``MAXLEN 0``); failing the write then would let
    it stop every store and refresh of the fleet, after each had written (EXEC and Lua do not roll back).
    """
    metrics.record_audit_failure()
    log.warning(
        "the audit entry was not appended to %s (the write itself went through): %s; a stream whose last "
        "id is ahead of the clock is wedged or forged: tokencache status flags it",
        stream,
        scrub(str(error)[:ERROR_MESSAGE_LIMIT]),
    )


def script_result(reply: object, stream: str) -> int:
    """The result of a script that appends an audit entry with ``redis.pcall``: the integer it returns, or
    ``{result, error}`` when the XADD failed (then logged and counted by :func:`audit_failed`)."""
    if isinstance(reply, list):
        result, error = reply
        audit_failed(stream, error.decode() if isinstance(error, bytes) else error)
        return int(result)
    return int(cast(int, reply))


def parse_entry(entry_id: bytes, raw: Mapping[bytes, bytes]) -> dict[str, Any]:
    """An XRANGE/XREAD entry as plain data: its id, ``at`` (the id's time, ISO 8601 UTC) and the fields.

    A field missing (an entry written by hand, or by a later version with other fields) reads as empty.
    """
    ident = entry_id.decode()
    millis = int(ident.partition("-")[0])
    at = datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    fields = {name: raw.get(name.encode(), b"").decode(errors="replace") for name in FIELDS}
    return {"id": ident, "at": at, **fields}
