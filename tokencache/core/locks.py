"""Single-flight locks: ``SET NX PX`` with an owner value, released by compare-and-delete.

The owner value makes release safe: a holder whose lock already expired (and
was taken by someone else) cannot delete the new holder's lock. Release and
extend are Lua scripts of :mod:`tokencache.core.scripts`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from redis import Redis

from tokencache.core import scripts

__all__ = ["Lock", "acquire_each"]


@dataclass
class Lock:
    """One named lock, held for at most ``ttl`` seconds."""

    redis: Redis
    name: str
    ttl: float
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)

    def acquire(self) -> bool:
        """Take the lock if nobody holds it; True on success."""
        return bool(self.redis.set(self.name, self.owner, nx=True, px=self._ttl_ms))

    def extend(self) -> bool:
        """Give the lock its whole ``ttl`` again if we still hold it; True if it was ours."""
        return bool(scripts.EXTEND(self.redis, [self.name], [self.owner, self._ttl_ms]))

    @property
    def _ttl_ms(self) -> int:
        return int(self.ttl * 1000)

    def release(self) -> bool:
        """Give the lock back if we still hold it; True if it was ours."""
        return bool(scripts.RELEASE(self.redis, [self.name], [self.owner]))

    def held(self) -> bool:
        """Whether anybody holds the lock right now."""
        return bool(self.redis.exists(self.name))


def acquire_each(redis: Redis, locks: Sequence[Lock]) -> list[bool]:
    """Try to take every lock, in one round trip; which ones were taken."""
    with redis.pipeline(transaction=False) as pipe:
        for lock in locks:
            pipe.set(lock.name, lock.owner, nx=True, px=lock._ttl_ms)
        return [bool(taken) for taken in pipe.execute()]
