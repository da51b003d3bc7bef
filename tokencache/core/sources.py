"""Where tokens come from: one google-auth credentials source per account.

Only refresh workers (and apps that choose to hold keys) need this module's
configuration. Accounts:

* ``default`` — ``GOOGLE_APPLICATION_CREDENTIALS`` (any file google-auth
  accepts), else google-auth's ADC chain (gcloud's file, the metadata server
  at ``GCE_METADATA_HOST``);
* every service-account key file in ``TOKENCACHE_CREDENTIALS`` (files or
  folders of ``*.json``, ``os.pathsep``-separated) as its ``client_email``.

google-auth does the protocol (JWT-bearer assertions, refresh tokens, the
metadata server); we only choose the credentials, bound the request time and
turn the result into a :class:`Token`.

A failure is sorted here, once, for every fetcher (refresh jobs, batches, apps
that hold keys): :class:`RateLimitedError` for a rate-limited answer (429, or
the 403 "rate limit exceeded" Google may send instead; counted in
``tokencache_endpoint_rate_limited_total``), :class:`CredentialsRejectedError`
when the endpoint answered that the grant itself is bad (``invalid_grant`` for
a deleted key, ``unauthorized_client``...: retrying cannot help), and a plain
:class:`RefreshError` for everything transient (network, timeouts, 5xx).
"""

from __future__ import annotations

import calendar
import copy
import email.utils
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import google.auth
import google.auth.exceptions
import google.auth.transport.requests
import google.oauth2.credentials
import requests
from google.auth import impersonated_credentials
from google.auth.credentials import Credentials, Scoped
from google.oauth2 import service_account

from tokencache import env, metrics
from tokencache.constants import FETCH_TIMEOUT
from tokencache.errors import (
    ConfigurationError,
    CredentialsRejectedError,
    RateLimitedError,
    RefreshError,
    UnknownAccountError,
)
from tokencache.keys import DEFAULT_ACCOUNT, TokenKey
from tokencache.token import Token

__all__ = ["Sources", "default_sources"]

log = logging.getLogger(__name__)


class _RateLimited(google.auth.exceptions.TransportError):
    """A rate-limited answer, raised from inside google-auth's request so that nothing there retries it."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)  # type: ignore[no-untyped-call]
        self.retry_after = retry_after


_RATE_LIMIT_WORDS = ("ratelimitexceeded", "resource_exhausted")
"""What a 403 body says when it means "slow down" (``rate_limit_exceeded``, ``rateLimitExceeded``,
``userRateLimitExceeded``, "Rate Limit Exceeded"; RESOURCE_EXHAUSTED from IAM), spaces and
underscores aside."""


def _rate_limited(status: int, body: bytes) -> bool:
    if status == 429:
        return True
    squeezed = body.decode(errors="replace").lower().replace(" ", "").replace("_", "")
    return status == 403 and any(word.replace("_", "") in squeezed for word in _RATE_LIMIT_WORDS)


def _retry_after(value: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.fromtimestamp(now, UTC)).total_seconds())


class _BoundedRequest(google.auth.transport.requests.Request):
    """google-auth's requests transport, bounded to one fetch's time budget.

    google-auth retries 429/5xx answers of the token endpoint itself, sleeping
    1 s, then 2 s, between tries. That would hide failures from our bookkeeping
    and stretch one fetch past the refresh lock's TTL, so such an answer raises
    a TransportError here, which google-auth does not retry: our refresh job's
    own backoff (recorded in the token's hash) takes over. A rate-limited one
    (429, or 403 "rate limit exceeded") raises :class:`_RateLimited` with its
    ``Retry-After``, which the whole fleet then honours.
    """

    def __init__(self, budget: float, session: requests.Session) -> None:
        super().__init__(session=session)
        self._deadline = time.monotonic() + budget

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Any = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise google.auth.exceptions.TransportError(f"no time left for a request to {url}")
        bounded = left if timeout is None else min(timeout, left)
        response = super().__call__(  # type: ignore[no-untyped-call]
            url, method=method, body=body, headers=headers, timeout=bounded, **kwargs
        )
        if response.status in (429, 403) and _rate_limited(response.status, response.data):
            wait = _retry_after(response.headers.get("Retry-After"), time.time())
            raise _RateLimited(f"{url} answered HTTP {response.status} (rate limited)", wait)
        if response.status >= 500:
            raise google.auth.exceptions.TransportError(f"{url} answered HTTP {response.status}")
        return response


def _named_accounts(spec: str) -> dict[str, Path]:
    """``client_email`` -> key file for every entry of ``TOKENCACHE_CREDENTIALS``.

    A file named outright must be a service-account key; in a folder, other
    JSON files (an authorized-user file beside the keys, say) are skipped.
    """
    accounts: dict[str, Path] = {}
    for entry in filter(None, spec.split(os.pathsep)):
        path = Path(entry)
        if path.is_dir():
            for file in sorted(path.glob("*.json")):
                email = _client_email(file)
                if email is None:
                    log.warning("%s: skipping %s, not a service-account key file", env.CREDENTIALS, file)
                else:
                    accounts[email] = file
        elif path.is_file():
            email = _client_email(path)
            if email is None:
                raise ConfigurationError(f"{path} is not a service-account key file (no client_email)")
            accounts[email] = path
        else:
            raise ConfigurationError(
                f"{env.CREDENTIALS} names {entry!r}, which is neither a file nor a folder"
            )
    return accounts


def _client_email(path: Path) -> str | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigurationError(f"cannot read key file {path}: {e}") from e
    email = info.get("client_email") if isinstance(info, dict) else None
    if not isinstance(email, str) or info.get("type") != "service_account":
        return None
    return email


def _adc_path() -> str:
    from google.auth import _cloud_sdk

    return str(_cloud_sdk.get_application_default_credentials_path())


def _authorized_user(info: dict[str, Any]) -> Credentials:
    # google-auth ignores token_uri in authorized-user files; the emulator (and private endpoints) need it.
    creds = google.oauth2.credentials.Credentials.from_authorized_user_info(info)
    if info.get("token_uri"):
        creds = creds.with_token_uri(info["token_uri"])
    return cast(Credentials, creds)


_LOADERS: dict[str, Callable[[dict[str, Any]], Credentials]] = {
    "service_account": service_account.Credentials.from_service_account_info,
    "authorized_user": _authorized_user,
    "impersonated_service_account": (
        impersonated_credentials.Credentials.from_impersonated_service_account_info
    ),
}


def _load_file(path: Path) -> Credentials:
    """A key file of a type we know, loaded by that type's own constructor.

    google-auth deprecates its any-type loader because a file of an unexpected
    type can make it run commands or call arbitrary URLs; we accept only these.
    """
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigurationError(f"cannot read key file {path}: {e}") from e
    kind = info.get("type") if isinstance(info, dict) else None
    loader = _LOADERS.get(kind) if isinstance(kind, str) else None
    if loader is None:
        raise ConfigurationError(
            f"{path} has credential type {kind!r}; tokencache loads {', '.join(sorted(_LOADERS))}"
        )
    try:
        return loader(info)
    except (ValueError, KeyError) as e:
        raise ConfigurationError(f"{path} is not a valid {kind} file: {e}") from e


@dataclass
class Sources:
    """The accounts this process can fetch tokens for, and the fetching."""

    files: Mapping[str, Path] = field(default_factory=dict)
    """Account name -> key file (``default`` included when it comes from a file)."""
    use_adc: bool = True
    """Whether ``default`` falls back to google-auth's ADC chain when no file names it."""
    timeout: float = FETCH_TIMEOUT
    _base: dict[str, Credentials] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _session: requests.Session = field(default_factory=requests.Session, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Sources:
        """Read the accounts from ``GOOGLE_APPLICATION_CREDENTIALS`` and ``TOKENCACHE_CREDENTIALS``."""
        environ = os.environ if environ is None else environ
        files = _named_accounts(environ.get(env.CREDENTIALS, ""))
        default_file = environ.get(env.GOOGLE_APPLICATION_CREDENTIALS)
        if default_file:
            if not Path(default_file).is_file():
                raise ConfigurationError(
                    f"{env.GOOGLE_APPLICATION_CREDENTIALS}={default_file!r} is not a readable file"
                )
            files[DEFAULT_ACCOUNT] = Path(default_file)
        return cls(files=files)

    def accounts(self) -> list[str]:
        """Names of the accounts configured here (``default`` may also come from ADC)."""
        names = set(self.files)
        if self.use_adc:
            names.add(DEFAULT_ACCOUNT)
        return sorted(names)

    def has(self, account: str) -> bool:
        """Whether this process can fetch tokens of ``account`` itself, judged without any network call.

        ADC counts only when it is visibly configured (gcloud's file, or an
        explicit ``GCE_METADATA_HOST``): probing for a metadata server costs
        seconds on machines that have none, and an app without credentials
        should hand the fetch to the workers instead of waiting on that.
        """
        if account in self.files:
            return True
        if account != DEFAULT_ACCOUNT or not self.use_adc:
            return False
        return bool(os.environ.get("GCE_METADATA_HOST")) or Path(_adc_path()).is_file()

    def _load(self, account: str) -> Credentials:
        if account in self.files:
            return _load_file(self.files[account])
        if account == DEFAULT_ACCOUNT and self.use_adc:
            creds, _ = google.auth.default(request=_BoundedRequest(self.timeout, self._session))
            return creds
        raise UnknownAccountError(
            f"no credentials for account {account!r} (known: {', '.join(self.accounts()) or 'none'}). "
            f"The 'default' account comes from {env.GOOGLE_APPLICATION_CREDENTIALS} or google-auth's ADC; "
            f"others from the key files in {env.CREDENTIALS}, each named by its client_email."
        )

    def base(self, account: str) -> Credentials:
        """The account's unscoped credentials, loaded once per process."""
        with self._lock:
            if account not in self._base:
                try:
                    self._base[account] = self._load(account)
                except google.auth.exceptions.GoogleAuthError as e:
                    raise ConfigurationError(f"cannot load credentials of account {account!r}: {e}") from e
            return self._base[account]

    def credentials(self, key: TokenKey) -> Credentials:
        """Credentials for the key's scopes (and subject, for domain-wide delegation).

        A copy each time: google-auth credentials keep the token they fetched.
        Authorized-user credentials carry the scopes granted at login and are
        used as they are.
        """
        base = self.base(key.account)
        if isinstance(base, Scoped):
            creds = cast(Credentials, base.with_scopes(key.scopes))  # type: ignore[no-untyped-call]
        else:
            creds = copy.copy(base)
        if key.sub is None:
            return creds
        if not hasattr(creds, "with_subject"):
            raise ConfigurationError(
                f"account {key.account!r} ({type(creds).__module__}.{type(creds).__name__}) cannot "
                f"act for a subject (sub={key.sub!r}): domain-wide delegation needs a service-account key"
            )
        return cast(Credentials, creds.with_subject(key.sub))

    def fetch(self, key: TokenKey, *, scope: str | None = None, account: str | None = None) -> Token:
        """Ask the account's source for a new token (blocking, at most ``timeout`` per request)."""
        creds = self.credentials(key)
        started = time.monotonic()
        try:
            creds.refresh(_BoundedRequest(self.timeout, self._session))
        except google.auth.exceptions.GoogleAuthError as e:
            metrics.observe_endpoint(time.monotonic() - started, ok=False)
            raise _sorted(e, f"token request for {key.encode()!r} failed: {e}") from e
        metrics.observe_endpoint(time.monotonic() - started, ok=True)
        if not creds.token or creds.expiry is None:
            raise RefreshError(f"token request for {key.encode()!r} returned no token or no expiry")
        return Token(
            token=creds.token,
            type="Bearer",
            scope=scope or key.scope,
            expires=calendar.timegm(creds.expiry.utctimetuple()),
            sub=key.sub,
            account=account,
        )


_REJECTIONS = frozenset(
    {"invalid_grant", "invalid_client", "unauthorized_client", "invalid_scope", "invalid_request",
     "unsupported_grant_type", "access_denied"}
)  # fmt: skip
"""OAuth2 ``error`` codes (RFC 6749 5.2) of an answer that refuses the grant itself."""
_IAM_REJECTIONS = frozenset({"PERMISSION_DENIED", "NOT_FOUND", "INVALID_ARGUMENT", "UNAUTHENTICATED"})
"""The same for Google's JSON errors (``{"error": {"status": ...}}``), as IAM answers impersonation."""


def _sorted(error: google.auth.exceptions.GoogleAuthError, message: str) -> RefreshError:
    """The tokencache error for a failed fetch: rate-limited, rejected for good, or transient."""
    limited = _in_chain(error, _RateLimited)
    if limited is not None:
        metrics.record_rate_limited()
        return RateLimitedError(message, limited.retry_after)
    if isinstance(error, google.auth.exceptions.RefreshError) and not error.retryable and _rejection(error):
        return CredentialsRejectedError(message)
    return RefreshError(message)


def _in_chain(error: BaseException, kind: type[_RateLimited]) -> _RateLimited | None:
    """``error`` or the first of its causes of ``kind`` (the metadata path wraps transport errors twice)."""
    seen: BaseException | None = error
    for _ in range(8):  # a cycle-safe bound: google-auth wraps at most twice
        if seen is None or isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _rejection(error: google.auth.exceptions.RefreshError) -> bool:
    """Whether the endpoint's answer (the error's second argument, in google-auth) refuses the grant."""
    data = error.args[1] if len(error.args) > 1 else None
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except ValueError:
            return False
    code = data.get("error") if isinstance(data, dict) else None
    if isinstance(code, dict):
        return code.get("status") in _IAM_REJECTIONS
    return code in _REJECTIONS


_default: Sources | None = None
_default_lock = threading.Lock()


def default_sources() -> Sources:
    """This process's Sources, read from the environment on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Sources.from_env()
        return _default


def reset_default_sources() -> None:
    """Forget the cached Sources (after the environment changed, e.g. in tests)."""
    global _default
    with _default_lock:
        _default = None
