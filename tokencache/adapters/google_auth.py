"""google-auth credentials that read the fleet's shared token instead of asking Google.

``tokencache.Credentials`` drops into anything that takes google-auth
credentials (``AuthorizedSession``, ``storage.Client(credentials=...)``):
its ``refresh()`` ignores the transport it is given and calls
:meth:`TokenStore.for_scope`, so a fresh cached token costs one Redis round
trip and no Google request, and a miss is fetched once for the whole fleet.

When it re-reads: google-auth treats a token as stale 3m45s before expiry
(``_helpers.REFRESH_THRESHOLD``) and, in its default blocking mode, calls
``refresh()`` before *every* request in that window. Our workers replace the
cached token only ``refresh_before`` seconds ahead of expiry, so reading Redis
earlier would return the same token again and again. Here a token counts as
expired once it is inside the store's ``refresh_before`` margin, and then at
most once per :data:`RECHECK` seconds (the worker's new token lands about a
second after the margin opens; if the workers are down, we do not hammer
Redis), and always one :data:`~tokencache.token.EXPIRY_SKEW` before expiry,
where the store itself stops handing the token out.

What client libraries ask of credentials besides ``refresh()``: google-cloud-core
turns ``client_options={"quota_project_id": ...}`` into ``with_quota_project()``
(google-auth's ``apply()`` then sends ``x-goog-user-project``), reads
``project_id`` when no project is passed (without it, it falls back to ADC, which
an app without credentials does not have), compares ``universe_domain`` with the
client's (google-auth's default, ``googleapis.com``, is right: the fleet's tokens
come from Google's token endpoint) and adds ``get_cred_info()`` to 401/403 errors.
Every copy keeps the quota project and project id.

When a token is rejected: google-auth answers an API's 401 by calling
``refresh()`` and retrying, up to twice. A ``refresh()`` that comes after this
thread sent the token (``before_request``) while no re-read is due (the token
is fresh by the rule above) is that answer, so it reports the token the thread
sent with :meth:`TokenStore.invalidate` (evicted for the whole fleet if it is
still the stored one, once per key per ``INVALIDATE_EVERY`` seconds) and then
waits, up to ``timeout``, for the new token. The thread's own token, not the
one held now: a thread whose 401 arrives after another thread already brought
the new token reports its old one, which compare-and-evict leaves alone. A
token is reported once per sending, and a ``refresh()`` in a thread that sent
nothing only reads, so code that calls ``refresh()`` to get ``token`` (the
``creds.refresh(Request())`` idiom) never evicts anything. If no other token
is to be had (the key evicted one less than ``INVALIDATE_EVERY`` seconds ago:
an API that rejects every token), ``refresh()`` raises a ``RefreshError`` that
says so rather than handing back the rejected token.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Mapping, Sequence

import google.auth.credentials as ga
import google.auth.exceptions

from tokencache.app.defaults import default_store
from tokencache.app.tokenstore import TokenStore
from tokencache.constants import EXPIRY_SKEW, INVALIDATE_EVERY, RECHECK
from tokencache.errors import FetchTimeoutError, RedisUnavailableError, TokenCacheError
from tokencache.token import Token, mask
from tokencache.validate import check_name, check_scopes, check_timeout

__all__ = ["Credentials"]


Scopes = Sequence[str] | str | None


def check_store(store: object) -> TokenStore | None:
    if store is not None and not isinstance(store, TokenStore):
        raise TypeError(f"store must be a tokencache.TokenStore or None, not {type(store).__name__}")
    return store


def _naive_utc(expires: int) -> datetime.datetime:
    """google-auth's ``expiry``: a naive datetime in UTC."""
    return datetime.datetime.fromtimestamp(expires, datetime.UTC).replace(tzinfo=None)


def _timestamp(expiry: datetime.datetime) -> float:
    return expiry.replace(tzinfo=datetime.UTC).timestamp()


def _translate(error: TokenCacheError) -> google.auth.exceptions.RefreshError:
    """The google-auth error callers of ``refresh()`` expect, keeping tokencache's message."""
    retryable = isinstance(error, RedisUnavailableError | FetchTimeoutError)
    return google.auth.exceptions.RefreshError(str(error), retryable=retryable)


def _still_rejected(
    store: TokenStore, info: tuple[str | None, str], sub: str | None, token: Token
) -> Exception:
    """The error of a ``refresh()`` after a rejection that got no other token (the rate limit held)."""
    key = store.keys.token(store.key_for_info(info, sub))
    return google.auth.exceptions.RefreshError(
        f"the API rejected token {mask(token.token)} of {key!r} and no other token is available: "
        f"tokencache refetches a rejected token once per key per {INVALIDATE_EVERY:g} s, and it did so "
        "less than that ago. An API that rejects every new token is refusing these credentials "
        "(check the account, scopes and project it expects).",
        retryable=False,
    )


class _SentTokens(threading.local):
    """The access token each thread last sent (``before_request``); a fresh one for each copy or unpickle."""

    token: str | None = None

    def __reduce__(self) -> tuple[type[_SentTokens], tuple[()]]:
        return type(self), ()


def _bearer(headers: Mapping[str, str]) -> str | None:
    """The access token in the ``authorization`` header google-auth's ``apply()`` wrote."""
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    return (token or None) if scheme.lower() == "bearer" else None


class Credentials(ga.Scoped, ga.CredentialsWithQuotaProject):
    """google-auth credentials whose token is the fleet's shared one, read from tokencache's Redis."""

    def __init__(
        self,
        scopes: Scopes,
        account: str | None = None,
        subject: str | None = None,
        *,
        store: TokenStore | None = None,
        timeout: float = 30.0,
        quota_project_id: str | None = None,
        project_id: str | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # google-auth is not annotated
        self._scopes = check_scopes(scopes)
        self._default_scopes: list[str] | None = None
        self._account = check_name("account", account)
        self._subject = check_name("subject", subject)
        self._store = check_store(store)
        self._timeout = check_timeout(timeout)
        self._quota_project_id = check_name("quota_project_id", quota_project_id)
        self._project_id = check_name("project_id", project_id)
        self._margin = 0  # the refresh_before of the store read last (plain data, so pickling works)
        self._read_at: float | None = None
        self._sent = _SentTokens()

    def __repr__(self) -> str:
        store = "default" if self._store is None else repr(self._store)
        return (
            f"tokencache.Credentials(scopes={self._scopes!r}, account={self._account!r}, "
            f"subject={self._subject!r}, quota_project_id={self._quota_project_id!r}, store={store})"
        )

    # -- what it reads -------------------------------------------------------

    @property
    def account(self) -> str | None:
        """The tokencache account (None is ``default``)."""
        return self._account

    @property
    def subject(self) -> str | None:
        """The user the token acts for (domain-wide delegation), or None."""
        return self._subject

    @property
    def scopes(self) -> list[str] | None:
        """The scopes given (None until some are)."""
        return self._scopes

    @property
    def default_scopes(self) -> list[str] | None:
        """What a client library offered via ``with_scopes(None, default_scopes)``; used if scopes is None."""
        return self._default_scopes

    @property
    def project_id(self) -> str | None:
        """The project client libraries use when none is passed to them (None: they look it up)."""
        return self._project_id

    @property
    def requires_scopes(self) -> bool:
        """True until scopes are given, so client libraries' ``with_scopes_if_required`` fills them in."""
        return not self._scopes

    # -- copies --------------------------------------------------------------

    def _copy(
        self, scopes: Scopes, account: str | None, subject: str | None, default_scopes: Scopes
    ) -> Credentials:
        copy = type(self)(scopes, account, subject, store=self._store, timeout=self._timeout)
        copy._quota_project_id, copy._project_id = self._quota_project_id, self._project_id
        copy._default_scopes = check_scopes(default_scopes, "default_scopes")
        return copy

    def with_scopes(self, scopes: Scopes, default_scopes: Scopes = None) -> Credentials:
        """A copy for other scopes (another cached token); ``default_scopes`` apply when scopes are None."""
        return self._copy(scopes, self._account, self._subject, default_scopes)

    def with_subject(self, subject: str | None) -> Credentials:
        """A copy acting for ``subject`` (domain-wide delegation; the token of that ``sub``)."""
        return self._copy(self._scopes, self._account, subject, self._default_scopes)

    def with_account(self, account: str | None) -> Credentials:
        """A copy reading the tokens of another account (None is ``default``)."""
        return self._copy(self._scopes, account, self._subject, self._default_scopes)

    def with_quota_project(self, quota_project_id: str | None) -> Credentials:
        """A copy that bills API calls to ``quota_project_id`` (the ``x-goog-user-project`` header)."""
        copy = self._copy(self._scopes, self._account, self._subject, self._default_scopes)
        copy._quota_project_id = check_name("quota_project_id", quota_project_id)
        return copy

    def get_cred_info(self) -> dict[str, str]:
        """What client libraries add to a 401/403 error: these are tokencache's, for this account."""
        return {
            "credential_source": "tokencache",
            "credential_type": "tokencache shared access token",
            "principal": self._account or "default",
        }

    # -- reading the token ---------------------------------------------------

    def before_request(self, request: object, method: str, url: str, headers: Mapping[str, str]) -> None:
        """google-auth's: refresh if due and set the header; also remember the token this thread sent."""
        super().before_request(request, method, url, headers)  # type: ignore[no-untyped-call]
        self._sent.token = _bearer(headers)

    def _rejected(self) -> str | None:
        """The token a ``refresh()`` reports as rejected (see the module docstring); None: a plain read."""
        sent, self._sent.token = self._sent.token, None  # reported once per sending
        if sent is None or self.token is None or self.expired:
            return None
        return sent

    def refresh(self, request: object) -> None:
        """Read the fleet's token (fetched once for the whole fleet on a miss); ``request`` is not used.

        Called while the token is fresh (google-auth's retry after a 401), it first reports the token as
        rejected and waits for another one (see the module docstring).
        """
        del request  # Google is asked by the token's fetcher, never through the caller's transport
        scopes = self._scopes or self._default_scopes
        if not scopes:
            raise google.auth.exceptions.RefreshError(
                "tokencache.Credentials has no scopes: pass scopes=... or use with_scopes()"
            )
        info, rejected = (self._account, " ".join(scopes)), self._rejected()
        try:
            store = self._store or default_store()
            if rejected is not None:
                store.invalidate(info, rejected, self._subject)
            token = store.for_scope(info, self._subject, self._timeout)
        except TokenCacheError as e:
            raise _translate(e) from e
        if token.token == rejected:
            raise _still_rejected(store, info, self._subject, token)
        self._margin = store.refresh_before
        self._read_at = store.clock()
        self.token = token.token
        self.expiry = _naive_utc(token.expires)

    def _now(self) -> float:
        return self._store.clock() if self._store is not None else time.time()

    def _reread_at(self, expires: float) -> float:
        """When the next ``refresh()`` is worth it: see the module docstring."""
        due = expires - self._margin
        if self._read_at is not None:
            due = max(due, self._read_at + RECHECK)
        return min(due, expires - EXPIRY_SKEW)

    @property
    def expired(self) -> bool:
        """Whether a re-read is due: inside the store's refresh margin, not google-auth's 3m45s."""
        if self.expiry is None:
            return False
        return self._now() >= self._reread_at(_timestamp(self.expiry))

    @property
    def token_state(self) -> ga.TokenState:
        """FRESH, STALE (re-read due, token still usable) or INVALID, on the same clock as :attr:`expired`."""
        if self.token is None:
            return ga.TokenState.INVALID
        if self.expiry is None:
            return ga.TokenState.FRESH
        now, expires = self._now(), _timestamp(self.expiry)
        if now >= expires - EXPIRY_SKEW:  # where the store stops handing the token out
            return ga.TokenState.INVALID
        if now >= self._reread_at(expires):
            return ga.TokenState.STALE
        return ga.TokenState.FRESH
