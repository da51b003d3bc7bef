"""Turning encryption on and rotating its key under a running fleet, with no miss and no error.

A real fleet changes its configuration one process at a time: each phase here starts a new worker
pool with the new ring before the old pool stops (a rolling restart), and switches the app readers
to the new ring one by one while both pools run, so every mix of neighbouring rings meets every
token. The workers refresh short-lived tokens throughout, so tokens are rewritten under whatever
ring their refresher holds while the apps read them: the seeded tokens' refreshes are spread over a
half-life, so every phase, the first included, sees refreshes (asserted per phase).

The phases are the documented procedures (docs/encryption.md): turn on (``plaintext,k1`` everywhere,
then ``k1,plaintext`` everywhere, then ``rekey``, then ``k1``: a ring of keys alone refuses plaintext)
and rotate (``k1,k2``, then ``k2,k1``, then ``rekey``, then ``k2``). Each reader calls ``find()`` on
every token in a loop: a ``None`` is a miss, anything raised an error, and both must stay at zero.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from tokencache import Token, TokenStore
from tokencache.cli.rekey import Rekeyed, rekey
from tokencache.core.sources import Sources
from tokencache.crypto import new_key
from tokencache.testing.emulator import Emulator
from tokencache.testing.workers import PoolProcess

from .conftest import SCOPE, Workers, wait_for

K1, K2 = new_key(), new_key()
PHASES = [
    # (what the phase does, the ring every process holds by its end, rekey after it)
    ("plaintext fleet", "", False),
    ("turn on 1/3: decrypt k1, write plaintext", f"plaintext,k1:{K1}", False),
    ("turn on 2/3: write k1, read plaintext; rekey encrypts the rest", f"k1:{K1},plaintext", True),
    ("turn on 3/3: drop plaintext", f"k1:{K1}", False),
    ("rotate 1/3: add k2 second", f"k1:{K1},k2:{K2}", False),
    ("rotate 2/3: k2 first; rekey re-encrypts", f"k2:{K2},k1:{K1}", True),
    ("rotate 3/3: drop k1", f"k2:{K2}", False),
]
TOKENS = 40
READERS = 4
"""App readers; every other one with a near cache (which a rekey's rewrite of a token invalidates)."""
LIFETIME = 14
"""Seconds a token from the emulator lives: its refresh comes at half-life (7 s), and the seeds' refreshes
are spread over one half-life, so refreshes run all the time, under the rings of both pools of a phase."""
HOLD = 3.0
"""Seconds each phase runs once every process holds its ring."""


@dataclass
class Reader:
    """An app process's reads: ``find()`` on every token in a loop, on a store of its current ring."""

    redis_url: str
    namespace: str
    ring: str
    near_cache: bool
    reads: int = 0
    misses: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    switched: threading.Event = field(default_factory=threading.Event)
    """Set once the reader has read every token with the ring it was last given (see :func:`_switch`)."""

    def run(self) -> None:
        ring, store = self.ring, self._store(self.ring)
        while not self.stop.is_set():
            if self.ring != ring:  # restarted with the new configuration
                store.close()
                ring, store = self.ring, self._store(self.ring)
                self._round(store, ring)
                self.switched.set()
                continue
            self._round(store, ring)
            time.sleep(0.01)
        store.close()

    def switch(self, ring: str) -> None:
        """Restart with ``ring``; return once a whole round has read every token with it."""
        self.switched.clear()
        self.ring = ring
        assert self.switched.wait(10), f"a reader did not switch to {ring.split(':')[0]!r} within 10 s"

    def _store(self, ring: str) -> TokenStore:
        return TokenStore.from_url(
            self.redis_url,
            namespace=self.namespace,
            sources=Sources(use_adc=False),
            encryption=ring,
            near_cache=self.near_cache,
        )

    def _round(self, store: TokenStore, ring: str) -> None:
        for i in range(TOKENS):
            try:
                if store.find(SCOPE, f"u{i}") is None:
                    self.misses.append(
                        f"u{i} at {time.time():.2f}, ring {ring.split(',')[0].split(':')[0]!r}"
                    )
            except Exception as e:
                self.errors.append(f"u{i}: {e!r}")
            self.reads += 1


@pytest.mark.timeout(400)
def test_turning_encryption_on_and_rotating_under_a_running_fleet(
    store: TokenStore, workers: Workers, emulator: Emulator, redis_url: str
) -> None:
    emulator.config.lifetime = LIFETIME
    pool = _pool(workers, PHASES[0][1])
    now = int(time.time())
    for i in range(TOKENS):  # refreshes due 1 s to one half-life from now, spread evenly
        expires = now + store.refresh_before + 1 + (LIFETIME // 2) * i // TOKENS
        store.store(Token(token=f"ya29.seed-{i:03}-0000", scope=SCOPE, expires=expires, sub=f"u{i}"))
    readers = [
        Reader(redis_url, store.keys.namespace, PHASES[0][1], near_cache=i % 2 == 1) for i in range(READERS)
    ]
    threads = [threading.Thread(target=r.run, daemon=True) for r in readers]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        rekeys, issued = _run_phases(workers, readers, emulator, pool)
    finally:
        for reader in readers:
            reader.stop.set()
        for thread in threads:
            thread.join(10)
    misses, errors = [m for r in readers for m in r.misses], [e for r in readers for e in r.errors]
    print(f"\n{len(PHASES)} phases in {time.monotonic() - started:.1f}s: {sum(r.reads for r in readers)} "
          f"reads, {len(misses)} misses, {len(errors)} errors; tokens issued per phase {issued}")  # fmt: skip
    for name, done in rekeys:
        print(f"rekey after '{name}': {done.rewritten} rewritten, {done.current} already current, "
              f"{done.skipped} skipped, {len(done.failed)} failed, in {done.seconds:.3f}s")  # fmt: skip
    assert errors == [] and misses == [], (errors[:5], misses[:5])
    assert sum(issued) >= TOKENS, "the workers refreshed every token during the run"
    assert all(n > 0 for n in issued), f"a phase without refreshes: {issued}"
    for _, done in rekeys:  # skipped: refreshed between the read and the write, under the new key already
        assert not done.failed and done.rewritten > 0
        assert done.rewritten + done.current + done.skipped == TOKENS
    final = TokenStore(store.redis, namespace=store.keys.namespace, encryption=PHASES[-1][1])
    assert [r.key_id for r in final.records()] == ["k2"] * TOKENS
    assert all(r.unreadable is None for r in final.records())


def _run_phases(
    workers: Workers,
    readers: list[Reader],
    emulator: Emulator,
    pool: PoolProcess,
) -> tuple[list[tuple[str, Rekeyed]], list[int]]:
    """The first phase as it runs, then every other one a rolling restart each; the rekey runs and the
    tokens issued per phase."""
    rekeys: list[tuple[str, Rekeyed]] = []
    start = emulator.stats()["issued"]
    issued = [_hold(emulator, start, PHASES[0][0])]
    for name, ring, then_rekey in PHASES[1:]:
        start = emulator.stats()["issued"]
        pool = _switch(workers, pool, readers, ring)
        if then_rekey:
            namespace = workers.store.keys.namespace
            with TokenStore.from_url(workers.redis_url, namespace=namespace, encryption=ring) as operator:
                rekeys.append((name, rekey(operator)))
        issued.append(_hold(emulator, start, name))
    return rekeys, issued


def _hold(emulator: Emulator, start: int, phase: str) -> int:
    """Let the phase run :data:`HOLD` seconds, and on until its pools have refreshed a token (the workers
    refresh several due tokens in one batch, so refreshes bunch up); the tokens issued in it."""
    time.sleep(HOLD)
    wait_for(lambda: emulator.stats()["issued"] > start, LIFETIME, what=f"a refresh during {phase!r}")
    return int(emulator.stats()["issued"] - start)


def _pool(workers: Workers, ring: str) -> PoolProcess:
    return workers.start(2, env={"TOKENCACHE_ENCRYPTION_KEYS": ring}, timeout=60)


def _switch(workers: Workers, old: PoolProcess, readers: list[Reader], ring: str) -> PoolProcess:
    """A rolling restart onto ``ring``: a new pool starts, the readers move one by one, the old pool stops."""
    new = _pool(workers, ring)
    for reader in readers:
        reader.switch(ring)
    old.stop()
    return new
