"""What a finished fetch tells the processes waiting for it, on ``{ns}:fetched:{key}``.

The message never carries the token: waiters read it with ``find()``. An
error message carries the failure so waiters fail at once instead of timing out.
"""

from __future__ import annotations

import json

from tokencache.constants import ERROR_MESSAGE_LIMIT

__all__ = ["error_message", "ok_message", "parse"]


def ok_message() -> str:
    return '{"ok": true}'


def error_message(error: str) -> str:
    return json.dumps({"ok": False, "error": error[:ERROR_MESSAGE_LIMIT]})


def parse(data: bytes | str) -> str | None:
    """None for success, else the error text (an unreadable message counts as success: re-read and see)."""
    try:
        message = json.loads(data)
    except ValueError:
        return None
    if isinstance(message, dict) and message.get("ok") is False:
        return str(message.get("error", "unknown error"))
    return None
