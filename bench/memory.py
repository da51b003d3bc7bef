"""Redis memory per cached token: ``INFO used_memory`` growth over N tokens, and what each part takes.

    .venv/bin/python -m bench --only memory [--quick]

Case: N tokens (100,000; 20,000 with ``--quick``) written with the commands of
``TokenStore.store()``; the audit stream those writes append to is capped, so its
size is subtracted and reported as a fixed cost of its own (batched 500 to a MULTI/EXEC to save time; the same
commands), each a 185-character access token for one user of the default
account (``sub=user{i}@example.com``): token hash, index entry, RQ job hash and
ScheduledJobRegistry entry. Baseline, measured in the same run on the same
keys: the floor, a bare ``HSET`` of the six token fields and ``EXPIREAT``.

Both run on the server's default config (``hash-max-listpack-value 64``),
which the target is set for, and again with ``hash-max-listpack-value 256``,
an optional setting for a Redis dedicated to tokens that lets the token hash
itself be a listpack. A refresh job that has run once carries RQ's record of
that run; its size is measured on one token refreshed by a real worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from redis import Redis
from rq.job import Job

from tokencache import Token, TokenStore
from tokencache.testing.workers import PoolProcess

from .common import ACCESS_TOKEN, SCOPE, BenchEnv, Result

BENCH = "memory"
TARGET = 1536
"""Bytes per cached token (1.5 KB), everything included."""
BATCH = 500
NAMESPACE = QUEUE = "tokencache"


def tokens(n: int) -> list[Token]:
    expires = int(time.time()) + 3600
    return [
        Token(token=ACCESS_TOKEN, scope=SCOPE, expires=expires, sub=f"user{i}@example.com") for i in range(n)
    ]


def settled_used_memory(client: Redis) -> int:
    """``used_memory`` once Redis has finished rehashing (two reads 0.2 s apart agree)."""
    last = -1
    for _ in range(25):
        now = int(client.info("memory")["used_memory"])
        if now == last:
            return now
        last = now
        time.sleep(0.2)
    return last


def growth(client: Redis, write: Callable[[], None]) -> int:
    """Bytes ``used_memory`` grows by while ``write`` runs, on an empty database."""
    client.flushdb()  # server started by this test (the bench's own)
    before = settled_used_memory(client)
    write()
    return settled_used_memory(client) - before


def write_floor(client: Redis, batch: list[Token]) -> None:
    for start in range(0, len(batch), BATCH):
        with client.pipeline(transaction=False) as pipe:
            for t in batch[start : start + BATCH]:
                key = f"{NAMESPACE}:token:default:https%3A//www.googleapis.com/auth/cloud-platform:{t.sub}"
                fields = {"token": t.token, "type": t.type, "scope": t.scope, "sub": t.sub or "",
                          "account": t.account or "", "expires": str(t.expires)}  # fmt: skip
                pipe.hset(key, mapping=fields)
                pipe.expireat(key, t.expires)
            pipe.execute()


def write_tokens(store: TokenStore, batch: list[Token]) -> None:
    for start in range(0, len(batch), BATCH):
        with store.redis.pipeline(transaction=True) as pipe:
            for t in batch[start : start + BATCH]:
                store.write_commands(pipe, store.key_for(t), t, fetched=False)
            pipe.execute()


@contextmanager
def listpack_value(client: Redis, size: int) -> Iterator[None]:
    (old,) = client.config_get("hash-max-listpack-value").values()
    client.config_set("hash-max-listpack-value", size)
    try:
        yield
    finally:
        client.config_set("hash-max-listpack-value", old)


def usage(client: Redis, key: str) -> int:
    return int(client.memory_usage(key, samples=0) or 0)


def encoding(client: Redis, key: str) -> str:
    return bytes(client.object("encoding", key)).decode()


def job_after_a_refresh(env: BenchEnv, store: TokenStore) -> tuple[int, str, int]:
    """MEMORY USAGE, encoding and field count of a refresh job's hash after a real worker ran it once."""
    t = Token(token=ACCESS_TOKEN, scope=SCOPE, expires=int(time.time()) + 5, sub=None)
    key = store.key_for(t)
    store.store(t)
    store.refresh_queue.enqueue(key, store.refresh_before)
    worker_env = env.child_env(credentials=True)
    PoolProcess.for_store(store, env.url, 1, env=worker_env, log_level="WARNING").run_burst(timeout=120)
    found = store.find(t.scope)
    if found is None or found.token == t.token:
        raise RuntimeError("the worker did not refresh the sample token")
    job_key = Job.key_for(store.keys.job_id(key))
    return usage(store.redis, job_key), encoding(store.redis, job_key), int(store.redis.hlen(job_key))


@dataclass
class Measured:
    """Per-token growth of the case and of the floor, and MEMORY USAGE (bytes, encoding) of the parts."""

    tokens: int
    case: float
    floor: float
    parts: dict[str, tuple[float, str]]

    def row(self, label: str) -> Result:
        note = "; ".join(f"{name} {size:.0f} B ({enc})" for name, (size, enc) in self.parts.items())
        return Result(BENCH, f"used_memory per token less the audit stream, {self.tokens:,} tokens, {label}",
                      self.case, "B",
                      baseline="bare HSET+EXPIREAT", baseline_value=self.floor, target="≤ 1.5 KB",
                      met=self.case <= TARGET, note=note, extra={"parts": self.parts},
                      limit=TARGET)  # fmt: skip


def measure(store: TokenStore, batch: list[Token], *, floor: bool = True) -> Measured:
    """``used_memory`` per token of ``batch`` as ``store`` writes it, and each part's MEMORY USAGE; with
    ``floor``, first the bare six-field hashes the row compares it with (NaN without)."""
    client, n = store.redis, len(batch)
    key = store.key_for(batch[0])
    token_key, job_key = store.keys.token(key), Job.key_for(store.keys.job_id(key))
    parts: dict[str, tuple[float, str]] = {}
    bare = float("nan")
    if floor:
        bare = growth(client, lambda: write_floor(client, batch)) / n
        parts["bare 6-field hash"] = (usage(client, token_key), encoding(client, token_key))
    grew = growth(client, lambda: write_tokens(store, batch))
    audit = usage(client, store.keys.audit)  # capped (TOKENCACHE_AUDIT_MAXLEN): a fixed cost, not per token
    case = (grew - audit) / n
    parts["token hash"] = (usage(client, token_key), encoding(client, token_key))
    parts["RQ job hash"] = (usage(client, job_key), encoding(client, job_key))
    zsets = {"index entry": store.keys.index, "schedule entry": store.refresh_queue.scheduled.key}
    for name, zset in zsets.items():
        parts[name] = (usage(client, zset) / n, "zset " + encoding(client, zset))
    parts["audit stream (fixed)"] = (audit, "stream, whole")
    return Measured(n, case, bare, parts)


def run(env: BenchEnv, quick: bool) -> list[Result]:
    batch = tokens(20_000 if quick else 100_000)
    store = TokenStore(env.client(), namespace=NAMESPACE, refresh_before=10, queue=QUEUE)
    default = measure(store, batch)
    p = default.parts
    results = [
        default.row("default config"),
        Result(BENCH, "audit stream (MEMORY USAGE, capped: a fixed cost)", p["audit stream (fixed)"][0], "B",
               note="TOKENCACHE_AUDIT_MAXLEN entries at most, whatever the token count"),
        Result(BENCH, "token hash (MEMORY USAGE)", p["token hash"][0], "B", baseline="bare 6-field hash",
               baseline_value=p["bare 6-field hash"][0], note=p["token hash"][1]),
        Result(BENCH, "RQ job hash (MEMORY USAGE)", p["RQ job hash"][0], "B", note=p["RQ job hash"][1]),
        Result(BENCH, "index entry (MEMORY USAGE / N)", p["index entry"][0], "B", note=p["index entry"][1]),
        Result(BENCH, "schedule entry (MEMORY USAGE / N)", p["schedule entry"][0], "B",
               note=p["schedule entry"][1]),
    ]  # fmt: skip
    store.redis.flushdb()  # server started by this test (the bench's own)
    ran, ran_encoding, ran_fields = job_after_a_refresh(env, store)
    stored = p["RQ job hash"][0]
    results += [
        Result(BENCH, "RQ job hash after one refresh (MEMORY USAGE)", ran, "B", baseline="as stored",
               baseline_value=stored,
               note=f"{ran_encoding}, {ran_fields} fields: RQ's record of the run (worker, times, result)"),
        Result(BENCH, "per token once its job has run (estimate)", default.case + ran - stored, "B",
               note="used_memory per token + (job after one refresh - job as stored), default config"),
    ]  # fmt: skip
    with listpack_value(store.redis, 256):
        results.append(measure(store, batch).row("hash-max-listpack-value 256"))
    store.redis.flushdb()  # server started by this test (the bench's own)
    return results
