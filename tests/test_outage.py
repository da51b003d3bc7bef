"""Nothing is given up for good on a transient failure; a hopeless one stops and says so; a rate-limited
endpoint is given the time it asks for. Real worker pools, the real emulator, real google-auth."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from rq.job import Job, JobStatus

from tokencache import Token, TokenCacheError, TokenStore
from tokencache.core.sources import Sources
from tokencache.testing.emulator import Emulator
from tokencache.testing.redisserver import free_port

from .conftest import SCOPE, Workers, wait_for
from .test_metrics import scrape

CAP = 4
"""TOKENCACHE_BACKOFF_CAP of these tests' pools (seconds): short, so an outage reaches it quickly."""
SLACK = 2.0
"""Beyond one cap, until a recovered endpoint's token is readable: RQ's scheduler polls once a second
(and its whole-second scores may add up to a second), then a worker picks the job up, fetches, writes."""
RETRY_AFTER = 3
"""Seconds of the emulator's Retry-After in the rate-limit test."""
AFTER_EXPIRY = 16
"""Seconds the outage lasts past the token's expiry: longer than the 1+2+4+8 s of backoff after which the
old refresh gave up for good (its fifth failure in a row with no valid token left)."""
FOREVER = 10**9
"""fail_next for "every request fails until the test says otherwise"."""


def opaque(expires_in: float, **kw: object) -> Token:
    """A token that did not come from the emulator (so we can tell it from a refreshed one)."""
    return Token(token="ya29.outage-original-000", scope=SCOPE, expires=int(time.time() + expires_in), **kw)  # type: ignore[arg-type]


def status(workers: Workers) -> tuple[int, dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "tokencache", "status", "--json"],
        env=workers.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.returncode, json.loads(out.stdout)


def test_an_outage_longer_than_a_tokens_life_heals_within_one_cap_for_a_find_only_fleet(
    store: TokenStore, workers: Workers, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bound: the endpoint fails every request from before the refresh is due until 16 s after the
    token expired (28 s in all); once it answers again, a reader that only calls find() has a valid
    token within CAP + SLACK = 6 s, with nobody asking for it, and ``tokencache status`` exits 0."""
    monkeypatch.setenv("TOKENCACHE_BACKOFF_CAP", str(CAP))
    emulator.config.fail_next = FOREVER
    workers.start(1)
    old = opaque(12)  # due in 2 s
    store.store(old)
    wait_for(lambda: time.time() > old.expires + AFTER_EXPIRY, timeout=40, what="the outage to last")
    assert store.find(SCOPE) is None
    retries = [t for t in emulator.stats()["request_times"] if t > old.expires]
    assert len(retries) >= AFTER_EXPIRY // CAP, retries  # the refresh kept trying after the token expired
    emulator.config.fail_next = 0
    recovered = time.monotonic()
    token = wait_for(lambda: store.find(SCOPE), timeout=CAP + SLACK, interval=0.02, what="token back")
    print(f"endpoint back -> token back in {time.monotonic() - recovered:.2f}s (cap {CAP}s)")
    assert token.token != old.token and emulator.validate(token.token) is not None
    assert emulator.stats()["issued"] == 1
    code, report = status(workers)
    assert code == 0, report["problems"]


def rejected_key(emulator: Emulator, path: Path, email: str) -> None:
    """A key file of an account the endpoint knows, signed with a private key it never saw (a deleted key)."""
    info = emulator.create_service_account(email)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info["private_key"] = stranger.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path.write_text(json.dumps(info))


def test_a_key_the_endpoint_rejects_stops_retrying_and_says_so(
    store: TokenStore, workers: Workers, emulator: Emulator, tmp_path: Path
) -> None:
    """Bound: one token request and no other, before and after the token expired (the old code retried
    5+ times); the job fails into RQ's failed registry; the hash and ``tokencache status`` (exit 1) name
    the endpoint's reason (invalid_grant) while the token is cached and after it expired. Fixing the key
    and restarting the workers brings the token back within 5 s and status to exit 0."""
    email = "rejected@tokencache-emulator.iam.gserviceaccount.com"
    rejected_key(emulator, tmp_path / "keys" / "rejected.json", email)  # the pools' TOKENCACHE_CREDENTIALS
    workers.start(1)
    old = opaque(12, account=email)  # due in 2 s
    key = store.key_for(old)
    store.store(old)
    job_id = store.keys.job_id(key)
    wait_for(
        lambda: Job.fetch(job_id, store.redis).get_status(refresh=False) == JobStatus.FAILED,
        timeout=8,
        what="the refresh to give up",
    )
    assert emulator.stats()["token_requests"] == 1
    assert b"invalid_grant" in store.redis.hget(store.keys.token(key), "last_error")
    assert store.redis.hget(store.keys.token(key), "gave_up_at") is not None
    for moment in ("cached", "expired"):
        if moment == "expired":
            wait_for(lambda: time.time() > old.expires + 3, timeout=15, what="expiry and 3 repair passes")
        code, report = status(workers)
        assert code == 1 and report["failed"] == 1, (moment, report)
        assert any("invalid_grant" in problem for problem in report["problems"]), (moment, report)
        assert store.redis.zscore(store.keys.index, store.keys.token(key)) is not None, moment
        assert emulator.stats()["token_requests"] == 1, moment
    emulator.write_service_account(tmp_path / "keys" / "rejected.json", email=email)  # the operator's fix
    for pool in workers.pools:
        pool.stop()
    workers.start(1)  # a restart loads the fixed key, and retries what gave up
    wait_for(lambda: store.find((email, SCOPE)), timeout=5, what="the token back after the fix")
    code, report = status(workers)
    assert code == 0, report["problems"]


def test_rate_limited_answers_are_waited_out_and_misses_add_no_requests(
    store: TokenStore, redis_url: str, workers: Workers, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bound: while the endpoint answers 429 with Retry-After: 3 and 8 for_scope callers without
    credentials keep missing, every gap between two token requests is at least 3 s (the workers'
    backoff schedule: max(Retry-After, backoff), here <= 4 s); each 429 is counted in
    tokencache_endpoint_rate_limited_total; once the endpoint answers, the callers get the token."""
    monkeypatch.setenv("TOKENCACHE_BACKOFF_CAP", str(CAP))
    emulator.config.update({"fail_next": FOREVER, "failure_status": 429, "retry_after": RETRY_AFTER})
    port = free_port()
    workers.start(1, args=("--metrics-port", str(port)))
    stop, misses, got = threading.Event(), [0] * 8, [False] * 8

    def caller(i: int) -> None:
        app = TokenStore.from_url(redis_url, namespace=store.keys.namespace, queue=store.refresh_queue.name,
                                  sources=Sources(use_adc=False))  # fmt: skip
        while not stop.is_set() and not got[i]:
            try:
                app.for_scope(SCOPE, timeout=2)
                got[i] = True
            except TokenCacheError:
                misses[i] += 1
                stop.wait(0.1)  # an app's next request
        app.close()

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        wait_for(
            lambda: emulator.stats()["token_requests"] >= 4, timeout=25, what="four rate-limited requests"
        )
        emulator.config.fail_next = 0
        wait_for(lambda: all(got), timeout=RETRY_AFTER + CAP + SLACK, what="every caller has the token")
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    stats = emulator.stats()
    times = stats["request_times"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    print(f"gaps between token requests: {', '.join(f'{g:.2f}' for g in gaps)}; misses {sum(misses)}")
    assert min(gaps) >= RETRY_AFTER - 0.05, gaps
    assert sum(misses) >= 16  # the callers really kept missing meanwhile
    rate_limited = stats["failed"]
    assert rate_limited >= 4 and stats["issued"] == 1
    values = wait_for(
        lambda: (v := scrape(port)).get("tokencache_endpoint_rate_limited_total{}") == rate_limited and v,
        timeout=10,
        what="the rate-limited answers counted",
    )
    assert values["tokencache_endpoint_rate_limited_total{}"] == rate_limited
