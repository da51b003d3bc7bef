"""A Sentinel failover under load: nothing restarts, no reader is handed an expired token.

A primary, a replica and three sentinels (``SentinelSetup``); a ``tokencache worker`` pool and
apps with and without the near cache, all on the ``redis+sentinel://`` URL; tokens living 20 s
(refreshed 10 s before expiry). The primary is SIGKILLed. Stated bounds, from the moment every
sentinel names the new master (``ELECTED_BOUND``): every read answers with a live token, and
each refresh lands before its token expires, for two more lifetimes, with the same pool process
and the same app objects. ``tokencache status`` goes green again within ``GREEN_BOUND``.

The figures (reader unavailability window, misses, refresh lateness, time to green) are
printed: ``.venv/bin/python -m pytest tests/test_failover.py -q -s -p no:cacheprovider``.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio
from rq.cli.helpers import get_redis_from_config, read_config_file

from tokencache import Token, TokenCacheError, TokenStore
from tokencache.constants import LOCK_TTL
from tokencache.core.connection import connect
from tokencache.core.locks import Lock
from tokencache.testing.emulator import Emulator
from tokencache.testing.redisserver import SentinelSetup
from tokencache.testing.workers import PoolProcess

from .conftest import SCOPE, wait_for

LIFETIME = 20
REFRESH_BEFORE = 10
ELECTED_BOUND = 5.0
"""Seconds after the election by which every read works again (measured: about 1-2 s)."""
GREEN_BOUND = 15.0
"""Seconds after the election by which ``tokencache status`` exits 0 (measured: 3-6 s)."""
NAMESPACE = "tc-failover"
EMAIL = "https://www.googleapis.com/auth/userinfo.email"


@dataclass
class TimedReader:
    """A thread calling ``store.find(info)`` every 50 ms, keeping when each answer came and what it was."""

    store: TokenStore
    info: object
    reads: list[tuple[float, str, Token | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> TimedReader:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                token = self.store.find(self.info)
            except TokenCacheError:
                self.reads.append((time.time(), "error", None))
                continue
            now = time.time()
            outcome = "miss" if token is None else ("expired" if token.expires <= now else "ok")
            self.reads.append((now, outcome, token))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def failures(self, since: float = 0.0) -> list[tuple[float, str]]:
        return [(at, outcome) for at, outcome, _ in self.reads if at >= since and outcome != "ok"]

    def lateness(self) -> list[float]:
        """For each refresh seen: seconds from its due time (expires - margin) to the first read of it."""
        late, previous = [], None
        for at, _, token in self.reads:
            if token is None or (previous is not None and token.token == previous.token):
                continue
            if previous is not None:
                late.append(at - (previous.expires - REFRESH_BEFORE))
            previous = token
        return late


@pytest.fixture
def sentinels() -> Iterator[SentinelSetup]:
    with SentinelSetup() as setup:
        yield setup


def status_green(url: str, tmp_path: Path) -> bool:
    env = dict(
        os.environ, TOKENCACHE_REDIS_URL=url, TOKENCACHE_NAMESPACE=NAMESPACE, TOKENCACHE_QUEUE=NAMESPACE
    )
    out = subprocess.run(
        [sys.executable, "-m", "tokencache", "status"], env=env, capture_output=True, timeout=30
    )
    return out.returncode == 0


def make_store(url: str, *, near_cache: bool = False) -> TokenStore:
    return TokenStore.from_url(
        url, namespace=NAMESPACE, queue=NAMESPACE, refresh_before=REFRESH_BEFORE, near_cache=near_cache
    )


def test_a_killed_primary_is_followed_with_no_restart_and_no_expired_token(
    sentinels: SentinelSetup, emulator: Emulator, credentials_env: dict[str, str], tmp_path: Path
) -> None:
    emulator.config.lifetime = LIFETIME
    url = sentinels.url
    plain, near = make_store(url), make_store(url, near_cache=True)
    infos: list[object] = [SCOPE, (credentials_env["named"], SCOPE)]
    pool = PoolProcess.for_store(plain, url, workers=2).start(timeout=60)
    readers: list[TimedReader] = []
    try:
        for info in infos:
            plain.for_scope(info, timeout=30)
        assert near.near_cache is not None and near.near_cache.wait_active(10)
        readers = [TimedReader(store, info).start() for store in (plain, near) for info in infos]
        wait_for(lambda: status_green(url, tmp_path), 30, 0.2, "status green before the failover")
        killed_at = time.time()
        old = sentinels.kill_master()
        sentinels.wait_failover(old, timeout=30)
        elected_at = time.time()
        green_at = wait_for(lambda: status_green(url, tmp_path) and time.time(), 30, 0.2, "status green")
        wait_for(lambda: time.time() > elected_at + 2 * LIFETIME + ELECTED_BOUND, 60, 0.5, "two lifetimes")
        assert pool.poll() is None, pool.log_tail(40)
    finally:
        for reader in readers:
            reader.stop()
        pool.stop()
        plain.close()
        near.close()
    late = [x for reader in readers for x in reader.lateness() if reader.reads]
    report(readers, killed_at, elected_at, green_at, late)
    for reader in readers:
        assert not [f for f in reader.failures() if f[1] == "expired"], reader.failures()
        assert reader.failures(since=elected_at + ELECTED_BOUND) == [], reader.failures()
        seen = {token.token for at, _, token in reader.reads if token is not None and at > elected_at}
        assert len(seen) >= 4, f"only {len(seen)} tokens read after the election: refreshes stopped"
    assert green_at - elected_at <= GREEN_BOUND


def report(
    readers: list[TimedReader], killed: float, elected: float, green: float, late: list[float]
) -> None:
    failures = [f for reader in readers for f in reader.failures()]
    last = max((at for at, _ in failures), default=killed)
    kinds = {kind: sum(1 for _, k in failures if k == kind) for kind in ("miss", "error", "expired")}
    print(
        f"\nfailover: elected {elected - killed:.1f} s after the kill; reads failed until "
        f"{last - killed:.1f} s after the kill ({last - elected:+.1f} s from the election); failed reads "
        f"{kinds} of {sum(len(r.reads) for r in readers)}; refresh lateness max {max(late, default=0):.1f} s "
        f"over {len(late)} refreshes; status green {green - elected:.1f} s after the election"
    )


FOLLOW_BOUND = 4.0
"""Seconds after a forced failover's election by which writes, the near cache and the workers are on
the new master. Sentinel demotes the old master, which stays writable meanwhile, only 8-10 s after."""


def test_a_forced_failover_moves_writes_near_cache_and_workers_to_the_new_master_at_once(
    sentinels: SentinelSetup, emulator: Emulator, credentials_env: dict[str, str]
) -> None:
    url = sentinels.url
    plain, near = make_store(url), make_store(url, near_cache=True)
    pool = PoolProcess.for_store(plain, url, workers=1).start(timeout=60)
    try:
        old_token = Token(token="ya29.before-failover", scope=SCOPE, expires=int(time.time()) + 600)
        plain.store(old_token)
        cache = near.near_cache
        assert cache is not None and cache.wait_active(10)

        def held(token: Token) -> bool:
            return near.find(SCOPE) == token and token in cache._entries.values()

        wait_for(lambda: held(old_token), 5, 0.05, "the near cache to hold the token")
        plain.redis.set(f"{NAMESPACE}:probe", "before")
        loop = asyncio.new_event_loop()
        aclient = connect(url, client_class=redis.asyncio.Redis)
        loop.run_until_complete(aclient.set(f"{NAMESPACE}:aprobe", "before"))
        old = sentinels.master()
        sentinels.sentinel().execute_command("SENTINEL", "FAILOVER", sentinels.service)
        new = sentinels.wait_failover(old, timeout=30)
        elected = time.monotonic()

        # 1. A connection opened before the failover writes to the new master, not the old one.
        plain.redis.set(f"{NAMESPACE}:probe", "after")
        assert new.client().get(f"{NAMESPACE}:probe") == b"after"
        loop.run_until_complete(aclient.set(f"{NAMESPACE}:aprobe", "after"))  # and on redis.asyncio
        assert new.client().get(f"{NAMESPACE}:aprobe") == b"after"
        loop.run_until_complete(aclient.aclose())
        loop.close()

        # 2. The near cache drops what it held and tracks the new master: writes there reach it. (The
        # first may also be read because something else dropped the entry; the second only by tracking.)
        direct = TokenStore(new.client(), namespace=NAMESPACE, queue=NAMESPACE)
        for n in (1, 2):
            token = Token(token=f"ya29.after-failover-{n}", scope=SCOPE, expires=int(time.time()) + 600)
            direct.store(token)
            wait_for(lambda: held(token), FOLLOW_BOUND, 0.05, f"the near cache to hold write {n}")  # noqa: B023

        # 3. The workers wait on the new master: a refresh enqueued there runs.
        due = Token(token="ya29.due-now", scope=SCOPE, expires=int(time.time()) + REFRESH_BEFORE - 5)
        plain.store(due, EMAIL)
        left = FOLLOW_BOUND + 2 - (time.monotonic() - elected)
        refreshed = wait_for(
            lambda: (
                (t := plain.find("https://www.googleapis.com/auth/userinfo.email")) and t.token != due.token
            ),
            max(left, 0.1),
            0.05,
            "the workers to refresh a token enqueued on the new master",
        )
        assert refreshed and old.client().info("replication")["role"] == "master"  # still not demoted
        assert pool.poll() is None, pool.log_tail(40)
    finally:
        pool.stop()
        plain.close()
        near.close()


FILLER = 48 * 1024 * 1024
"""Bytes written to the primary while its replica is stopped: more than the loopback socket buffers
hold (a few MB), so whatever is written after it stays in the primary's memory, lost with it."""


def test_writes_lost_with_the_primary_are_redone_and_no_reader_gets_an_expired_token(
    sentinels: SentinelSetup, emulator: Emulator, credentials_env: dict[str, str]
) -> None:
    """The replica is stopped (SIGSTOP), the primary is sent more than the sockets buffer, then some
    writes, then SIGKILLed: those writes never reach the replica, deterministically. The promoted
    replica has the state from before them, and the fleet redoes what matters from it."""
    url = sentinels.url
    store = make_store(url)
    pool = PoolProcess.for_store(store, url, workers=1).start(timeout=60)
    reader: TimedReader | None = None
    try:
        now = int(time.time())
        kept = Token(token="ya29.kept", scope=SCOPE, expires=now + 600)
        due = Token(token="ya29.due", scope=EMAIL, expires=now + REFRESH_BEFORE + 8)  # due in 8 s
        store.store(kept)
        store.store(due)
        lock = Lock(store.redis, store.keys.lock(store.key_for(kept)), LOCK_TTL)
        assert lock.acquire()  # a refresh lock held when the primary dies
        assert store.redis.execute_command("WAIT", 1, 5000) == 1  # all of that is on the replica
        reader = TimedReader(store, EMAIL).start()
        replica, primary = sentinels.replica(), sentinels.master()
        assert replica.process is not None and primary.process is not None
        replica.process.send_signal(signal.SIGSTOP)
        try:
            store.redis.set(f"{NAMESPACE}:filler", b"x" * FILLER)
            store.store(Token(token="ya29.kept-2", scope=SCOPE, expires=now + 900))  # lost
            store.store(Token(token="ya29.lost", scope=SCOPE, expires=now + 600, account="lost@x"))  # lost
            store.store(Token(token="ya29.due-2", scope=EMAIL, expires=now + 900))  # a refresh, lost
            sentinels.kill_master()
        finally:
            replica.process.send_signal(signal.SIGCONT)
        sentinels.wait_failover(primary, timeout=30)
        elected = time.time()
        assert store.find(SCOPE) == kept  # the write before the loss, still valid
        assert store.find(("lost@x", SCOPE)) is None  # gone with the primary: an app's miss refetches it
        assert store.find(EMAIL) == due
        assert not store.redis.exists(store.keys.lock(store.key_for(kept)))  # a lease: lapsed (0.5 s)
        redone = wait_for(
            lambda: (t := store.find(EMAIL)) and t.token not in (due.token, "ya29.due-2") and t,
            due.expires - time.time(),
            0.05,
            "the lost refresh redone before the old token expires",
        )
        print(
            f"\nlost refresh redone {time.time() - elected:.1f} s after the election, "
            f"{due.expires - time.time():.1f} s before the old token expired"
        )
        assert redone.expires > due.expires
    finally:
        if reader is not None:
            reader.stop()
        pool.stop()
        store.close()
    assert not [f for f in reader.failures() if f[1] in ("expired", "miss")], reader.failures()


def test_plain_rq_worker_settings_follow_the_master(
    sentinels: SentinelSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rq worker -c workers.settings`` with a Sentinel URL: RQ builds its client from ``SENTINEL``
    with tokencache's connection class, so its commands (and its forked scheduler's) follow too."""
    monkeypatch.setenv("TOKENCACHE_REDIS_URL", sentinels.url)
    import workers.settings

    settings = read_config_file(
        importlib.reload(importlib.import_module("tokencache.worker.settings")).__name__
    )
    assert (
        settings["REDIS_URL"] is None and settings["SENTINEL"] == importlib.reload(workers.settings).SENTINEL
    )
    client = get_redis_from_config(settings)
    client.set(f"{NAMESPACE}:rq-probe", "before")
    old = sentinels.master()
    sentinels.sentinel().execute_command("SENTINEL", "FAILOVER", sentinels.service)
    new = sentinels.wait_failover(old, timeout=30)
    client.set(f"{NAMESPACE}:rq-probe", "after")
    assert new.client().get(f"{NAMESPACE}:rq-probe") == b"after"
    client.close()
    monkeypatch.undo()
    importlib.reload(importlib.import_module("tokencache.worker.settings"))
    importlib.reload(workers.settings)
