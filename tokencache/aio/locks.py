"""The asyncio twin of :class:`tokencache.core.locks.Lock`: the part the asyncio fleet fetch uses.

Same ``SET NX PX`` with an owner value, same compare-and-delete script, so a
lock taken by an asyncio process excludes a sync process and a refresh worker.
A kept lock is renewed by a task of the event loop instead of the sync keeper's
thread (the asyncio store has no sync client); the fetch itself runs in a thread,
so the loop is free to renew.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokencache.constants import LOCK_RENEW_EVERY
from tokencache.core import scripts

__all__ = ["Lock"]


@dataclass(eq=False)
class Lock:
    """One named lock, held for at most ``ttl`` seconds unless kept (:meth:`keep`)."""

    redis: Redis
    name: str
    ttl: float
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    _renewal: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    async def acquire(self) -> bool:
        """Take the lock if nobody holds it; True on success."""
        return bool(await self.redis.set(self.name, self.owner, nx=True, px=int(self.ttl * 1000)))

    def keep(self) -> Lock:
        """Renew the lock every ``LOCK_RENEW_EVERY`` from a task until :meth:`release`."""
        self._renewal = asyncio.ensure_future(self._renew())
        return self

    async def _renew(self) -> None:
        extend = scripts.EXTEND.on_async(self.redis)
        while True:
            await asyncio.sleep(LOCK_RENEW_EVERY)
            with contextlib.suppress(RedisError):  # the lease outlasts several ticks: try again
                if not await extend(keys=[self.name], args=[self.owner, int(self.ttl * 1000)]):
                    return  # no longer ours

    async def release(self) -> bool:
        """Stop renewing and give the lock back if we still hold it; True if it was ours."""
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        return bool(await scripts.RELEASE.on_async(self.redis)(keys=[self.name], args=[self.owner]))
