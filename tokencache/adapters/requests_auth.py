"""``requests`` auth that sends the fleet's shared token: ``requests.get(url, auth=BearerAuth(scope))``.

Every request reads the token with :meth:`TokenStore.for_scope`: one Redis
round trip on a hit, one fetch for the whole fleet on a miss. There is no
per-object token cache to go stale: the workers keep the one in Redis fresh.
tokencache's errors reach the caller as they are (``TokenCacheError``).
"""

from __future__ import annotations

from requests import PreparedRequest
from requests.auth import AuthBase

from tokencache.adapters.google_auth import check_store
from tokencache.app.defaults import default_store
from tokencache.app.tokenstore import TokenStore
from tokencache.keys import TokenKey
from tokencache.validate import check_timeout

__all__ = ["BearerAuth"]


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
