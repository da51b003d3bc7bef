"""Round trips of find()/store() and Redis memory per cached token, on a private redis-server.

    .venv/bin/python -m bench.layout [--tokens N]

Round trips are counted as the requests the client sends (a pipeline is one);
memory as MEMORY USAGE of each key of one token, and as INFO used_memory
growth per token over N tokens.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from redis import ConnectionPool, Redis
from redis.connection import Connection
from rq.job import Job

from tokencache import Token, TokenStore
from tokencache.redisserver import EmbeddedRedis

SCOPE = "https://www.googleapis.com/auth/cloud-platform"


class CountingConnection(Connection):
    """A redis-py connection that counts what it sends: one send, one round trip."""

    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        super().send_packed_command(command, check_health)


def round_trips(store: TokenStore, call: Any) -> int:
    before = CountingConnection.sent
    call()
    return CountingConnection.sent - before


def token(i: int) -> Token:
    return Token(token="ya29." + "x" * 180, scope=f"{SCOPE} s{i}", expires=int(time.time()) + 3600)


def one_token_keys(store: TokenStore) -> list[tuple[str, int]]:
    t = token(0)
    job = store.store(t)
    assert job is not None
    key = store.keys.token(store.key_for(t))
    rows = [("token hash", key), ("RQ job hash", Job.key_for(job.id))]
    return [(name, int(store.redis.memory_usage(k, samples=0) or 0)) for name, k in rows]


def per_token(store: TokenStore, n: int) -> float:
    store.redis.flushdb()  # server started by this benchmark
    before = int(store.redis.info("memory")["used_memory"])
    for i in range(n):
        store.store(token(i))
    after = int(store.redis.info("memory")["used_memory"])
    for name, key in (
        ("index zset", store.keys.index),
        ("RQ scheduled zset", store.refresh_queue.scheduled.key),
    ):
        size = int(store.redis.memory_usage(key, samples=0) or 0)
        print(f"MEMORY USAGE {name} / {n}: {size / n:.0f} B per token")
    return (after - before) / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=10_000)
    args = parser.parse_args()
    with EmbeddedRedis() as server:
        pool = ConnectionPool(connection_class=CountingConnection, host="127.0.0.1", port=server.port)
        client = Redis(connection_pool=pool)
        store = TokenStore(client, namespace="tokencache", refresh_before=10, queue="tokencache")
        client.ping()
        t = token(0)
        print(
            f"round trips: store() = {round_trips(store, lambda: store.store(t))}, "
            f"find() = {round_trips(store, lambda: store.find(t.scope))}"
        )
        for name, size in one_token_keys(store):
            print(f"MEMORY USAGE {name}: {size} B")
        print(
            f"used_memory per token over {args.tokens} tokens (hash + index + job + schedule): "
            f"{per_token(store, args.tokens):.0f} B"
        )


if __name__ == "__main__":
    main()
