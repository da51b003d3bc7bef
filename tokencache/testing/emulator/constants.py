"""Names and values of the emulated Google project, shared by every part of the emulator.

Tests (ours and our users') compare what google-auth returns with these, so they are public:
the project id, the metadata server's default account, the prefix of every issued token and
the grant kinds that /stats counts.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_ACCOUNT_EMAIL",
    "DEFAULT_SCOPES",
    "GRANT_KINDS",
    "JWT_BEARER",
    "PROJECT_ID",
    "TOKEN_PREFIX",
]

PROJECT_ID = "tokencache-emulator"
DEFAULT_ACCOUNT_EMAIL = f"default@{PROJECT_ID}.iam.gserviceaccount.com"
DEFAULT_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
TOKEN_PREFIX = "ya29.emu-"  # noqa: S105 - a public prefix, not a secret
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GRANT_KINDS = ("jwt-bearer", "refresh_token", "metadata")
