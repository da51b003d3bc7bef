"""Clients of a Sentinel-managed primary that follow the master across a failover.

redis-py's Sentinel pool asks the sentinels where the master is only when it
opens a connection. A connection already open stays on the node it reached,
and after a failover the old master keeps accepting writes until Sentinel
demotes it (8-10 s measured): a refresh written there is lost, and readers of
the new master miss it. So every connection here asks again (at most every
:data:`FOLLOW_EVERY` seconds, the answer shared by the connections of a
process) before it sends a command, and moves to the new master when the
answer changed. It works in any pool that makes these connections: ours, and
the plain pools RQ rebuilds in its forked workers and scheduler.

Which answer counts: the sentinels learn of a failover one after another
(about 2 s apart), so the master named with the highest configuration epoch
wins; asking only the first sentinel that answers could send a connection back
to the old master.

A connection blocked in a command (an RQ worker waiting on its queue) sends
nothing, so it cannot check: :func:`master_address` lets a supervisor notice
the switch and restart such processes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis.asyncio.sentinel as async_sentinel
import redis.sentinel as sync_sentinel
from redis import BlockingConnectionPool, SSLConnection
from redis.asyncio import BlockingConnectionPool as AsyncBlockingPool
from redis.asyncio import SSLConnection as AsyncSSLConnection
from redis.exceptions import ConnectionError, ResponseError, TimeoutError

from tokencache.constants import FOLLOW_EVERY

__all__ = [
    "AsyncFollowingConnection",
    "AsyncFollowingPool",
    "AsyncFollowingSSLConnection",
    "AsyncFollowingSentinel",
    "FollowingConnection",
    "FollowingPool",
    "FollowingSSLConnection",
    "FollowingSentinel",
    "ask_sentinels",
    "master_address",
    "master_moved",
    "newest_master",
    "recent_master",
]

log = logging.getLogger(__name__)

Address = tuple[str, int]


def newest_master(states: list[dict[str, Any]]) -> Address | None:
    """The master named with the highest configuration epoch among sentinels that see it up."""
    best: tuple[int, Address] | None = None
    for state in states:
        if not state.get("is_master") or state.get("is_sdown") or state.get("is_odown"):
            continue
        epoch = int(state.get("config-epoch", 0))
        if best is None or epoch > best[0]:
            best = (epoch, (str(state["ip"]), int(state["port"])))
    return None if best is None else best[1]


def _no_master(service: str, errors: list[str]) -> sync_sentinel.MasterNotFoundError:
    detail = f": {', '.join(errors)}" if errors else ""
    return sync_sentinel.MasterNotFoundError(f"no sentinel names a master for {service!r} that is up{detail}")


def ask_sentinels(sentinels: list[Any], service: str) -> Address:
    """The master of ``service`` by every sentinel that answers (:func:`newest_master` of their words)."""
    states, errors = [], []
    for sentinel in sentinels:
        try:
            state = sentinel.sentinel_masters().get(service)
        except (ConnectionError, TimeoutError, ResponseError) as e:
            errors.append(f"{sentinel} - {e!r}")
            continue
        if state:
            states.append(state)
    return _pick_master(service, states, errors)


def _pick_master(service: str, states: list[dict[str, Any]], errors: list[str]) -> Address:
    """:func:`newest_master` of what the sentinels said, or MasterNotFoundError naming who failed."""
    master = newest_master(states)
    if master is None:
        raise _no_master(service, errors)
    return master


def _fresh_answer(manager: Any, service: str) -> Address | None:
    """The master ``manager``'s sentinels named less than :data:`FOLLOW_EVERY` seconds ago, if any."""
    answer = manager.__dict__.get("_tokencache_answers", {}).get(service)
    return answer[1] if answer is not None and time.monotonic() - answer[0] < FOLLOW_EVERY else None


def _remember(manager: Any, service: str, master: Address) -> Address:
    """Keep ``master`` on ``manager`` (shared by its pools' connections) and return it."""
    manager.__dict__.setdefault("_tokencache_answers", {})[service] = (time.monotonic(), master)
    return master


def recent_master(manager: Any, service: str) -> Address:
    """The master as ``manager``'s sentinels said it at most :data:`FOLLOW_EVERY` seconds ago.

    The answer is kept on the manager, so the connections of one pool (and of the pools RQ rebuilds
    in its forked processes from the same manager) share it. Any redis-py Sentinel manager works:
    RQ builds a plain one from its ``SENTINEL`` settings.
    """
    fresh = _fresh_answer(manager, service)
    return fresh or _remember(manager, service, ask_sentinels(manager.sentinels, service))


class FollowingSentinel(sync_sentinel.Sentinel):
    """redis-py's Sentinel manager, trusting the master named with the highest epoch (see above)."""

    def discover_master(self, service_name: str) -> Address:
        return ask_sentinels(self.sentinels, service_name)


class AsyncFollowingSentinel(async_sentinel.Sentinel):
    """:class:`FollowingSentinel` on redis.asyncio, and its own :func:`recent_master`."""

    async def discover_master(self, service_name: str) -> Address:
        states, errors = [], []
        for sentinel in self.sentinels:
            try:
                masters: dict[str, dict[str, Any]] = await sentinel.sentinel_masters()  # type: ignore[assignment]
                state = masters.get(service_name)
            except (ConnectionError, TimeoutError, ResponseError) as e:
                errors.append(f"{sentinel} - {e!r}")
                continue
            if state:
                states.append(state)
        return _pick_master(service_name, states, errors)

    async def recent_master(self, service_name: str) -> Address:
        """:func:`recent_master` for this manager."""
        fresh = _fresh_answer(self, service_name)
        return fresh or _remember(self, service_name, await self.discover_master(service_name))


def _moved(pool: Any, master: Address, conn: Any) -> bool:
    if master == (conn.host, conn.port):
        return False
    log.info("Redis master of %r moved to %s:%d: reconnecting", pool.service_name, *master)
    return True


class FollowingConnection(sync_sentinel.SentinelManagedConnection):
    """A connection to the master that moves to the new master before a command after a failover."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        pool = self.connection_pool
        if self._sock is not None and pool.is_master:
            try:
                master = recent_master(pool.sentinel_manager, pool.service_name)
            except ConnectionError:
                master = None  # no sentinel answers: keep the node we have; the command says if it is gone
            if master is not None and _moved(pool, master, self):
                self.disconnect()
                self.connect()  # to the master the sentinels name (a bare send would reopen the old node)
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


class FollowingSSLConnection(FollowingConnection, SSLConnection):
    """:class:`FollowingConnection` over TLS (``rediss+sentinel://``)."""


class AsyncFollowingConnection(async_sentinel.SentinelManagedConnection):
    """:class:`FollowingConnection` on redis.asyncio."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        pool = self.connection_pool
        if self.is_connected and pool.is_master:
            try:
                master = await pool.sentinel_manager.recent_master(pool.service_name)
            except ConnectionError:
                master = None
            if master is not None and _moved(pool, master, self):
                await self.disconnect()
                await self.connect()  # type: ignore[no-untyped-call]
        await super().send_packed_command(command, check_health)


class AsyncFollowingSSLConnection(AsyncFollowingConnection, AsyncSSLConnection):
    """:class:`AsyncFollowingConnection` over TLS."""


class FollowingPool(sync_sentinel.SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool that blocks, like :func:`connect`'s pool, when all connections are busy."""

    tokencache_url: str = ""
    """The URL it was built from (masked when shown), for messages and for the near cache's own connection."""

    def disconnect(self, inuse_connections: bool = True) -> None:
        """Also the sentinels' connections when closing (they would reopen when next asked)."""
        super().disconnect(inuse_connections)
        if inuse_connections:
            for sentinel in self.sentinel_manager.sentinels:
                sentinel.connection_pool.disconnect()


class AsyncFollowingPool(async_sentinel.SentinelConnectionPool, AsyncBlockingPool):
    """:class:`FollowingPool` on redis.asyncio."""

    tokencache_url: str = ""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        """Also the sentinels' connections when closing (an unclosed asyncio socket warns when collected)."""
        await super().disconnect(inuse_connections)
        if inuse_connections:
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.connection_pool.disconnect()


def master_address(pool: Any) -> Address | None:
    """Where the sentinels say ``pool``'s master is now (None for a pool that is not Sentinel-managed).

    Raises redis-py's ConnectionError (MasterNotFoundError) while no sentinel names a master that is up.
    """
    manager = getattr(pool, "sentinel_manager", None)
    if not isinstance(manager, sync_sentinel.Sentinel):
        return None
    return ask_sentinels(manager.sentinels, pool.service_name)


def master_moved(conn: Any) -> bool:
    """Whether the sentinels now name another master than the node ``conn`` is connected to.

    False for a connection that is not Sentinel-managed, and while no sentinel answers.
    """
    pool = getattr(conn, "connection_pool", None)
    manager = getattr(pool, "sentinel_manager", None)
    if not isinstance(manager, sync_sentinel.Sentinel) or conn.host is None:
        return False
    try:
        master = recent_master(manager, pool.service_name)  # type: ignore[union-attr]
    except ConnectionError:
        return False
    return _moved(pool, master, conn)
