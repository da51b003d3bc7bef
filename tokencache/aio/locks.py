"""The asyncio twin of :class:`tokencache.core.locks.Lock`: the part the asyncio fleet fetch uses.

Same ``SET NX PX`` with an owner value, same compare-and-delete script, so a
lock taken by an asyncio process excludes a sync process and a refresh worker.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from redis.asyncio import Redis

from tokencache.core import scripts

__all__ = ["Lock"]


@dataclass
class Lock:
    """One named lock, held for at most ``ttl`` seconds."""

    redis: Redis
    name: str
    ttl: float
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)

    async def acquire(self) -> bool:
        """Take the lock if nobody holds it; True on success."""
        return bool(await self.redis.set(self.name, self.owner, nx=True, px=int(self.ttl * 1000)))

    async def release(self) -> bool:
        """Give the lock back if we still hold it; True if it was ours."""
        return bool(await scripts.RELEASE.on_async(self.redis)(keys=[self.name], args=[self.owner]))
