"""One app process of bench/fleet.py: uses 20 tokens at a fixed pace, counts what it saw, prints JSON.

    python -m bench.fleet_child {tokencache,google-auth} INDEX --control URL --emulator URL [options]

``tokencache``: no credentials; ``find()`` per call, ``for_scope()`` on a miss
(the store and its ``refresh_before`` come from the environment).
``google-auth``: one service-account ``Credentials`` per scope, refreshed in
the loop when not ``valid``, with google-auth's refresh threshold scaled to
the short lifetime. Both: warm up (one pass over the scopes), meet the others
at the start barrier ``{prefix}`` (tokencache.testing.barrier, member
``{mode}:{index}``), whose go message holds the end time, then one call every
``--pace`` seconds until then. Every returned token is checked against its own
expiry; a random 1 in ``--sample`` also against the emulator's tokeninfo (POST,
so the token is never in a URL). Tokens are never printed: the JSON holds
counts only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import requests

from tokencache.testing.barrier import arrive

SCOPES = tuple(f"https://www.googleapis.com/auth/bench.fleet.{i:02d}" for i in range(20))
"""The fleet's 20 tokens: one service account, 20 scopes."""
FETCH_WAIT = 30.0
"""Seconds a tokencache app waits on a miss (for_scope's timeout)."""
GO_WAIT = 120
"""Seconds a ready app waits for the go signal before it gives up."""
GOOGLE_AUTH_FRACTION = 225 / 3600
"""google-auth refreshes with 3 min 45 s of a 1 h token left: 6.25 % of the lifetime."""


@dataclass
class Counts:
    """What one app saw; summed over the fleet by bench/fleet.py."""

    mode: str
    index: int
    calls: int = 0
    misses: int = 0
    """Calls that found no usable token and waited on a fetch (for_scope / creds.refresh)."""
    errors: int = 0
    expired_by_clock: int = 0
    """Returned tokens whose own expiry had passed."""
    sampled: int = 0
    rejected: int = 0
    """Sampled tokens the emulator's tokeninfo no longer accepts (expired or unknown)."""
    wrong_scope: int = 0
    tokeninfo_errors: int = 0
    slowest_call: float = 0.0
    warm_start: float = 0.0
    loop_start: float = 0.0
    loop_end: float = 0.0
    setting: dict[str, Any] = field(default_factory=dict)
    first_error: str = ""

    def error(self, exc: Exception) -> None:
        self.errors += 1
        self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"[:300]


Use = Callable[[int], tuple[str, float, bool]]
"""Use the token of scope i: (access token, its expiry as Unix time, whether the call missed)."""


class TokencacheApp:
    """An app without credentials: the shared token from Redis, in one round trip on a hit."""

    def __init__(self, args: argparse.Namespace) -> None:
        import tokencache

        self.failures: tuple[type[Exception], ...] = (tokencache.TokenCacheError,)
        self.store = tokencache.default_store()
        if self.store.refresh_before != args.refresh_before:
            raise SystemExit(f"refresh_before is {self.store.refresh_before}, expected {args.refresh_before}")
        if self.store.sources.has("default"):
            raise SystemExit("this app must hold no credentials")
        self.setting = {"refresh_before": self.store.refresh_before}

    def warm_up(self) -> None:
        for scope in SCOPES:
            self.store.for_scope(scope, timeout=FETCH_WAIT)

    def use(self, i: int) -> tuple[str, float, bool]:
        token = self.store.find(SCOPES[i])
        missed = token is None
        if token is None:
            token = self.store.for_scope(SCOPES[i], timeout=FETCH_WAIT)
        return token.token, float(token.expires), missed


class GoogleAuthApp:
    """The peer: plain google-auth, one Credentials per scope, each process refreshing its own."""

    def __init__(self, args: argparse.Namespace) -> None:
        import google.auth
        import google.auth._helpers
        import google.auth.exceptions
        from google.auth.transport.requests import Request
        from google.oauth2 import service_account

        # credentials.Credentials.expired/valid/token_state read _helpers.REFRESH_THRESHOLD at each
        # call (google-auth 2.63), so replacing the module attribute scales every check.
        threshold = datetime.timedelta(seconds=GOOGLE_AUTH_FRACTION * args.lifetime)
        google.auth._helpers.REFRESH_THRESHOLD = threshold
        self.failures = (google.auth.exceptions.GoogleAuthError,)
        base = service_account.Credentials.from_service_account_file(args.key_file)
        self.creds = [base.with_scopes([scope]) for scope in SCOPES]
        self.request = Request(requests.Session())
        self.setting = {
            "refresh_threshold": google.auth._helpers.REFRESH_THRESHOLD.total_seconds(),
            "google_auth": google.auth.__version__,
        }

    def warm_up(self) -> None:
        for creds in self.creds:
            creds.refresh(self.request)
        # With google-auth's own 225 s threshold a 12 s token is never valid: this proves the patch.
        if not all(creds.valid for creds in self.creds):
            raise SystemExit(
                "fresh credentials are not valid: the refresh threshold patch did not take effect"
            )

    def use(self, i: int) -> tuple[str, float, bool]:
        creds = self.creds[i]
        missed = not creds.valid
        if missed:
            creds.refresh(self.request)
        expiry = creds.expiry.replace(tzinfo=datetime.UTC).timestamp()
        return creds.token, expiry, missed


class Checker:
    """Whether a returned token is still live: by its own expiry, and sampled, by the emulator."""

    def __init__(self, emulator: str, sample: int, seed: int) -> None:
        self.url = emulator.rstrip("/") + "/tokeninfo"
        self.session = requests.Session()
        self.every = 1 / sample
        self.random = random.Random(seed)

    def check(self, counts: Counts, scope: str, token: str, expires: float) -> None:
        counts.expired_by_clock += expires <= time.time()
        if self.random.random() >= self.every:
            return
        counts.sampled += 1
        try:
            reply = self.session.post(self.url, data={"access_token": token}, timeout=5)
        except requests.RequestException:
            counts.tokeninfo_errors += 1
            return
        if reply.status_code == 400:
            counts.rejected += 1
        elif reply.status_code != 200:
            counts.tokeninfo_errors += 1
        elif reply.json().get("scope") != scope:
            counts.wrong_scope += 1


def run_loop(
    app: TokencacheApp | GoogleAuthApp, checker: Checker, counts: Counts, end: float, pace: float
) -> None:
    """Call ``i`` starts at ``start + i * pace`` (scopes in turn) until ``end``.

    A fixed schedule, not a fixed sleep: an app that fell behind (a slow refresh, a busy machine)
    catches up, so both fleets make the same number of calls over the same time.
    """
    counts.loop_start = time.time()
    while (started := time.time()) < end:
        scope = counts.calls % len(SCOPES)
        try:
            token, expires, missed = app.use(scope)
        except app.failures as exc:
            counts.error(exc)
        else:
            counts.slowest_call = max(counts.slowest_call, time.time() - started)
            counts.misses += missed
            checker.check(counts, SCOPES[scope], token, expires)
        counts.calls += 1
        next_at = counts.loop_start + counts.calls * pace
        time.sleep(max(0.0, min(next_at, end) - time.time()))
    counts.loop_end = time.time()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_child")
    parser.add_argument("mode", choices=("tokencache", "google-auth"))
    parser.add_argument("index", type=int)
    parser.add_argument("--control", required=True, help="Redis URL of the start barrier")
    parser.add_argument("--prefix", default="bench-fleet")
    parser.add_argument("--emulator", required=True, help="emulator base URL (tokeninfo)")
    parser.add_argument("--pace", type=float, default=0.01)
    parser.add_argument("--sample", type=int, default=50)
    parser.add_argument("--refresh-before", type=int, default=None, help="tokencache: expected value")
    parser.add_argument("--lifetime", type=int, default=None, help="google-auth: token lifetime, seconds")
    parser.add_argument("--key-file", default=None, help="google-auth: service-account key file")
    args = parser.parse_args(argv)
    counts = Counts(args.mode, args.index)
    app = TokencacheApp(args) if args.mode == "tokencache" else GoogleAuthApp(args)
    counts.setting = app.setting
    checker = Checker(args.emulator, args.sample, seed=args.index)
    counts.warm_start = time.time()
    app.warm_up()
    try:
        go = arrive(args.control, args.prefix, f"{args.mode}:{args.index}", timeout=GO_WAIT)
    except TimeoutError as e:
        raise SystemExit(str(e)) from None
    run_loop(app, checker, counts, json.loads(go)["end"], args.pace)
    print(json.dumps(asdict(counts)), flush=True)


if __name__ == "__main__":
    main()
