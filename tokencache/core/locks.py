"""Single-flight locks: ``SET NX PX`` with an owner value, released by compare-and-delete.

The owner value makes release safe: a holder whose lock already expired (and
was taken by someone else) cannot delete the new holder's lock. Release and
extend are Lua scripts of :mod:`tokencache.core.scripts`.

A token's lock is a *lease* (:meth:`Lock.keep`): short (:data:`~tokencache.constants.LOCK_TTL`)
and renewed by this process's :class:`LeaseKeeper` while it is held. A live
holder keeps it however long the token endpoint takes; a holder that dies
(SIGKILL mid-fetch) stops renewing, and its lock lapses within ``LOCK_TTL``, so
another worker can fetch the token well inside the refresh margin
(docs/design.md, "Failure model").
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from redis import Redis, RedisError

from tokencache.constants import LOCK_RENEW_EVERY
from tokencache.core import scripts

__all__ = ["KEEPER", "LeaseKeeper", "Lock", "acquire_each"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Lock:
    """One named lock, held for at most ``ttl`` seconds unless kept (:meth:`keep`)."""

    redis: Redis
    name: str
    ttl: float
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    lost: bool = field(default=False, init=False)
    """Set when a renewal found the lock no longer ours (it lapsed, and someone else may hold it)."""

    def acquire(self) -> bool:
        """Take the lock if nobody holds it; True on success."""
        return bool(self.redis.set(self.name, self.owner, nx=True, px=self._ttl_ms))

    def keep(self) -> Lock:
        """Have this process renew the lock every ``LOCK_RENEW_EVERY`` until :meth:`release`."""
        KEEPER.hold(self)
        return self

    def extend(self) -> bool:
        """Give the lock its whole ``ttl`` again if we still hold it; True if it was ours."""
        return bool(scripts.EXTEND(self.redis, [self.name], [self.owner, self._ttl_ms]))

    @property
    def _ttl_ms(self) -> int:
        return int(self.ttl * 1000)

    def release(self) -> bool:
        """Stop renewing and give the lock back if we still hold it; True if it was ours."""
        KEEPER.drop(self)
        return bool(scripts.RELEASE(self.redis, [self.name], [self.owner]))

    def held(self) -> bool:
        """Whether anybody holds the lock right now."""
        return bool(self.redis.exists(self.name))


class LeaseKeeper:
    """Renews every kept lock of this process from one daemon thread, which runs only while any is kept.

    One thread per process, not one per lock: a refresh job holds one lease, a batch
    a few. A renewal that fails on Redis is retried at the next tick (the lease
    outlasts several); one that finds the lock gone marks it :attr:`Lock.lost`.
    """

    def __init__(self, every: float = LOCK_RENEW_EVERY) -> None:
        self.every = every
        self._reset()

    def _reset(self) -> None:
        self._held: dict[int, Lock] = {}
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, lock: Lock) -> None:
        with self._mutex:
            self._held[id(lock)] = lock
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tokencache-leases", daemon=True)
                self._thread.start()

    def drop(self, lock: Lock) -> None:
        with self._mutex:
            self._held.pop(id(lock), None)

    def held(self) -> list[Lock]:
        with self._mutex:
            return list(self._held.values())

    def _run(self) -> None:
        while True:
            time.sleep(self.every)
            for lock in self.held():
                self._renew(lock)
            with self._mutex:
                if not self._held:
                    self._thread = None
                    return

    def _renew(self, lock: Lock) -> None:
        try:
            if not lock.extend():
                lock.lost = True
                self.drop(lock)
        except RedisError as e:
            log.debug("renewing %s failed (%s); trying again at the next tick", lock.name, e)


KEEPER = LeaseKeeper()
"""This process's keeper. A forked child starts with none held and no thread (the parent's did not
survive the fork)."""
os.register_at_fork(after_in_child=KEEPER._reset)


def acquire_each(redis: Redis, locks: Sequence[Lock]) -> list[bool]:
    """Try to take every lock, in one round trip; which ones were taken."""
    with redis.pipeline(transaction=False) as pipe:
        for lock in locks:
            pipe.set(lock.name, lock.owner, nx=True, px=lock._ttl_ms)
        return [bool(taken) for taken in pipe.execute()]
