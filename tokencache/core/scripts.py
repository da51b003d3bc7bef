"""Every Lua script tokencache runs, each with a header naming its KEYS, its ARGV and its reply.

Why scripts at all: each does a check and a write with nothing in between (a lock released only by its
owner, a refreshed token written only if nobody deleted it meanwhile), and gets every key it touches
through ``KEYS``.

Why :class:`LuaScript`: a script is sent by its SHA1 (``EVALSHA``), not as text (``EVAL``) on every
call. It runs through redis-py's ``Script``, which on ``NOSCRIPT`` (a server that restarted, failed
over, or had ``SCRIPT FLUSH``: Redis 7 neither replicates nor persists its script cache) loads the
text and retries. In a pipeline a ``NOSCRIPT`` cannot be retried alone (the other commands, even
inside MULTI/EXEC, have run), so redis-py checks with ``SCRIPT EXISTS`` (and loads what is missing)
before it sends the pipeline: one more round trip for a pipeline that runs a script. It skips that
check when it re-sends a pipeline after a dropped connection, which is when a failover's new primary
is met: :func:`run_pipeline`, which every pipeline with a script goes through, covers that case.
redis-py's ``Script`` object itself is only a client-side handle (the text, its SHA1): building one
per call costs about a microsecond and nothing on the wire.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.client import Pipeline
from redis.commands.core import AsyncScript, Script
from redis.exceptions import NoScriptError
from redis.typing import EncodableT

__all__ = [
    "EXTEND",
    "INVALIDATE",
    "RECORD_FAILURE",
    "REKEY",
    "RELEASE",
    "REPLACE_IF_INDEXED",
    "LuaScript",
    "run_pipeline",
]


@dataclass(frozen=True)
class LuaScript:
    """One Lua script, run by its SHA1 on a client or queued into a redis-py pipeline."""

    name: str
    source: str
    sha: str = field(init=False)
    """What the server's script cache knows it by (``SCRIPT EXISTS``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest())

    def on(self, client: Redis) -> Script:
        """redis-py's handle for ``client``, or for a pipeline of it (a ``redis.client.Pipeline`` is one)."""
        return client.register_script(self.source)

    def on_async(self, client: AsyncRedis) -> AsyncScript:
        """redis-py's handle for a ``redis.asyncio`` client (``await handle(keys, args)``)."""
        return client.register_script(self.source)

    def __call__(self, client: Redis, keys: Sequence[str], args: Sequence[EncodableT] = ()) -> Any:
        """Run on ``client`` (the reply), or queue into a pipeline (the reply comes from ``execute()``)."""
        return self.on(client)(keys, args)


def run_pipeline(client: Redis, queue: Callable[[Pipeline], None], *, transaction: bool) -> list[Any]:
    """Queue commands, scripts among them, with ``queue`` into a pipeline of ``client``; the replies.

    If a script is missing when the pipeline runs (redis-py re-sent it after a dropped connection,
    without loading its scripts first), its EVALSHA fails with NOSCRIPT while the other commands
    run, even inside MULTI/EXEC. The whole pipeline then runs once more, scripts loaded first: so
    ``queue`` may only queue commands that are safe to run twice.
    """
    try:
        return _run_once(client, queue, transaction)
    except NoScriptError:
        return _run_once(client, queue, transaction)


def _run_once(client: Redis, queue: Callable[[Pipeline], None], transaction: bool) -> list[Any]:
    with client.pipeline(transaction=transaction) as pipe:
        queue(pipe)
        return pipe.execute()


RELEASE = LuaScript(
    "release",
    """
-- Give a lock back, if we still hold it (compare-and-delete).
-- KEYS[1]  the lock
-- ARGV[1]  the owner value we took it with
-- returns  1 if it was ours and is deleted, 0 if it was free or someone else's
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
""",
)

EXTEND = LuaScript(
    "extend",
    """
-- Give a lock its whole time to live again, if we still hold it.
-- KEYS[1]  the lock
-- ARGV[1]  the owner value we took it with
-- ARGV[2]  the time to live, in milliseconds
-- returns  1 if it was ours and is extended, 0 if it was free or someone else's
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
""",
)

RECORD_FAILURE = LuaScript(
    "record_failure",
    """
-- Count a failed refresh in the token's hash, if the hash still exists; a give-up is also audited.
-- KEYS[1]  the token hash
-- KEYS[2]  the audit stream
-- ARGV[1]  the error message (at most 500 characters)
-- ARGV[2]  now, Unix seconds (written to last_error_at, and gave_up_at when giving up)
-- ARGV[3]  '1' if the refresh gave up, '0' if it will retry
-- ARGV[4]  entries the audit stream keeps (MAXLEN ~); '0': no entry (a retry, or the trail is off)
-- ARGV[5]  and on: the audit entry's fields and values, alternating
-- returns  the new count of failures in a row, or 0 if there is no hash; {that count, the error} if
--          the audit entry failed (XADD by pcall: a wedged stream never fails the write)
local failures = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
    failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
    redis.call('HSET', KEYS[1], 'last_error', ARGV[1], 'last_error_at', ARGV[2])
    if ARGV[3] == '1' then
        redis.call('HSET', KEYS[1], 'gave_up_at', ARGV[2])
    end
end
if ARGV[4] ~= '0' then
    local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 5))
    if type(added) == 'table' and added.err then
        return {failures, added.err}
    end
end
return failures
""",
)

REPLACE_IF_INDEXED = LuaScript(
    "replace_if_indexed",
    """
-- Write a refreshed token, unless it was deleted meanwhile (its index entry is gone); audit the write.
-- KEYS[1]  the token hash
-- KEYS[2]  the index (sorted set: token hash -> expires)
-- KEYS[3]  the apps' request to the workers (want), answered by this write
-- KEYS[4]  the last fetch error, answered by this write
-- KEYS[5]  the audit stream
-- ARGV[1]  expires, Unix seconds (the hash's EXPIREAT and its index score)
-- ARGV[2]  the token's wake-up channel
-- ARGV[3]  the wake-up message
-- ARGV[4]  n: how many items of the hash follow
-- ARGV[5]  and on, n items: the hash's fields and values, alternating
--          then: entries the audit stream keeps (MAXLEN ~; '0': the trail is off),
--          and the rest: the audit entry's fields and values, alternating
-- returns  1 if written (and audited), 0 if the token is no longer indexed (nothing written);
--          {1, the error} if written but the audit entry failed (XADD by pcall: see RECORD_FAILURE)
if not redis.call('ZSCORE', KEYS[2], KEYS[1]) then
    return 0
end
local n = tonumber(ARGV[4])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 5, 4 + n))
redis.call('EXPIREAT', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[1], KEYS[1])
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('PUBLISH', ARGV[2], ARGV[3])
if ARGV[5 + n] ~= '0' then
    local added = redis.pcall('XADD', KEYS[5], 'MAXLEN', '~', ARGV[5 + n], '*', unpack(ARGV, 6 + n))
    if type(added) == 'table' and added.err then
        return {1, added.err}
    end
end
return 1
""",
)

INVALIDATE = LuaScript(
    "invalidate",
    """
-- Evict a token an API rejected: only if it is still the stored one, not evicted yet, and the key
-- has not evicted a token within the rate-limit window. The hash stays (repair and the refresh job
-- see the token as due now) but is marked, so readers skip it until the refetch replaces it. An
-- eviction is audited, with the evicted token's expires read from its hash.
-- KEYS[1]  the token hash
-- KEYS[2]  the index (sorted set: token hash -> expires; an evicted token's entry is due now)
-- KEYS[3]  the key's rate limit (the invalidated marker)
-- KEYS[4]  the audit stream
-- ARGV[1]  the rejected access token
-- ARGV[2]  now, Unix seconds (rejected_at, refresh_at, the index score and the marker's value)
-- ARGV[3]  the rate-limit window, in milliseconds
-- ARGV[4]  entries the audit stream keeps (MAXLEN ~); '0': the trail is off
-- ARGV[5]  and on: the audit entry's fields and values, alternating (its expires is filled in here)
-- returns  1 evicted; 0 not the stored token (replaced, deleted, never cached): nothing changed;
--          2 evicted already (its refetch is on its way); 3 rate-limited: the token stays;
--          {1, the error} if evicted but the audit entry failed (XADD by pcall: see RECORD_FAILURE)
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
    return 0
end
if redis.call('HEXISTS', KEYS[1], 'rejected_at') == 1 then
    return 2
end
if not redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', ARGV[3]) then
    return 3
end
redis.call('HSET', KEYS[1], 'rejected_at', ARGV[2], 'refresh_at', ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', ARGV[2], KEYS[1])
if ARGV[4] ~= '0' then
    local entry = {unpack(ARGV, 5)}
    for i = 1, #entry - 1, 2 do
        if entry[i] == 'expires' then
            entry[i + 1] = redis.call('HGET', KEYS[1], 'expires') or ''
        end
    end
    local added = redis.pcall('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', unpack(entry))
    if type(added) == 'table' and added.err then
        return {1, added.err}
    end
end
return 1
""",
)

REKEY = LuaScript(
    "rekey",
    """
-- Re-encrypt a token in place (tokencache rekey): only if its token field still holds what was read,
-- so a token refreshed meanwhile (already written under the ring's first key) is left as it is. The
-- other fields and the hash's EXPIREAT stay.
-- KEYS[1]  the token hash
-- ARGV[1]  the token field as read
-- ARGV[2]  the same token encrypted under the ring's first key (or in plaintext)
-- returns  1 if rewritten (or rewritten already: a pipeline run again after NOSCRIPT), 0 if the
--          field changed (or the hash went) since it was read
local stored = redis.call('HGET', KEYS[1], 'token')
if stored == ARGV[1] then
    redis.call('HSET', KEYS[1], 'token', ARGV[2])
    return 1
end
if stored == ARGV[2] then
    return 1
end
return 0
""",
)
