"""The exceptions tokencache raises: one base class and a short tree below it.

Driver errors (redis-py, google-auth) are translated with ``raise X(...) from e``
so callers only ever need ``except TokenCacheError``.
"""

from __future__ import annotations

from tokencache.constants import RATE_LIMIT_MIN, RETRY_AFTER_MAX

__all__ = [
    "HOPELESS",
    "ConfigurationError",
    "CredentialsRejectedError",
    "EncryptionError",
    "FetchTimeoutError",
    "RateLimitedError",
    "RedisUnavailableError",
    "RefreshError",
    "RefusedJobError",
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


class RateLimitedError(RefreshError):
    """The token endpoint asked for fewer requests (429, or 403 rate limit exceeded): the fleet holds off."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        """The answer's ``Retry-After`` in seconds, if it had one."""

    def hold(self, at_least: float = RATE_LIMIT_MIN) -> float:
        """Seconds every fetcher of the account waits: the ``Retry-After`` (within sane bounds), or longer."""
        return min(RETRY_AFTER_MAX, max(self.retry_after or 0.0, at_least, RATE_LIMIT_MIN))


class CredentialsRejectedError(RefreshError):
    """The token endpoint refused the credentials (a deleted key, a bad grant): retrying is futile."""


class FetchTimeoutError(TokenCacheError, TimeoutError):
    """Waiting for the fleet to fetch a token took longer than the timeout."""


class RefusedJobError(TokenCacheError):
    """A refresh worker refused a job it must not run (another namespace's, or not a refresh): nothing ran."""


class ConfigurationError(TokenCacheError, ValueError):
    """The environment or the arguments describe an unusable setup."""


class EncryptionError(TokenCacheError):
    """A stored token this process cannot decrypt: its key is not in the ring, or it fails authentication."""

    def __init__(self, message: str, key_id: str) -> None:
        super().__init__(message)
        self.key_id = key_id
        """The id of the key the token is encrypted with (never the key)."""

    def __reduce__(self) -> tuple[type[EncryptionError], tuple[str, str]]:
        return type(self), (str(self), self.key_id)


class UnknownAccountError(ConfigurationError, LookupError):
    """No credentials are configured for the account a token belongs to."""


HOPELESS = (ConfigurationError, CredentialsRejectedError)
"""Fetch errors after which retrying cannot help until someone fixes the setup: the refresh stops."""
