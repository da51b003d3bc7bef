"""``tokencache audit``: the audit trail (``{ns}:audit``), newest last, and ``--follow`` for what comes.

One line per entry, tab-separated (for grep, cut and awk, and so that ``--follow`` can stream; a
table would need every row first), or one JSON object per line with ``--json``. A ``sub`` is often
user-controlled (domain-wide delegation) and an error is an endpoint's text: control characters in
them are escaped (``\\t``, ``\\n``, ``\\x1b``), so that a value can neither forge a row nor reach the
terminal as an escape sequence.

Reading the tail pages backwards (``XREVRANGE``) until it has ``--count`` matching entries, so a
filter never reads more than the stream holds (which ``TOKENCACHE_AUDIT_MAXLEN`` bounds). Following
blocks at most :data:`~tokencache.constants.AUDIT_FOLLOW_BLOCK` per read and resumes after the last
id seen, so nothing appended between two reads is missed and Ctrl-C ends it at once.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO, cast

from redis import Redis

from tokencache.cli.text import cell
from tokencache.constants import AUDIT_FOLLOW_BLOCK
from tokencache.core.audit import parse_entry
from tokencache.core.connection import redis_errors

__all__ = ["COLUMNS", "Filter", "Printer", "follow", "tail"]

PAGE = 200
"""Entries read per round trip while looking for ``--count`` matches."""

_COLUMNS = {
    "TIME": "at",
    "EVENT": "event",
    "OUTCOME": "outcome",
    "ACCOUNT": "account",
    "SCOPE": "scope",
    "SUB": "sub",
    "ROLE": "role",
    "HOST": "host",
    "PID": "pid",
    "EXPIRES": "expires",
    "FP": "fp",
    "ERROR": "error",
}
"""The text output's columns, and the field each shows."""
COLUMNS = tuple(_COLUMNS)

Entry = dict[str, Any]
RawEntry = tuple[bytes, dict[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Filter:
    """Which entries to show (None: any)."""

    account: str | None = None
    scope: str | None = None
    event: str | None = None

    def __call__(self, entry: Entry) -> bool:
        return all(
            wanted is None or entry[name] == wanted
            for name, wanted in (("account", self.account), ("scope", self.scope), ("event", self.event))
        )


def _typed(entry: Entry) -> Entry:
    """Empty fields as None, numbers as numbers (what ``--json`` prints)."""
    typed = {name: value if value != "" else None for name, value in entry.items()}
    for name in ("expires", "pid"):
        value = typed[name]
        typed[name] = int(value) if value is not None and value.isdigit() else value
    return typed


def tail(redis: Redis, stream: str, count: int, wanted: Filter) -> tuple[list[Entry], str]:
    """The newest ``count`` entries ``wanted`` accepts, oldest first; and the newest id of the stream
    (``0-0`` if it is empty or missing), after which to follow."""
    found: list[Entry] = []
    page = _page(redis, stream, "+")
    newest = page[0][0].decode() if page else "0-0"
    while page and len(found) < count:
        found.extend(entry for entry in map(_parse, page) if wanted(entry))
        page = _page(redis, stream, "(" + page[-1][0].decode())  # older than the last one read
    return found[:count][::-1], newest


def _page(redis: Redis, stream: str, upper: str) -> list[RawEntry]:
    with redis_errors(redis):
        return cast(list[RawEntry], redis.xrevrange(stream, max=upper, min="-", count=PAGE))


def follow(redis: Redis, stream: str, after: str, wanted: Filter) -> Iterator[Entry]:
    """Entries appended after id ``after``, as they come (until interrupted)."""
    while True:
        with redis_errors(redis):
            reply = redis.xread({stream: after}, count=PAGE, block=int(AUDIT_FOLLOW_BLOCK * 1000))
        for _, entries in cast(list[tuple[bytes, list[RawEntry]]], reply or []):
            for raw in entries:
                after = raw[0].decode()
                entry = _parse(raw)
                if wanted(entry):
                    yield entry


def _parse(raw: RawEntry) -> Entry:
    return parse_entry(*raw)


def _expires_at(value: str) -> str:
    if not value.isdigit():
        return value
    return datetime.fromtimestamp(int(value), UTC).isoformat().replace("+00:00", "Z")


def _line(entry: Entry) -> str:
    cells = {**entry, "expires": _expires_at(entry["expires"])}
    return "\t".join(cell(cells[name]) or "-" for name in _COLUMNS.values())


class Printer:
    """Prints entries as they come: one JSON object a line, or a text line (a header before the first)."""

    def __init__(self, *, as_json: bool, out: TextIO = sys.stdout) -> None:
        self.render: Callable[[Entry], str] = (lambda e: json.dumps(_typed(e))) if as_json else _line
        self.header = not as_json
        self.out = out

    def __call__(self, entries: Iterable[Entry]) -> None:
        for entry in entries:
            if self.header:
                print("\t".join(COLUMNS), file=self.out)
                self.header = False
            print(self.render(entry), file=self.out, flush=True)  # flushed: --follow into a pipe
