"""Encryption at rest: what it costs ``find()``, Redis memory, and a key rotation.

    .venv/bin/python -m bench --only encryption [--quick]

* **find()**: ops/s of ``find()`` on a store whose ring encrypts (``k1``) against ``find()`` of the same
  token stored in plaintext, on the same Redis, alternating rounds. Target ≥ 0.8 **on the path that
  decrypts**: ``find()`` with the token memo (:mod:`tokencache.app.reads`) emptied before every call, as
  the first read after every write is (that path also parses and validates the whole hash). The memo-hit
  path, where ``find()`` decrypts nothing, is reported beside it. Each case's ops/s is the median of
  many short alternating rounds (a shared machine's noise hits both cases alike), and the extra cost is
  given in µs per decrypting read, with ``Keyring.open`` alone timed in-process.
* **memory**: ``used_memory`` growth per cached token (the commands of ``store()``, everything
  included, as in ``bench/memory.py``) with the ring against without it, same run, same tokens;
  and at ``hash-max-listpack-value 256`` and 512 (an encrypted 185-character token is a
  ~290-character field, past 256).
* **rotation**: ``tokencache rekey``'s own function over N stored tokens: plaintext to ``k1`` (turning
  encryption on, under ``k1,plaintext`` as the procedure says), then ``k1`` to ``k2`` (a rotation);
  tokens and seconds.
"""

from __future__ import annotations

import contextlib
import time
import timeit

from tokencache import Token, TokenStore
from tokencache.cli.rekey import rekey
from tokencache.core.connection import connect
from tokencache.crypto import Keyring, new_key

from . import memory
from .common import ACCESS_TOKEN, SCOPE, BenchEnv, Result, alternate, ops_per_second

BENCH = "encryption"
NS = "bench-crypt"
K1, K2 = new_key(), new_key()
RING_1, TURN_ON, ROTATED = f"k1:{K1}", f"k1:{K1},plaintext", f"k2:{K2},k1:{K1}"


def _stores(env: BenchEnv) -> tuple[TokenStore, TokenStore]:
    """A plaintext store and an encrypting one, each with a token of its own under its own sub."""
    plain = TokenStore(connect(env.url), namespace=NS, encryption="")
    sealed = TokenStore(connect(env.url), namespace=NS, encryption=RING_1)
    expires = int(time.time()) + 3600
    plain.store(Token(token=ACCESS_TOKEN, scope=SCOPE, expires=expires, sub="plain"))
    sealed.store(Token(token=ACCESS_TOKEN, scope=SCOPE, expires=expires, sub="sealed"))
    field = sealed.redis.hget(sealed.keys.token(sealed.key_for_info(SCOPE, "sealed")), "token")
    assert field is not None and field.startswith(b"enc:k1:") and sealed.find(SCOPE, "sealed") is not None
    return plain, sealed


def _cold(store: TokenStore, sub: str) -> object:
    store._token_memo._memo.clear()  # as after every write: parse (and decrypt) the reply again
    return store.find(SCOPE, sub)


def find(env: BenchEnv, quick: bool) -> list[Result]:
    plain, sealed = _stores(env)
    window, rounds = (0.25, 11) if quick else (0.3, 41)
    medians = alternate(
        {
            "plain": lambda: ops_per_second(lambda: plain.find(SCOPE, "plain"), window),
            "sealed": lambda: ops_per_second(lambda: sealed.find(SCOPE, "sealed"), window),
            "plain cold": lambda: ops_per_second(lambda: _cold(plain, "plain"), window),
            "sealed cold": lambda: ops_per_second(lambda: _cold(sealed, "sealed"), window),
        },
        rounds,
    )
    plain.close()
    sealed.close()
    note = f"ops/s, median of {rounds} alternating rounds of {window} s; a {len(ACCESS_TOKEN)}-char token"
    hit, cold = medians["sealed"] / medians["plain"], medians["sealed cold"] / medians["plain cold"]
    extra_us = 1e6 / medians["sealed cold"] - 1e6 / medians["plain cold"]
    return [
        Result(BENCH, "find() ops/s, encrypted, memo emptied each call (decrypts every call)",
               medians["sealed cold"], "ops/s", "plaintext, memo emptied", medians["plain cold"],
               "ratio >= 0.8", cold >= 0.8, f"{note}; {extra_us:.1f} µs more per read", goal=0.8,
               extra={"extra_us_per_read": extra_us}),
        Result(BENCH, "find() ops/s, encrypted, memo hit (no decrypt)", medians["sealed"], "ops/s",
               "plaintext find()", medians["plain"], note=note, extra={"ratio": hit}),
        _decrypt_cost(quick),
    ]  # fmt: skip


def _decrypt_cost(quick: bool) -> Result:
    """µs per ``Keyring.open`` of a sealed token, in-process: the best of several repeats (the least
    disturbed by the rest of the machine)."""
    ring, redis_key = Keyring.parse(RING_1), f"{NS}:token:default:{SCOPE}:"
    sealed = ring.seal(ACCESS_TOKEN, redis_key)
    number = 2_000 if quick else 20_000
    best = min(timeit.repeat(lambda: ring.open(sealed, redis_key), number=number, repeat=5)) / number
    note = f"best of 5 repeats of {number:,} calls; AES-256-GCM of a {len(ACCESS_TOKEN)}-char token"
    return Result(BENCH, "decrypt (Keyring.open), µs per call", best * 1e6, "µs", note=note)


def _memory(env: BenchEnv, quick: bool) -> list[Result]:
    batch = memory.tokens(10_000 if quick else 50_000)
    plain = TokenStore(env.client(), namespace=memory.NAMESPACE, queue=memory.QUEUE, encryption="")
    sealed = TokenStore(env.client(), namespace=memory.NAMESPACE, queue=memory.QUEUE, encryption=RING_1)
    results = []
    for label, listpack in (("default config", None), ("hash-max-listpack-value 256", 256),
                            ("hash-max-listpack-value 512", 512)):  # fmt: skip
        with memory.listpack_value(plain.redis, listpack) if listpack else contextlib.nullcontext():
            off, on = memory.measure(plain, batch, floor=False), memory.measure(sealed, batch, floor=False)
        note = (
            f"token hash {on.parts['token hash'][0]:.0f} B ({on.parts['token hash'][1]}) against "
            f"{off.parts['token hash'][0]:.0f} B ({off.parts['token hash'][1]})"
        )
        metric = f"used_memory per token, {len(batch):,} tokens, encrypted, {label}"
        results.append(Result(BENCH, metric, on.case, "B", "plaintext", off.case, note=note))
    plain.redis.flushdb()  # server started by this test (the bench's own)
    return results


def rotation(env: BenchEnv, quick: bool) -> list[Result]:
    batch = memory.tokens(20_000 if quick else 100_000)
    plain = TokenStore(env.client(), namespace=memory.NAMESPACE, queue=memory.QUEUE, encryption="")
    memory.write_tokens(plain, batch)
    results = []
    for label, ring in (("plaintext -> k1 (turning it on)", TURN_ON), ("k1 -> k2 (a rotation)", ROTATED)):
        done = rekey(TokenStore(env.client(), namespace=memory.NAMESPACE, encryption=ring))
        assert done.rewritten == len(batch) and not done.failed, done
        note = f"{len(batch) / done.seconds:,.0f} tokens/s; {done.current} current, {done.skipped} skipped"
        metric = f"rekey {label}, {len(batch):,} tokens"
        results.append(Result(BENCH, metric, done.seconds, "s", note=note, extra={"tokens": len(batch)}))
    plain.redis.flushdb()  # server started by this test (the bench's own)
    return results


def run(env: BenchEnv, quick: bool) -> list[Result]:
    return find(env, quick) + _memory(env, quick) + rotation(env, quick)
