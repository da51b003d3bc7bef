"""``requests`` auth that sends the fleet's shared token: ``requests.get(url, auth=BearerAuth(scope))``.

Every request reads the token with :meth:`TokenStore.for_scope`: one Redis
round trip on a hit, one fetch for the whole fleet on a miss. There is no
per-object token cache to go stale: the workers keep the one in Redis fresh.
tokencache's errors reach the caller as they are (``TokenCacheError``).

A 401 answer is retried once with a fresh token, the way requests' own
``HTTPDigestAuth`` answers its 401 (a response hook that re-sends a copy of the
request on the same connection adapter): the token that was sent is reported
with :meth:`TokenStore.invalidate` (evicted for the whole fleet if it is still
the stored one) and the retry waits for the new token, up to ``timeout``. If no
other token is to be had (the key evicted one less than ``INVALIDATE_EVERY``
seconds ago: an API that rejects every token), the 401 is returned as it came.
"""

from __future__ import annotations

from typing import Any

from requests import PreparedRequest, Response
from requests.auth import AuthBase
from requests.cookies import extract_cookies_to_jar

from tokencache.adapters.google_auth import check_store
from tokencache.app.defaults import default_store
from tokencache.app.tokenstore import TokenStore
from tokencache.keys import TokenKey
from tokencache.validate import check_timeout

__all__ = ["BearerAuth"]

UNAUTHORIZED = 401


class BearerAuth(AuthBase):
    """Sets ``Authorization: Bearer <token>`` from the fleet's cache on every request."""

    def __init__(
        self,
        scope: str,
        account: str | None = None,
        sub: str | None = None,
        *,
        store: TokenStore | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.key = TokenKey.of(account, scope, sub)  # validates and normalizes all three
        self.scope, self.account, self.sub = scope, account, sub
        self.store = check_store(store)
        """The store to read (None: ``tokencache.default_store()``, looked up at each request)."""
        self.timeout = check_timeout(timeout)

    def __call__(self, r: PreparedRequest) -> PreparedRequest:
        store = self.store or default_store()
        token = store.for_scope((self.account, self.scope), self.sub, self.timeout)
        r.headers["Authorization"] = f"Bearer {token.token}"
        r.register_hook("response", _RetryOnce(self, store, token.token, _body_position(r)))  # type: ignore[no-untyped-call]
        return r

    def __eq__(self, other: object) -> bool:
        """Equal when they send the same header: same token key (normalized scope), same store."""
        if not isinstance(other, BearerAuth):
            return NotImplemented
        return self.key == other.key and self.store is other.store

    def __hash__(self) -> int:
        return hash((self.key, id(self.store)))

    def __repr__(self) -> str:
        store = "default" if self.store is None else repr(self.store)
        return f"BearerAuth(scope={self.scope!r}, account={self.account!r}, sub={self.sub!r}, store={store})"


def _body_position(r: PreparedRequest) -> int | None:
    """Where a file-like body starts, to rewind it for the retry (as ``HTTPDigestAuth`` does)."""
    tell = getattr(r.body, "tell", None)
    try:
        return int(tell()) if tell is not None else None
    except OSError:
        return None


class _RetryOnce:
    """The response hook of one request: a 401 reports the token sent and re-sends with a new one, once."""

    def __init__(self, auth: BearerAuth, store: TokenStore, sent: str, position: int | None) -> None:
        self.auth, self.store, self.sent, self.position = auth, store, sent, position

    def __call__(self, response: Response, **send_options: Any) -> Response:
        sent = response.request.headers.get("Authorization") == f"Bearer {self.sent}"
        if response.status_code != UNAUTHORIZED or not sent:
            return response  # a redirect to another host drops our header: its 401 says nothing of ours
        auth = self.auth
        info = (auth.account, auth.scope)
        self.store.invalidate(info, self.sent, auth.sub)
        token = self.store.for_scope(info, auth.sub, auth.timeout)
        if token.token == self.sent:
            return response  # no other token to be had (the rate limit held): the API's answer stands
        return self._resend(response, token.token, send_options)

    def _resend(self, response: Response, token: str, send_options: dict[str, Any]) -> Response:
        response.content  # noqa: B018 - read the body, so the connection goes back to the pool
        response.close()
        retry = response.request.copy()
        retry.hooks = {"response": [hook for hook in retry.hooks["response"] if hook is not self]}
        if self.position is not None:
            retry.body.seek(self.position)  # type: ignore[union-attr]
        extract_cookies_to_jar(retry._cookies, response.request, response.raw)  # type: ignore[attr-defined,no-untyped-call]
        retry.prepare_cookies(retry._cookies)  # type: ignore[attr-defined]
        retry.headers["Authorization"] = f"Bearer {token}"
        again: Response = response.connection.send(retry, **send_options)
        again.history.append(response)
        again.request = retry
        return again
