"""Untrusted text made safe to print: one escaping for every table, line and log of the CLI.

A ``sub`` is often chosen by a user (domain-wide delegation) and error texts come from the token
endpoint. Printed raw, a tab or newline in one would forge a column or a row of the tab-separated
output, and an escape sequence would reach the operator's terminal.
"""

from __future__ import annotations

import re

__all__ = ["cell", "printable"]

_UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]"
)
"""C0 and C1 controls, DEL, and the invisible format characters that reorder or hide text in a terminal
(bidi overrides, zero-width characters, line and paragraph separators)."""
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def printable(text: str) -> str:
    """``text`` with control and invisible format characters escaped (``\\t``, ``\\x1b``, ``\\u202e``)."""
    return _UNPRINTABLE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def cell(text: str) -> str:
    """A table cell: :func:`printable`, backslashes doubled (a stored ``\\t`` is not an escaped tab)."""
    return printable(text.replace("\\", "\\\\"))
