"""A refresh worker killed mid-fetch is replaced within the recovery budget, twice in a row.

Bounds (docs/design.md, "Failure model"): from the SIGKILL of the pool whose worker is fetching
a token to another pool's fetch of it, at most ``RECOVERY_BUDGET`` (2 s). With the endpoint
answering at the fetch budget and two consecutive kills of the fetching pool, the token is
replaced before it expires with the default 10 s margin, and a reader calling ``find()`` every
50 ms never misses and is never handed an expired token.
"""

from __future__ import annotations

import time

from tokencache import Token, TokenStore
from tokencache.constants import EXPIRY_SKEW, FETCH_TIMEOUT, RECOVERY_BUDGET
from tokencache.testing.emulator import Emulator
from tokencache.testing.faults import Reader, kill_fetching_pool, wait_until

from .conftest import SCOPE, Workers

FETCH_LATENCY = FETCH_TIMEOUT - 0.3
"""The endpoint answers at the fetch budget (a reply at exactly 4 s would be cut off by it)."""


def test_two_kills_mid_fetch_at_the_fetch_budget_still_replace_the_token_before_expiry(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    emulator.config.latency = FETCH_LATENCY
    pools = [workers.start(1) for _ in range(3)]
    old = Token(token="ya29.old-opaque", scope=SCOPE, expires=int(time.time()) + 12)  # due in ~2 s
    store.store(old)
    key = store.key_for(old)
    reader = Reader(store, SCOPE).start()
    try:
        first, seen = kill_fetching_pool(store, key, pools, emulator, after=0, timeout=8)
        second, _ = kill_fetching_pool(store, key, pools, emulator, after=seen, timeout=8)
        recoveries = [first, second]
        new = wait_until(
            lambda: (t := store.find(SCOPE)) is not None and t.token != old.token and t,
            timeout=old.expires - time.time(),
            what="the token replaced",
        )
        replaced_at = time.time()
        time.sleep(0.2)  # a few more reads of the new token
    finally:
        reader.stop()
    assert max(recoveries) <= RECOVERY_BUDGET, recoveries
    assert replaced_at < old.expires - EXPIRY_SKEW and new.expires > old.expires
    assert reader.misses == 0 and reader.expired == 0, (reader.misses, reader.expired, reader.reads)
    assert reader.reads > 100
