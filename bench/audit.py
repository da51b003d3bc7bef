"""The audit trail's cost: Redis memory per entry, and what an entry adds to the writes that append one.

    .venv/bin/python -m bench --only audit [--quick]

Memory: the default cap's worth of entries (10,000; 2,000 with ``--quick``), each what a refresh
worker appends for one user's token of the default account (``sub=user{i}@example.com``), written
through the refresh job's own write; ``MEMORY USAGE`` of the stream (``SAMPLES 0``: every node
counted) divided by ``XLEN``. Baseline: the same entries' field values alone, in bytes (what any
record of them must hold).

Cost: the refresh job's write (``replace_if_indexed``: one Lua script) and ``store()`` (one
MULTI/EXEC), each with the trail on (``TOKENCACHE_AUDIT_MAXLEN=10000``, the stream already full so
that every append also trims) against the trail off (``0``), in alternating rounds; medians. On a
shared machine those throughputs are noisy, so the server's own CPU time per call (``INFO
commandstats``: the refresh script's ``usec_per_call``, on against off, and the ``XADD`` that
``store()`` adds) is reported too. ``find()`` appends nothing and is not measured here.
"""

from __future__ import annotations

import time

from tokencache import Token, TokenStore
from tokencache.constants import AUDIT_MAXLEN
from tokencache.core.audit import Audit, Event, Role
from tokencache.keys import TokenKey
from tokencache.worker.writes import replace_if_indexed

from .common import ACCESS_TOKEN, SCOPE, BenchEnv, Result, alternate, ops_per_second

BENCH = "audit"
NAMESPACE = "tokencache"


def _token(i: int, expires: int) -> Token:
    return Token(token=ACCESS_TOKEN, scope=SCOPE, expires=expires, sub=f"user{i}@example.com")


def memory(env: BenchEnv, n: int) -> Result:
    client = env.client()
    worker = TokenStore(client, namespace=NAMESPACE, queue=NAMESPACE, audit=Audit(AUDIT_MAXLEN, Role.WORKER))
    expires = int(time.time()) + 3600
    raw = 0
    for i in range(n):
        token = _token(i, expires)
        key = worker.key_for(token)
        client.zadd(worker.keys.index, {worker.keys.token(key): expires})  # indexed: the write goes ahead
        replace_if_indexed(worker, key, token, outcome="due")
        entry = worker.audit.entry(Event.FETCHED, key, outcome="due", token=token.token, expires=expires)
        raw += sum(len(value) for value in entry.values())
    length = int(client.xlen(worker.keys.audit))
    used = int(client.memory_usage(worker.keys.audit, samples=0) or 0)
    at_cap = used * AUDIT_MAXLEN / length / 1e6
    note = f"MEMORY USAGE {used:,} B / XLEN {length:,}; {at_cap:.2f} MB at the default cap, {AUDIT_MAXLEN:,}"
    return Result(BENCH, "Redis memory per audit entry", used / length, "bytes",
                  baseline="the entry's values alone", baseline_value=raw / n, note=note)  # fmt: skip


def costs(env: BenchEnv, quick: bool) -> list[Result]:
    rounds, seconds = (3, 1.0) if quick else (7, 2.0)
    client = env.client()
    stores = {
        on: TokenStore(client, namespace=NAMESPACE, queue=NAMESPACE, audit=Audit(AUDIT_MAXLEN if on else 0))
        for on in (True, False)
    }
    expires = int(time.time()) + 3600
    token = _token(0, expires)
    key = TokenKey.of(None, SCOPE, token.sub)
    stores[True].store(token)  # indexed, with its job: what a refresh rewrites

    def refresh(on: bool) -> float:
        return ops_per_second(lambda: replace_if_indexed(stores[on], key, token, outcome="due"), seconds)

    def store(on: bool) -> float:
        return ops_per_second(lambda: stores[on].store(token), seconds)

    writes = alternate({"on": lambda: refresh(True), "off": lambda: refresh(False)}, rounds)
    stored = alternate({"on": lambda: store(True), "off": lambda: store(False)}, rounds)
    note = f"{rounds} alternating rounds of {seconds:g} s; the stream full ({AUDIT_MAXLEN:,}): appends trim"
    return [
        Result(BENCH, "refresh write ops/s, audit on (median)", writes["on"], "ops/s",
               baseline="audit off (TOKENCACHE_AUDIT_MAXLEN=0)", baseline_value=writes["off"], note=note),
        Result(BENCH, "store() ops/s, audit on (median)", stored["on"], "ops/s",
               baseline="audit off (TOKENCACHE_AUDIT_MAXLEN=0)", baseline_value=stored["off"], note=note),
    ]  # fmt: skip


def server_cpu(env: BenchEnv, quick: bool) -> list[Result]:
    """Redis's CPU time per call, from ``INFO commandstats`` (the bench's own server: reset at will)."""
    calls = 5000 if quick else 20000
    client = env.client()
    token = _token(0, int(time.time()) + 3600)
    key = TokenKey.of(None, SCOPE, token.sub)
    script: dict[bool, float] = {}
    for on in (True, False):
        audit = Audit(AUDIT_MAXLEN if on else 0)
        worker = TokenStore(client, namespace=NAMESPACE, queue=NAMESPACE, audit=audit)
        worker.store(token)
        client.config_resetstat()
        for _ in range(calls):
            replace_if_indexed(worker, key, token, outcome="due")
        script[on] = float(client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])
    client.config_resetstat()
    store = TokenStore(client, namespace=NAMESPACE, queue=NAMESPACE, audit=Audit(AUDIT_MAXLEN))
    for _ in range(calls // 4):
        store.store(token)
    xadd = float(client.info("commandstats")["cmdstat_xadd"]["usec_per_call"])
    return [
        Result(BENCH, "refresh write: Redis CPU per call, audit on", script[True], "µs",
               baseline="audit off", baseline_value=script[False], note=f"usec_per_call, {calls:,} calls"),
        Result(BENCH, "store(): Redis CPU of its XADD", xadd, "µs", note=f"usec_per_call, {calls // 4:,}"),
    ]  # fmt: skip


def run(env: BenchEnv, quick: bool) -> list[Result]:
    results = [memory(env, 2000 if quick else AUDIT_MAXLEN)]
    return results + costs(env, quick) + server_cpu(env, quick)  # after memory(): the stream is full
