"""The Lua scripts run by SHA1 (EVALSHA, never EVAL), directly and in pipelines, and survive SCRIPT FLUSH."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio
from redis import Redis
from redis.client import Pipeline

from tokencache.core import scripts
from tokencache.core.scripts import LuaScript
from tokencache.testing.redisserver import EmbeddedRedis


def calls(client: Redis, command: str) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def in_pipeline(client: Redis, script: LuaScript, keys: list[str], args: list[Any]) -> Any:
    def queue(pipe: Pipeline) -> None:
        script(pipe, keys, args)
        pipe.set("tc-scripts:after", 1)  # the transaction goes on after the script

    reply, _ = scripts.run_pipeline(client, queue, transaction=True)
    return reply


def release(client: Redis) -> list[Any]:
    client.set("tc-scripts:lock", "me")
    return [
        scripts.RELEASE(client, ["tc-scripts:lock"], ["someone else"]),
        scripts.RELEASE(client, ["tc-scripts:lock"], ["me"]),
        client.exists("tc-scripts:lock"),
    ]


def extend(client: Redis) -> list[Any]:
    client.set("tc-scripts:lock", "me", px=1000)
    return [
        scripts.EXTEND(client, ["tc-scripts:lock"], ["someone else", 60_000]),
        scripts.EXTEND(client, ["tc-scripts:lock"], ["me", 60_000]),
        client.pttl("tc-scripts:lock") > 1000,
    ]


AUDIT = "tc-scripts:audit"
ENTRY = ["event", "e", "expires", "", "fp", "f"]
"""An audit entry as the scripts get it (names and values alternating; ``expires`` left for INVALIDATE)."""


def audited(client: Redis) -> list[list[bytes]]:
    """The values of every entry in the test's audit stream, oldest first."""
    return [list(fields.values()) for _, fields in client.xrange(AUDIT)]


def record_failure(client: Redis) -> list[Any]:
    keys = ["tc-scripts:token", AUDIT]
    client.delete(*keys)
    absent = in_pipeline(client, scripts.RECORD_FAILURE, keys, ["boom", 100, 0, 0])
    client.hset("tc-scripts:token", "token", "ya29.x")
    first = in_pipeline(client, scripts.RECORD_FAILURE, keys, ["boom", 100, 0, 0])
    second = in_pipeline(client, scripts.RECORD_FAILURE, keys, ["bang", 200, 1, 10, *ENTRY])
    return [
        absent,
        first,
        second,
        client.hmget("tc-scripts:token", "last_error", "gave_up_at"),
        audited(client),
    ]


def replace_if_indexed(client: Redis) -> list[Any]:
    keys = ["tc-scripts:token", "tc-scripts:index", "tc-scripts:want", "tc-scripts:error", AUDIT]
    hash_fields = ["token", "ya29.new", "expires", "4000000000"]
    args = [4_000_000_000, "tc-scripts:channel", "{}", len(hash_fields), *hash_fields, 10, *ENTRY]
    client.delete(*keys)
    client.set("tc-scripts:want", 1)
    unindexed = in_pipeline(client, scripts.REPLACE_IF_INDEXED, keys, args)
    client.zadd("tc-scripts:index", {"tc-scripts:token": 1})
    written = in_pipeline(client, scripts.REPLACE_IF_INDEXED, keys, args)
    return [unindexed, written, client.hgetall("tc-scripts:token"), client.exists("tc-scripts:want"),
            audited(client)]  # fmt: skip


def invalidate(client: Redis) -> list[Any]:
    keys = ["tc-scripts:token", "tc-scripts:index", "tc-scripts:invalidated", AUDIT]
    client.delete(*keys)
    client.hset("tc-scripts:token", mapping={"token": "ya29.old", "refresh_at": 900, "expires": 1000})
    client.zadd("tc-scripts:index", {"tc-scripts:token": 1000})
    other = scripts.INVALIDATE(client, keys, ["ya29.other", 100, 60_000, 10, *ENTRY])
    evicted = scripts.INVALIDATE(client, keys, ["ya29.old", 100, 60_000, 10, *ENTRY])
    again = scripts.INVALIDATE(client, keys, ["ya29.old", 101, 60_000, 10, *ENTRY])
    marked = [*client.hmget("tc-scripts:token", "rejected_at", "refresh_at"), client.zscore(keys[1], keys[0])]
    client.hset("tc-scripts:token", "token", "ya29.new")  # the refetch (which drops rejected_at)
    client.hdel("tc-scripts:token", "rejected_at")
    limited = scripts.INVALIDATE(client, keys, ["ya29.new", 102, 60_000, 10, *ENTRY])
    return [other, evicted, again, marked, limited, client.hexists("tc-scripts:token", "rejected_at"),
            audited(client)]  # fmt: skip


def rekey(client: Redis) -> list[Any]:
    client.delete("tc-scripts:token")
    absent = scripts.REKEY(client, ["tc-scripts:token"], ["enc:k1:old", "enc:k2:new"])
    client.hset("tc-scripts:token", mapping={"token": "enc:k1:old", "scope": "s"})
    client.expire("tc-scripts:token", 600)
    changed = scripts.REKEY(client, ["tc-scripts:token"], ["enc:k1:other", "enc:k2:new"])
    written = scripts.REKEY(client, ["tc-scripts:token"], ["enc:k1:old", "enc:k2:new"])
    again = scripts.REKEY(client, ["tc-scripts:token"], ["enc:k1:old", "enc:k2:new"])  # run twice: one write
    fields = client.hgetall("tc-scripts:token")
    return [absent, changed, written, again, fields, client.ttl("tc-scripts:token") > 590]


EXPECTED: dict[str, tuple[Callable[[Redis], list[Any]], list[Any]]] = {
    "release": (release, [0, 1, 0]),
    "extend": (extend, [0, 1, True]),
    # Only the give-up is audited.
    "record_failure": (record_failure, [0, 1, 2, [b"bang", b"200"], [[b"e", b"", b"f"]]]),
    # The hash is exactly the fields given (none of the audit's); only the write is audited.
    "replace_if_indexed": (
        replace_if_indexed,
        [0, 1, {b"token": b"ya29.new", b"expires": b"4000000000"}, 0, [[b"e", b"", b"f"]]],
    ),
    # Only the eviction is audited, with the evicted token's expires from its hash.
    "invalidate": (invalidate, [0, 1, 2, [b"100", b"100", 100.0], 3, False, [[b"e", b"1000", b"f"]]]),
    "rekey": (rekey, [0, 0, 1, 1, {b"token": b"enc:k2:new", b"scope": b"s"}, True]),
}


def test_every_script_is_tested_and_has_its_header() -> None:
    defined = [value for value in vars(scripts).values() if isinstance(value, LuaScript)]
    assert sorted(s.name for s in defined) == sorted(EXPECTED)
    for script in defined:
        used = set(re.findall(r"(KEYS|ARGV)\[(\d+)\]", script.source.split("\nif", 1)[1]))
        named = set(re.findall(r"^-- (KEYS|ARGV)\[(\d+)\]", script.source, re.M))
        assert used <= named, f"{script.name}: the header must name every KEYS[i]/ARGV[i] it uses"
        assert "-- returns" in script.source


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scripts_run_by_sha_and_survive_a_script_flush(
    name: str, real_redis: Redis, redis_server: EmbeddedRedis
) -> None:
    run, expected = EXPECTED[name]
    real_redis.script_flush()  # server started by this test session (the fixture's)
    evals, evalshas = calls(real_redis, "eval"), calls(real_redis, "evalsha")
    assert run(real_redis) == expected  # loaded on first use
    assert run(real_redis) == expected  # then by SHA1
    real_redis.script_flush()  # server started by this test session (the fixture's)
    assert run(real_redis) == expected  # reloaded
    script = next(s for s in vars(scripts).values() if isinstance(s, LuaScript) and s.name == name)
    assert real_redis.script_exists(script.sha) == [True]
    assert calls(real_redis, "eval") == evals, "a script was sent as text (EVAL)"
    assert calls(real_redis, "evalsha") >= evalshas + 6


def test_the_async_handle_runs_by_sha(real_redis: Redis, redis_server: EmbeddedRedis) -> None:
    async def release_twice() -> list[Any]:
        client = redis.asyncio.Redis(port=redis_server.port)
        try:
            await client.set("tc-scripts:lock", "me")
            handle = scripts.RELEASE.on_async(client)
            return [
                await handle(["tc-scripts:lock"], ["someone else"]),
                await handle(["tc-scripts:lock"], ["me"]),
            ]
        finally:
            await client.aclose()

    real_redis.script_flush()  # server started by this test session (the fixture's)
    evals = calls(real_redis, "eval")
    assert asyncio.run(release_twice()) == [0, 1]
    assert asyncio.run(release_twice()) == [0, 1]
    assert calls(real_redis, "eval") == evals


def test_a_pipeline_whose_script_went_missing_runs_again(
    real_redis: Redis, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py's retry after a dropped connection re-sends a pipeline without loading its scripts: on a
    failover's new primary the EVALSHA fails with NOSCRIPT while the rest of the transaction runs."""
    load = Pipeline.load_scripts
    skipped: list[Pipeline] = []

    def skip_once(pipe: Pipeline) -> None:  # what that retry does
        if skipped:
            load(pipe)
        else:
            skipped.append(pipe)

    def queue(pipe: Pipeline) -> None:
        scripts.RECORD_FAILURE(pipe, ["tc-scripts:token", AUDIT], ["boom", 100, 1, 10, *ENTRY])
        pipe.incr("tc-scripts:companion")

    real_redis.delete(AUDIT)
    real_redis.hset("tc-scripts:token", "token", "ya29.x")
    real_redis.script_flush()  # server started by this test session (the fixture's)
    monkeypatch.setattr(Pipeline, "load_scripts", skip_once)
    assert scripts.run_pipeline(real_redis, queue, transaction=True) == [1, 2]
    assert skipped, "the first run went without loading"
    assert real_redis.hget("tc-scripts:token", "failures") == b"1"  # the script ran once
    assert real_redis.xlen(AUDIT) == 1  # and so appended its audit entry once
    assert real_redis.get("tc-scripts:companion") == b"2"  # the rest twice: it must be safe to repeat
