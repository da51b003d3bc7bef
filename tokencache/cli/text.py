"""Untrusted text made safe to print: one escaping for every table, line and log of the CLI.

A ``sub`` is often chosen by a user (domain-wide delegation) and error texts come from the token
endpoint. Printed raw, a tab or newline in one would forge a column or a row of the tab-separated
output, and an escape sequence would reach the operator's terminal.
"""

from __future__ import annotations

import unicodedata

__all__ = ["cell", "printable"]

_INVISIBLE_FILLERS = frozenset("\u115f\u1160\u3164\uffa0")
"""Hangul fillers: letters by category (Lo), yet they print as blank space a name could hide behind."""
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _unprintable(char: str) -> bool:
    """Every control, format, private-use, surrogate and unassigned character (category C*: C0 and C1
    controls, DEL, bidi overrides, zero-width characters, tag characters), the line and paragraph
    separators (Zl, Zp) and the invisible fillers: what reorders, hides or forges text in a terminal."""
    category = unicodedata.category(char)
    return category[0] == "C" or category in ("Zl", "Zp") or char in _INVISIBLE_FILLERS


def printable(text: str) -> str:
    """``text`` with control and invisible format characters escaped (``\\t``, ``\\x1b``, ``\\u202e``)."""
    if text.isprintable() and not _INVISIBLE_FILLERS.intersection(text):  # the common case, fast
        return text
    return "".join(_escape(char) if _unprintable(char) else char for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def cell(text: str) -> str:
    """A table cell: :func:`printable`, backslashes doubled (a stored ``\\t`` is not an escaped tab)."""
    return printable(text.replace("\\", "\\\\"))
