"""A local stand-in for Google's OAuth2 token endpoint and the GCE metadata server.

tokencache refreshes tokens through real google-auth; tests (ours and our users') need those
refreshes to happen offline, fast, countable and able to fail on demand. One threaded stdlib
HTTP server answers:

    POST /token                    jwt-bearer (service-account keys) and refresh_token grants
    GET  /                         metadata root (google-auth pings it to detect GCE)
    GET  /computeMetadata/v1/...   default service account token, info, email; project id
    GET  /tokeninfo?access_token=  Google-style tokeninfo for tokens this emulator issued
    GET  /stats, POST /stats/reset request counters
    GET  /config, POST /config     read or change EmulatorConfig at runtime

Issued tokens are opaque (``ya29.emu-...``) and kept in memory until they expire.
Access tokens and private keys are never logged.

The parts, lowest first: :mod:`.constants` and :mod:`.config`; :mod:`.messages` (request,
reply and grant-error shapes); :mod:`.registry` (keys, users, issued tokens, counters);
:mod:`.jwt` (assertion checks); :mod:`.app` (the endpoints' behaviour); :mod:`.httpd` (the
HTTP server around it); :mod:`.server` (``Emulator``) and :mod:`.cli` (``tokencache
emulator``). Only the names below are public.
"""

from __future__ import annotations

from .cli import run_emulator
from .config import EmulatorConfig
from .constants import (
    DEFAULT_ACCOUNT_EMAIL,
    DEFAULT_SCOPES,
    GRANT_KINDS,
    JWT_BEARER,
    PROJECT_ID,
    TOKEN_PREFIX,
)
from .server import Emulator

__all__ = [
    "DEFAULT_ACCOUNT_EMAIL",
    "DEFAULT_SCOPES",
    "GRANT_KINDS",
    "JWT_BEARER",
    "PROJECT_ID",
    "TOKEN_PREFIX",
    "Emulator",
    "EmulatorConfig",
    "run_emulator",
]
