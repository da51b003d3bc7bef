"""Where find()'s time goes beyond the round trip: a pyinstrument profile and per-step costs.

    .venv/bin/python -m bench.profile_find [--calls 20000]

The per-step costs are measured without Redis (fakeredis, a reply in hand), so
they show what tokencache adds on top of redis-py's HGETALL.
"""

from __future__ import annotations

import argparse
import time
import timeit

import fakeredis
from pyinstrument import Profiler

from tokencache import Token, TokenStore, metrics
from tokencache.core.connection import connect
from tokencache.testing.redisserver import EmbeddedRedis

from .common import ACCESS_TOKEN, SCOPE


def steps() -> None:
    store = TokenStore(fakeredis.FakeRedis(), namespace="bench-profile")
    store.store(Token(token=ACCESS_TOKEN, scope=SCOPE, expires=int(time.time()) + 3600))
    _, redis_key = store._key_memo.get(SCOPE, None)
    raw = dict(store.redis.hgetall(redis_key))
    for name, call in (
        ("key for (info, sub)", lambda: store._key_memo.get(SCOPE, None)),
        ("reply -> Token, expiry check", lambda: store.usable_token(redis_key, raw)),
        ("hit/miss counter", lambda: metrics.record_read(True)),
    ):
        n = 200_000
        print(f"{name:32} {timeit.timeit(call, number=n) / n * 1e6:6.2f} us")


def profile(calls: int) -> None:
    with EmbeddedRedis() as server:
        store = TokenStore(connect(server.url), namespace="bench-profile")
        store.store(Token(token=ACCESS_TOKEN, scope=SCOPE, expires=int(time.time()) + 3600))
        profiler = Profiler(interval=0.0001)
        profiler.start()
        for _ in range(calls):
            store.find(SCOPE)
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    steps()
    profile(args.calls)


if __name__ == "__main__":
    main()
