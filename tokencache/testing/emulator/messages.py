"""The HTTP-agnostic shapes every part of the emulator speaks: a request, a reply, a refused grant.

The application logic (:mod:`.app`) takes a ``_Request`` and returns a ``_Reply`` without
knowing about sockets, so it stays testable and the HTTP plumbing (:mod:`.httpd`) stays a thin
adapter. ``_GrantError`` carries Google's OAuth2 error shape from wherever a grant is refused
(JWT checks included) to the one place that turns it into a reply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

NO_STORE = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))


class _GrantError(Exception):
    """A token request the emulator refuses, in the shape of Google's OAuth2 errors."""

    def __init__(self, error: str, description: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    query: dict[str, str]
    headers: Message
    body: bytes


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, payload: Any, headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
        return cls(status, json.dumps(payload).encode(), "application/json", headers)

    @classmethod
    def text(cls, status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
        # The real metadata server labels plain values application/text; google-auth only cares
        # that it is not application/json.
        return cls(status, text.encode(), "application/text", headers)

    @classmethod
    def error(cls, status: int, error: str, description: str) -> _Reply:
        return cls.json(status, {"error": error, "error_description": description}, NO_STORE)


def _parse_form(request: _Request) -> dict[str, str]:
    """Token requests are form-encoded; JSON bodies are accepted too, as Google does."""
    content_type = request.headers.get_content_type()
    text = request.body.decode("utf-8", errors="strict")
    if content_type == "application/json":
        data = json.loads(text or "{}")
        if not isinstance(data, dict):
            raise ValueError("JSON body must be an object")
        return {str(k): str(v) for k, v in data.items()}
    return {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}
