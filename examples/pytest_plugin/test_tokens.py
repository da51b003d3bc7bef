"""An application's tests that use only tokencache's pytest plugin: store, refresh by real workers, find.

pytest provides the ``tokencache_*`` fixtures by itself once tokencache is installed. Tokens
are fetched from the emulator the fixtures start (``tokencache_key_file`` names it as the
workers' account), never from Google.
"""

from __future__ import annotations

import time

from tokencache import Token, TokenStore
from tokencache.testing import Emulator
from tokencache.testing.pytest_plugin import WorkerPools

SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def test_the_workers_refresh_a_stored_token_before_it_expires(
    tokencache_store: TokenStore, tokencache_workers: WorkerPools, tokencache_emulator: Emulator
) -> None:
    tokencache_workers.start(1)
    stand_in = "ya29.example-old-token"
    old = Token(token=stand_in, scope=SCOPE, expires=int(time.time()) + 12)
    tokencache_store.store(old)  # refresh_before is 10 s: the refresh is due in about 2 s

    deadline = time.monotonic() + 10
    while (found := tokencache_store.find(SCOPE)) is not None and found.token == old.token:
        assert time.monotonic() < deadline, "the token was not refreshed within 10 s"
        time.sleep(0.1)

    assert found is not None and found.expires > old.expires
    assert tokencache_emulator.validate(found.token) is not None  # a token the emulator issued
    assert tokencache_emulator.stats()["issued"] == 1


def test_a_cold_cache_is_filled_once_by_the_workers(
    tokencache_store: TokenStore, tokencache_workers: WorkerPools, tokencache_emulator: Emulator
) -> None:
    tokencache_workers.start(1)
    token = tokencache_store.for_scope(SCOPE, timeout=10)  # this store holds no credentials
    assert tokencache_store.find(SCOPE) == token
    assert tokencache_emulator.stats()["issued"] == 1
