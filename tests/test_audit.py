"""The audit trail (``{ns}:audit``): real workers, the emulator, real google-auth, a real redis-server.

What it promises (docs/operations.md#audit-trail): every token fetched (by a worker or an app), stored,
evicted by ``invalidate()`` or given up on appends one entry, in the same write, naming who and the
token's fingerprint, never the token; the stream stays bounded; ``tokencache audit`` shows it.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq.job import Job, JobStatus

from tokencache import ConfigurationError, RedisUnavailableError, Token, TokenStore, aio
from tokencache.cli.text import cell
from tokencache.constants import AUDIT_FOLLOW_BLOCK, AUDIT_MAXLEN, AUDIT_MAXLEN_LIMIT
from tokencache.core.audit import FIELDS, Audit, Event, Role, parse_entry
from tokencache.core.sources import Sources
from tokencache.keys import TokenKey
from tokencache.testing.emulator import Emulator
from tokencache.token import fingerprint, scrub
from tokencache.worker.batch import refresh_due
from tokencache.worker.refresh import _audit as refresh_audit
from tokencache.worker.writes import replace_if_indexed

from .conftest import (
    SCOPE,
    AsyncFacade,
    Workers,
    async_client_like,
    descendants,
    sync_or_async_store,
    token_text,
    wait_for,
)
from .test_batch import LEADER, FakeFetch, an_hour_ago, original
from .test_outage import rejected_key

REJECTED = "rejected@tokencache-emulator.iam.gserviceaccount.com"


def opaque(expires_in: float, tag: str = "0000", **kw: Any) -> Token:
    """A token that did not come from the emulator (so we can tell it from a fetched one)."""
    return Token(
        token=f"ya29.audit-original-{token_text(tag)}",
        scope=SCOPE,
        expires=int(time.time() + expires_in),
        **kw,
    )


def entries(store: TokenStore, event: str | None = None) -> list[dict[str, Any]]:
    """The stream's entries, oldest first, as ``tokencache audit`` reads them (``event``: only those)."""
    found = [parse_entry(i, fields) for i, fields in store.redis.xrange(store.keys.audit)]
    return [e for e in found if event is None or e["event"] == event]


def pick(entry: dict[str, Any], *names: str) -> tuple[Any, ...]:
    return tuple(entry[name] for name in names)


def assert_no_token_in(store: TokenStore, *secrets: str) -> None:
    """No field name or value of any entry holds any of the access tokens (nor a part long enough to use)."""
    for _, fields in store.redis.xrange(store.keys.audit):
        for item in (*fields.keys(), *fields.values()):
            for secret in secrets:
                assert secret.encode() not in item and secret[5:].encode() not in item, (secret, fields)


# -- a worker's refresh, an app's fetch, a store ---------------------------------------------------


def test_a_refresh_appends_one_fetched_entry_naming_the_worker_and_the_new_tokens_fingerprint(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    pool = workers.start(1)
    old = opaque(12)  # due in 2 s
    store.store(old)
    new = wait_for(
        lambda: (t := store.find(SCOPE)) is not None and t.token != old.token and t, 15, what="refresh"
    )
    (stored,) = entries(store, "stored")  # the fetched entry came in the same script as the token
    assert (stored["role"], stored["pid"], stored["fp"]) == ("app", str(os.getpid()), fingerprint(old.token))
    (fetched,) = entries(store, "fetched")
    assert fetched["fp"] == fingerprint(store.find(SCOPE).token) == fingerprint(new.token)
    assert (fetched["role"], fetched["outcome"], fetched["expires"]) == ("worker", "due", str(new.expires))
    assert (fetched["account"], fetched["scope"], fetched["sub"]) == ("default", SCOPE, "")
    assert fetched["host"] == socket.gethostname() and int(fetched["pid"]) in descendants(pool.pid)
    assert fetched["error"] == ""
    assert emulator.stats()["issued"] == 1 and len(entries(store)) == 2
    assert_no_token_in(store, old.token, new.token)


def test_a_token_the_apps_asked_the_workers_for_is_fetched_because_missing(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    workers.start(1)
    app = TokenStore(store.redis, namespace=store.keys.namespace, queue=store.refresh_queue.name,
                     sources=Sources(use_adc=False))  # fmt: skip
    token = app.for_scope(SCOPE, "asked@example.com", timeout=10)
    wait_for(lambda: entries(store, "fetched"), 5, what="the fetched entry")
    (entry,) = entries(store)
    assert (entry["sub"], entry["outcome"], entry["role"]) == ("asked@example.com", "missing", "worker")
    assert entry["fp"] == fingerprint(token.token) and emulator.stats()["issued"] == 1


def test_batch_members_are_audited_each_as_batched(store: TokenStore) -> None:
    """In this process, with a stand-in fetch (deterministic): one entry per member written."""
    soon = int(time.time()) + store.refresh_before + 2  # due in 2 s: inside the look-ahead
    then = an_hour_ago(store)
    for sub in ("leader@example.com", "a@example.com", "b@example.com"):
        then.store(original(sub, soon))
    worker = TokenStore(store.redis, namespace=store.keys.namespace, queue=store.refresh_queue.name,
                        audit=Audit(100, Role.WORKER))  # fmt: skip
    assert refresh_due(worker, FakeFetch(), exclude=LEADER, threads=2)["refreshed"] == 2
    batched = {e["sub"]: e for e in entries(store, "fetched") if e["role"] == "worker"}
    assert sorted(batched) == ["a@example.com", "b@example.com"]
    for sub, entry in batched.items():
        assert entry["outcome"] == "batched" and entry["fp"] == fingerprint(f"ya29.new-{token_text(sub)}")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_app_that_fetches_with_its_own_credentials_says_app(
    mode: str, store: TokenStore, real_redis: Redis, tokencache_key_file: Path, emulator: Emulator
) -> None:
    sources = Sources(files={"default": tokencache_key_file}, use_adc=False)
    settings: dict[str, Any] = dict(
        namespace=store.keys.namespace, queue=store.refresh_queue.name, sources=sources
    )
    app: Any = TokenStore(real_redis, **settings)
    if mode == "async":
        app = AsyncFacade(aio.TokenStore(async_client_like(real_redis), **settings), real_redis)
    try:
        token = app.for_scope(SCOPE, "someone@example.com", timeout=10)
        assert app.find(SCOPE, "someone@example.com") == token  # a read appends nothing
    finally:
        if mode == "async":
            app.close()
    (entry,) = entries(store)
    assert pick(entry, "event", "outcome", "role", "pid") == ("fetched", "miss", "app", str(os.getpid()))
    assert pick(entry, "fp", "expires") == (fingerprint(token.token), str(token.expires))
    assert entry["sub"] == "someone@example.com"
    assert emulator.stats()["issued"] == 1
    assert_no_token_in(store, token.token)


# -- invalidate --------------------------------------------------------------------------------------


@pytest.fixture(params=["sync", "async"])
def ts(request: pytest.FixtureRequest, any_redis: Redis) -> Iterator[TokenStore]:
    yield from sync_or_async_store(request, any_redis, "tc-audit")


def test_invalidate_appends_an_entry_only_when_it_evicted(ts: TokenStore) -> None:
    t = opaque(3600)
    ts.store(t)
    assert not ts.invalidate(SCOPE, "ya29.some-other-token")  # not the stored one: nothing happened
    assert entries(ts, "invalidated") == []
    assert ts.invalidate(SCOPE, t)
    assert not ts.invalidate(SCOPE, t.token)  # evicted already: its refetch is on its way
    (entry,) = entries(ts, "invalidated")
    assert (entry["outcome"], entry["role"], entry["fp"]) == ("evicted", "app", fingerprint(t.token))
    assert entry["expires"] == str(t.expires)  # read from the hash by the script
    assert_no_token_in(ts, t.token)


# -- a give-up ----------------------------------------------------------------------------------------


def test_a_refresh_that_gives_up_appends_one_entry_with_the_error(
    store: TokenStore, workers: Workers, emulator: Emulator, tmp_path: Path
) -> None:
    rejected_key(emulator, tmp_path / "keys" / "rejected.json", REJECTED)  # the pools' TOKENCACHE_CREDENTIALS
    workers.start(1)
    old = opaque(12, account=REJECTED)
    store.store(old)
    job_id = store.keys.job_id(store.key_for(old))
    wait_for(lambda: Job.fetch(job_id, store.redis).get_status(refresh=False) == JobStatus.FAILED, 8,
             what="the refresh to give up")  # fmt: skip
    (entry,) = entries(store, "gave_up")
    assert pick(entry, "role", "outcome", "account") == ("worker", "CredentialsRejectedError", REJECTED)
    assert "invalid_grant" in entry["error"]
    assert (entry["fp"], entry["expires"]) == (fingerprint(old.token), str(old.expires))  # left to expire
    assert entries(store, "fetched") == []
    assert_no_token_in(store, old.token)


# -- size and configuration ------------------------------------------------------------------------------


def test_the_stream_stays_within_its_cap_on_both_write_paths(real_redis: Redis) -> None:
    """``MAXLEN ~ N`` trims whole nodes (100 entries at most): the stream holds N to N + 100 entries."""
    cap = 150
    store = TokenStore(real_redis, namespace="tc-audit-cap", audit=Audit(cap))
    expires = int(time.time()) + 3600
    for i in range(1000):  # store(): the MULTI/EXEC path
        store.store(Token(token=f"ya29.cap-{i}", scope=SCOPE, expires=expires, sub=f"u{i}@example.com"))
    assert cap <= real_redis.xlen(store.keys.audit) <= cap + 100
    key = TokenKey.of(None, SCOPE, "u1@example.com")
    worker = TokenStore(real_redis, namespace="tc-audit-cap", audit=Audit(cap, Role.WORKER))
    for i in range(1000):  # the refresh job's write: the Lua path
        assert replace_if_indexed(worker, key, Token(token=f"ya29.lua-{i}", scope=SCOPE, expires=expires),
                                  outcome="due")  # fmt: skip
    assert cap <= real_redis.xlen(store.keys.audit) <= cap + 100
    assert entries(store)[-1]["fp"] == fingerprint("ya29.lua-999")


@pytest.fixture(params=["sync", "async"])
def real_ts(request: pytest.FixtureRequest, real_redis: Redis) -> Iterator[TokenStore]:
    yield from sync_or_async_store(request, real_redis, "tc-audit-wedge")


def test_a_refused_audit_entry_never_fails_its_write_and_other_errors_still_raise(
    real_ts: TokenStore, real_redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream wedged by an entry with the largest id refuses every ``XADD *``: store()'s MULTI checks
    its XADD's reply alone (EXEC does not roll back: the write was made), and the scripts use pcall."""
    stream = real_ts.keys.audit
    real_redis.xadd(stream, {"event": "x"}, id="18446744073709551615-18446744073709551615", maxlen=0)
    t = opaque(3600)
    with caplog.at_level(logging.WARNING, logger="tokencache.core.audit"):
        real_ts.store(t)
        assert real_ts.find(SCOPE) == t
        assert real_ts.invalidate(SCOPE, t)  # the INVALIDATE script's XADD, by pcall
    assert caplog.text.count("the audit entry was not appended") == 2 and "exhausted" in caplog.text
    real_redis.set(real_ts.keys.index, "not a sorted set")
    with pytest.raises(RedisUnavailableError, match="WRONGTYPE"):  # the write's own error still raises
        real_ts.store(opaque(3600, "1111"))


def test_zero_turns_the_trail_off_and_a_bad_value_names_the_variable(
    real_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENCACHE_AUDIT_MAXLEN", "0")
    store = TokenStore(real_redis, namespace="tc-audit-off", sources=Sources(use_adc=False))
    t = opaque(3600)
    store.store(t)
    assert store.invalidate(SCOPE, t)
    assert not real_redis.exists(store.keys.audit)
    for bad in ("ten", "-1", "1.5"):
        monkeypatch.setenv("TOKENCACHE_AUDIT_MAXLEN", bad)
        with pytest.raises(ConfigurationError, match=f"TOKENCACHE_AUDIT_MAXLEN='{bad}'"):
            TokenStore(real_redis, namespace="tc-audit-off")


def test_a_maxlen_beyond_the_limit_is_refused_at_configuration(
    real_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2**63 and up were accepted, then every store() failed inside Redis after writing."""
    for too_many in (str(2**63), str(AUDIT_MAXLEN_LIMIT + 1)):
        monkeypatch.setenv("TOKENCACHE_AUDIT_MAXLEN", too_many)
        with pytest.raises(
            ConfigurationError, match=f"TOKENCACHE_AUDIT_MAXLEN={too_many} is more than 10,000,000"
        ):
            TokenStore(real_redis, namespace="tc-audit-limit")
    monkeypatch.setenv("TOKENCACHE_AUDIT_MAXLEN", str(AUDIT_MAXLEN_LIMIT))
    store = TokenStore(real_redis, namespace="tc-audit-limit")
    store.store(opaque(3600))
    assert store.audit.maxlen == AUDIT_MAXLEN_LIMIT and real_redis.xlen(store.keys.audit) == 1


def test_a_bad_value_stops_the_pool_at_start_and_never_a_refresh_job(
    workers: Workers, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    out = cli("worker", "--burst", env={**workers.env(), "TOKENCACHE_AUDIT_MAXLEN": "lots"})
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "TOKENCACHE_AUDIT_MAXLEN='lots' is not a whole number of entries" in out.stderr
    monkeypatch.setenv("TOKENCACHE_AUDIT_MAXLEN", "lots")  # a plain rq worker's job: reported, default used
    assert refresh_audit() == Audit(AUDIT_MAXLEN, Role.WORKER)
    assert "TOKENCACHE_AUDIT_MAXLEN='lots'" in caplog.text


def test_an_entry_has_every_field_in_one_order_and_only_a_fingerprint() -> None:
    key = TokenKey.of("a@example.com", SCOPE, None)
    leaked = "ya29.leaked-in-an-error-0123456789"
    entry = Audit(10).entry(Event.GAVE_UP, key, error=f"boom: {leaked}", token="ya29.x")
    assert tuple(entry) == FIELDS
    assert entry["fp"] == fingerprint("ya29.x") and len(entry["fp"]) == 12
    assert entry["error"] == "boom: ya29.le…789"
    assert scrub("assertion eyJhbGciOi.eyJpc3MiOi.c2lnbmF0dXJl rejected") == "assertion eyJhbGc…XJl rejected"


# -- tokencache audit ----------------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tokencache", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_audit_shows_the_trail_newest_last_as_text_and_json(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    env = workers.env()
    assert cli("audit", env=env).stdout == ""  # no stream yet: nothing, exit 0
    t = opaque(3600)
    store.store(t)
    store.invalidate(SCOPE, t)
    fetched = cli("token", SCOPE, "--sub", "op@example.com", env=env)  # an operator's fetch, own credentials
    assert fetched.returncode == 0, fetched.stderr
    text = cli("audit", env=env)
    assert text.returncode == 0, text.stderr
    header, *lines = text.stdout.splitlines()
    assert header.split("\t")[:3] == ["TIME", "EVENT", "OUTCOME"] and len(lines) == 3
    assert [line.split("\t")[1] for line in lines] == ["stored", "invalidated", "fetched"]
    assert fingerprint(fetched.stdout.strip()) in lines[2] and "\toperator\t" in lines[2]
    as_json = [json.loads(line) for line in cli("audit", "--json", "-n", "2", env=env).stdout.splitlines()]
    assert [e["event"] for e in as_json] == ["invalidated", "fetched"]
    assert as_json[1]["role"] == "operator" and as_json[1]["sub"] == "op@example.com"
    assert isinstance(as_json[1]["expires"], int) and as_json[0]["error"] is None
    only = cli("audit", "--json", "--event", "stored", env=env).stdout.splitlines()
    assert [json.loads(line)["fp"] for line in only] == [fingerprint(t.token)]
    assert t.token not in text.stdout and fetched.stdout.strip() not in text.stdout


def test_audit_escapes_control_characters_so_a_sub_cannot_forge_a_row(
    store: TokenStore, workers: Workers
) -> None:
    hostile = "x\tforged\tcolumns\nfake\trow\x1b[2J\\t"
    store.store(opaque(3600, sub=hostile))
    out = cli("audit", env=workers.env())
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and len(lines[1].split("\t")) == len(lines[0].split("\t"))
    assert "\x1b" not in out.stdout
    assert "x\\tforged\\tcolumns\\nfake\\trow\\x1b[2J\\\\t" in lines[1]
    assert cell("a\u202eb\u2028c") == "a\\u202eb\\u2028c"  # bidi override and line separator too


def following(redis: Redis) -> bool:
    """Whether a client is in an XREAD (``tokencache audit --follow`` waiting for entries)."""
    return any(client.get("cmd") == "xread" for client in redis.client_list())


def test_audit_follow_prints_new_entries_as_they_come_and_ends_cleanly_on_ctrl_c(
    store: TokenStore, workers: Workers
) -> None:
    """Bound: an entry appended while the follower waits is printed within one read's block (1 s) and
    slack, also into a pipe (no PYTHONUNBUFFERED); Ctrl-C ends it with 130 and no traceback."""
    store.store(opaque(3600, tag="before"))  # in the stream already: -n 0 shows only what comes
    command = [sys.executable, "-m", "tokencache", "audit", "--follow", "--json", "-n", "0"]
    env = {k: v for k, v in workers.env().items() if k != "PYTHONUNBUFFERED"}  # an operator's, into a pipe
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: following(store.redis), 30, what="the follower's first read")
        for tag in ("first", "second"):  # each printed once, in turn: the next read starts after it
            t = opaque(3600, tag=tag)
            store.store(t)
            ready, _, _ = select.select([proc.stdout], [], [], AUDIT_FOLLOW_BLOCK + 2)
            assert ready, f"no entry within {AUDIT_FOLLOW_BLOCK + 2:g} s"
            assert json.loads(proc.stdout.readline())["fp"] == fingerprint(t.token)  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130 and "Traceback" not in err, err
