"""tokencache: one Google OAuth2 access token per (account, scope, sub) for a whole fleet.

Tokens live in Redis; RQ workers refresh each one ``refresh_before`` seconds
ahead of its expiry. See docs/design.md for the contract and README.md for use.
"""

from __future__ import annotations

from tokencache.adapters.google_auth import Credentials
from tokencache.adapters.requests_auth import BearerAuth
from tokencache.errors import (
    ConfigurationError,
    FetchTimeoutError,
    RedisUnavailableError,
    RefreshError,
    TokenCacheError,
    UnknownAccountError,
)
from tokencache.keys import TokenKey, normalize_scope
from tokencache.store.defaults import (
    default_store,
    delete,
    find,
    for_scope,
    reset_default_store,
    store,
    tokens,
)
from tokencache.store.tokenstore import TokenStore
from tokencache.token import Freshness, Token, mask

__all__ = [  # noqa: RUF022 - grouped by purpose, as the reader meets them
    # the model
    "Token",
    "TokenKey",
    "Freshness",
    "mask",
    "normalize_scope",
    # the store
    "TokenStore",
    # module-level calls on a default store from the environment
    "store",
    "find",
    "for_scope",
    "delete",
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
    "FetchTimeoutError",
    "ConfigurationError",
    "UnknownAccountError",
]

__version__ = "0.1.0"
