"""``store()``: round trips, and throughput against a raw write of the same hash.

    .venv/bin/python -m bench --only store [--quick]

Round trips are the requests the client sends (a pipeline or MULTI/EXEC is
one). Throughput: ``store()`` of 1,000 tokens in turn (hash, TTL, index entry
and the refresh job, one MULTI/EXEC) against the baseline, a raw pipelined
``HSET`` + ``EXPIREAT`` of the same hash (what a cache without refresh
scheduling would send), in alternating rounds; medians.
"""

from __future__ import annotations

import itertools
import time

from tokencache import Token, TokenStore
from tokencache.core.record import to_fields

from .common import (
    ACCESS_TOKEN,
    SCOPE,
    BenchEnv,
    Result,
    alternate,
    counting_client,
    ops_per_second,
    round_trips,
)

BENCH = "store"
TOKENS = 1000


def run(env: BenchEnv, quick: bool) -> list[Result]:
    rounds, seconds = (3, 1.5) if quick else (7, 3.0)
    client = counting_client(env)
    store = TokenStore(client, namespace="tokencache", refresh_before=10, queue="tokencache")
    expires = int(time.time()) + 3600
    tokens = [
        Token(token=ACCESS_TOKEN, scope=SCOPE, expires=expires, sub=f"user{i}@example.com")
        for i in range(TOKENS)
    ]
    keys = [store.keys.token(store.key_for(t)) for t in tokens]
    hashes = [
        (
            key,
            to_fields(t, redis_key=key, ring=store.encryption, refresh_at=t.expires - 10, refreshed_at=None),
        )
        for key, t in zip(keys, tokens, strict=True)
    ]
    store.store(tokens[0])  # the job exists: later stores move it, as they mostly do
    commands_before = int(client.info("stats")["total_commands_processed"])
    store_trips = round_trips(lambda: store.store(tokens[0]))
    # Less the first INFO (counted once it ran) and MULTI/EXEC.
    commands = int(client.info("stats")["total_commands_processed"]) - commands_before - 3
    next_token, next_hash = itertools.cycle(tokens), itertools.cycle(hashes)

    def raw() -> None:
        key, fields = next(next_hash)
        with client.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
            pipe.expireat(key, expires)
            pipe.execute()

    raw_trips = round_trips(raw)
    rates = alternate(
        {
            "store": lambda: ops_per_second(lambda: store.store(next(next_token)), seconds),
            "raw": lambda: ops_per_second(raw, seconds),
        },
        rounds,
    )
    return [
        Result(BENCH, "store() round trips (incl. refresh scheduling)", store_trips, "round trips",
               baseline="raw HSET+EXPIREAT", baseline_value=raw_trips, target="≤ 2", met=store_trips <= 2,
               note=f"{commands} commands in one MULTI/EXEC", limit=2),
        Result(BENCH, "store() ops/s (median)", rates["store"], "ops/s",
               baseline="raw pipelined HSET+EXPIREAT", baseline_value=rates["raw"],
               note=f"{rounds} alternating rounds of {seconds:g} s, {TOKENS:,} tokens in turn"),
    ]  # fmt: skip
