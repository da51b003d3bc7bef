"""tokencache: one Google OAuth2 access token per (account, scope, sub) for a whole fleet.

Tokens live in Redis; RQ workers refresh each one ``refresh_before`` seconds
ahead of its expiry. See docs/design.md for the contract and README.md for use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tokencache.errors import (
    ConfigurationError,
    CredentialsRejectedError,
    EncryptionError,
    FetchTimeoutError,
    RateLimitedError,
    RedisUnavailableError,
    RefreshError,
    RefusedJobError,
    TokenCacheError,
    UnknownAccountError,
    WrongTypeError,
)
from tokencache.keys import TokenKey, normalize_scope
from tokencache.token import Freshness, Token, mask

if TYPE_CHECKING:
    from tokencache.adapters.google_auth import Credentials
    from tokencache.adapters.requests_auth import BearerAuth
    from tokencache.app.defaults import (
        default_store,
        delete,
        find,
        for_scope,
        invalidate,
        reset_default_store,
        store,
        tokens,
    )
    from tokencache.app.tokenstore import TokenStore
    from tokencache.crypto import Keyring

_LAZY = {
    "TokenStore": "tokencache.app.tokenstore",
    "Keyring": "tokencache.crypto",
    "store": "tokencache.app.defaults",
    "find": "tokencache.app.defaults",
    "for_scope": "tokencache.app.defaults",
    "delete": "tokencache.app.defaults",
    "invalidate": "tokencache.app.defaults",
    "tokens": "tokencache.app.defaults",
    "default_store": "tokencache.app.defaults",
    "reset_default_store": "tokencache.app.defaults",
    "Credentials": "tokencache.adapters.google_auth",
    "BearerAuth": "tokencache.adapters.requests_auth",
}
"""Public names loaded on first use (redis, RQ, google-auth and requests come with them), so that
importing a leaf such as ``tokencache.errors``, or the pytest plugin that pytest loads in every run,
does not load the whole client."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tokencache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [  # noqa: RUF022 - grouped by purpose, as the reader meets them
    # the model
    "Token",
    "TokenKey",
    "Freshness",
    "mask",
    "normalize_scope",
    # the store
    "TokenStore",
    "Keyring",
    # module-level calls on a default store from the environment
    "store",
    "find",
    "for_scope",
    "delete",
    "invalidate",
    "tokens",
    "default_store",
    "reset_default_store",
    # google-auth and requests adapters
    "Credentials",
    "BearerAuth",
    # errors
    "TokenCacheError",
    "RedisUnavailableError",
    "RefreshError",
    "RateLimitedError",
    "CredentialsRejectedError",
    "FetchTimeoutError",
    "ConfigurationError",
    "UnknownAccountError",
    "WrongTypeError",
    "RefusedJobError",
    "EncryptionError",
]

__version__ = "0.1.0"
