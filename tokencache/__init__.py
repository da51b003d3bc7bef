"""tokencache: one Google OAuth2 access token per (account, scope, sub) for a whole fleet.

Tokens live in Redis; RQ workers refresh each one ``refresh_before`` seconds
ahead of its expiry. See DESIGN.md for the contract and README.md for use.
"""

from __future__ import annotations

from .defaults import default_store, delete, find, for_scope, reset_default_store, store, tokens
from .errors import (
    ConfigurationError,
    FetchTimeoutError,
    RedisUnavailableError,
    RefreshError,
    TokenCacheError,
    UnknownAccountError,
)
from .keys import TokenKey, normalize_scope
from .token import Freshness, Token, mask
from .tokenstore import TokenStore

__all__ = [
    # errors
    "ConfigurationError",
    "FetchTimeoutError",
    # the model
    "Freshness",
    "RedisUnavailableError",
    "RefreshError",
    "Token",
    "TokenCacheError",
    "TokenKey",
    # the store
    "TokenStore",
    "UnknownAccountError",
    # module-level calls on the default store
    "default_store",
    "delete",
    "find",
    "for_scope",
    "mask",
    "normalize_scope",
    "reset_default_store",
    "store",
    "tokens",
]

__version__ = "0.1.0"
