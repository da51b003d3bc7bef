"""A start barrier over Redis: N processes say they are ready, then all go at one instant.

Fleet tests and benchmarks (a stampede on a cold cache, two fleets side by side) must not
start the clock while some processes are still importing; process start-up takes hundreds of
milliseconds and varies, so "start N processes and sleep" is neither fair nor bounded. The
processes already share a Redis (possibly across hosts), so the barrier lives there:

    {name}:ready           list   members that are ready (RPUSH by each; BLPOP by the leader)
    {name}:go:{member}     list   one member's go message (RPUSH by the leader; BLPOP by it)

A list per member rather than one pub/sub message: a list keeps a go that arrives before its
member blocks on it, so no race loses one, and the leader writes every go in one pipelined
round trip. The leader pops members as they arrive (BLPOP), waiting on an event rather than
polling, and between pops it can check its children, so a member that dies is reported at
once instead of at the timeout. Every key expires after :data:`KEY_TTL`, so a crashed run
leaves nothing behind for good.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from redis import Redis

__all__ = ["KEY_TTL", "StartBarrier", "arrive"]

KEY_TTL = 600
"""Seconds the barrier's keys live: longer than any start-up, short enough to clean up after itself."""
POP_SLICE = 0.5
"""Longest single BLPOP of the leader, in seconds: how often it checks its children while it waits."""
MIN_BLOCK = 0.01
"""Shortest BLPOP: Redis reads timeouts in whole milliseconds, and one that rounds to 0 blocks forever."""


def arrive(redis: Redis | str, name: str, member: str, timeout: float = 120.0) -> str:
    """Member side: say ``member`` is ready, then block until the go; return the go message.

    ``redis`` is a client whose socket timeout (if any) exceeds ``timeout``, or a URL to open
    one (closed before returning). Raises ``TimeoutError`` when no go comes within ``timeout``.
    """
    client = Redis.from_url(redis) if isinstance(redis, str) else redis
    try:
        with client.pipeline() as pipe:
            pipe.rpush(f"{name}:ready", member)
            pipe.expire(f"{name}:ready", KEY_TTL)
            pipe.execute()
        popped = client.blpop([f"{name}:go:{member}"], timeout=max(timeout, MIN_BLOCK))
    finally:
        if isinstance(redis, str):
            client.close()
    if popped is None:
        raise TimeoutError(f"barrier {name!r}: no go for member {member!r} within {timeout:g} s")
    return _text(popped[1])


def _text(value: bytes | str) -> str:
    """A popped value as text, whether or not the client decodes responses itself."""
    return value.decode() if isinstance(value, bytes) else value


class StartBarrier:
    """Leader side: wait until ``parties`` members are ready, then release them all at once."""

    def __init__(self, redis: Redis, name: str, parties: int) -> None:
        if parties < 1:
            raise ValueError(f"parties must be at least 1, got {parties}")
        self.redis = redis
        self.name = name
        self.parties = parties
        self.members: list[str] = []
        """The members that said they are ready, in the order they did."""

    def wait_ready(self, timeout: float, *, check: Callable[[], None] | None = None) -> list[str]:
        """Block until every member is ready; the members. ``TimeoutError`` after ``timeout`` s.

        ``check`` runs between pops (at least every :data:`POP_SLICE` s); it raises to give up,
        e.g. when a member process has exited.
        """
        deadline = time.monotonic() + timeout
        while len(self.members) < self.parties:
            if check is not None:
                check()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"barrier {self.name!r}: {len(self.members)} of {self.parties} ready after {timeout:g} s"
                )
            popped = self.redis.blpop([f"{self.name}:ready"], timeout=max(min(left, POP_SLICE), MIN_BLOCK))
            if popped is not None:
                self.members.append(_text(popped[1]))
        return self.members

    def go(self, message: str = "go") -> None:
        """Release every ready member with ``message``, in one round trip."""
        with self.redis.pipeline() as pipe:
            for member in self.members:
                pipe.rpush(f"{self.name}:go:{member}", message)
                pipe.expire(f"{self.name}:go:{member}", KEY_TTL)
            pipe.execute()

    def release(
        self, timeout: float, message: str = "go", *, check: Callable[[], None] | None = None
    ) -> None:
        """``wait_ready`` then ``go``: the usual leader's whole part."""
        self.wait_ready(timeout, check=check)
        self.go(message)
