"""What the emulator remembers: the accounts and keys it honours, and the tokens it issued.

``_Registry`` holds service-account public keys and authorized users (the grants' inputs);
``_Ledger`` holds the issued tokens (for tokeninfo) and the request counters (for /stats).
Both are shared by every handler thread, each under one lock of its own, so a grant never
waits on the counters and the counters never see half an update.
"""

from __future__ import annotations

import random
import secrets
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from .config import EmulatorConfig
from .constants import DEFAULT_SCOPES, GRANT_KINDS, PROJECT_ID, TOKEN_PREFIX


@dataclass(frozen=True)
class _ServiceAccount:
    email: str
    client_id: str


@dataclass(frozen=True)
class _Key:
    kid: str
    account: _ServiceAccount
    public_key: rsa.RSAPublicKey


@dataclass(frozen=True)
class _User:
    """An authorized user (gcloud ADC style) that may use the refresh_token grant."""

    email: str
    client_id: str
    client_secret: str
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class _Grant:
    """Who a token is being issued to and for what; kept with the token for tokeninfo."""

    kind: str
    email: str
    client_id: str
    scope: str
    subject: str | None = None


@dataclass(frozen=True)
class _Issued:
    grant: _Grant
    expires_at: float


class _Registry:
    """Service-account keys and authorized users the token endpoint honours."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accounts: dict[str, _ServiceAccount] = {}
        self._keys: dict[str, _Key] = {}
        self._users: dict[str, _User] = {}
        self._auto_accounts = 0
        self._auto_users = 0

    def next_account_email(self) -> str:
        with self._lock:
            self._auto_accounts += 1
            return f"sa-{self._auto_accounts}@{PROJECT_ID}.iam.gserviceaccount.com"

    def add_key(self, email: str, public_key: rsa.RSAPublicKey) -> _Key:
        """Register a new key; an existing account keeps its client_id, as on Google."""
        with self._lock:
            account = self._accounts.setdefault(email, _ServiceAccount(email, _numeric_id()))
            key = _Key(secrets.token_hex(20), account, public_key)
            self._keys[key.kid] = key
            return key

    def candidate_keys(self, kid: Any, iss: Any) -> list[_Key]:
        """Keys that may have signed an assertion: the one named by kid, else every key of iss."""
        with self._lock:
            if isinstance(kid, str) and kid:
                return [self._keys[kid]] if kid in self._keys else []
            return [key for key in self._keys.values() if key.account.email == iss]

    def add_user(self) -> tuple[str, _User]:
        with self._lock:
            self._auto_users += 1
            user = _User(
                email=f"user-{self._auto_users}@{PROJECT_ID}.example",
                client_id=f"{_numeric_id(12)}-emu.apps.googleusercontent.com",
                client_secret="GOCSPX-" + secrets.token_urlsafe(21),
                scopes=DEFAULT_SCOPES,
            )
            refresh_token = "1//emu-" + secrets.token_urlsafe(48)
            self._users[refresh_token] = user
            return refresh_token, user

    def user(self, refresh_token: str) -> _User | None:
        with self._lock:
            return self._users.get(refresh_token)


REQUEST_TIMES_KEPT = 1000
"""Arrival times of the latest token requests kept for /stats (tests measure the gaps between them)."""


class _Ledger:
    """Counters and live tokens, shared by every handler thread under one lock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._tokens: dict[str, _Issued] = {}
        self._last_prune = clock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._requests = 0
            self._failed = 0
            self._injected = 0
            self._by_grant: Counter[str] = Counter(dict.fromkeys(GRANT_KINDS, 0))
            self._by_account: Counter[str] = Counter()
            self._times: deque[float] = deque(maxlen=REQUEST_TIMES_KEPT)

    def admit(self, config: EmulatorConfig) -> bool:
        """Count a token request and decide whether to inject a failure (fail_next first)."""
        with self._lock:
            self._requests += 1
            self._times.append(self._clock())
            fail = config.fail_next > 0 or random.random() < config.failure_rate
            if config.fail_next > 0:
                config.fail_next -= 1
            self._failed += int(fail)
            self._injected += int(fail)
            return not fail

    def reject(self) -> None:
        with self._lock:
            self._failed += 1

    def issue(self, grant: _Grant, lifetime: int) -> str:
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            self._prune()
            self._tokens[token] = _Issued(grant, self._clock() + lifetime)
            self._by_grant[grant.kind] += 1
            self._by_account[grant.email] += 1
        return token

    def lookup(self, token: str) -> _Issued | None:
        """The live token's record, or None when unknown or expired."""
        with self._lock:
            issued = self._tokens.get(token)
        return issued if issued and issued.expires_at > self._clock() else None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._prune(force=True)
            return {
                "token_requests": self._requests,
                "issued": sum(self._by_grant.values()),
                "failed": self._failed,
                "injected_failures": self._injected,
                "by_grant": dict(self._by_grant),
                "by_account": dict(self._by_account),
                "live_tokens": len(self._tokens),
                "request_times": list(self._times),
            }

    def _prune(self, force: bool = False) -> None:
        """Drop expired tokens; at most once a second, so issuing stays O(1) under load."""
        now = self._clock()
        if force or now - self._last_prune >= 1.0:
            self._tokens = {tok: rec for tok, rec in self._tokens.items() if rec.expires_at > now}
            self._last_prune = now


def _numeric_id(digits: int = 21) -> str:
    return str(secrets.randbelow(9 * 10 ** (digits - 1)) + 10 ** (digits - 1))
