"""The exceptions tokencache raises: one base class and a short tree below it.

Driver errors (redis-py, google-auth) are translated with ``raise X(...) from e``
so callers only ever need ``except TokenCacheError``.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "FetchTimeoutError",
    "RedisUnavailableError",
    "RefreshError",
    "TokenCacheError",
    "UnknownAccountError",
    "WrongTypeError",
]


class TokenCacheError(Exception):
    """Base class of every error tokencache raises on purpose."""


class RedisUnavailableError(TokenCacheError, ConnectionError):
    """Redis could not be reached or answered with an error."""


class WrongTypeError(RedisUnavailableError):
    """A token's key holds another Redis type than tokencache's hash: someone else's data, left alone."""


class RefreshError(TokenCacheError):
    """A token could not be fetched from its account's source."""


class FetchTimeoutError(TokenCacheError, TimeoutError):
    """Waiting for the fleet to fetch a token took longer than the timeout."""


class ConfigurationError(TokenCacheError, ValueError):
    """The environment or the arguments describe an unusable setup."""


class UnknownAccountError(ConfigurationError, LookupError):
    """No credentials are configured for the account a token belongs to."""
