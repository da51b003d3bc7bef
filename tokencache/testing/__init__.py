"""Tools for tests: a local Google token endpoint, a private redis-server, a worker-pool launcher.

Public and supported (see docs/testing.md), so that applications can test against a
real token flow, as huey's ``MemoryHuey`` and rq's testing page let theirs; the library itself
never imports this package. The parts:

- :class:`Emulator`, :class:`EmulatorConfig` (:mod:`.emulator`): Google's token endpoint and
  metadata server on a local port, issuing key files google-auth accepts;
- :class:`EmbeddedRedis`, :func:`free_port` (:mod:`.redisserver`): a throw-away redis-server;
  :class:`SentinelSetup`: a primary, a replica and three sentinels, for failover tests;
- :class:`PoolProcess` (:mod:`.workers`): ``tokencache worker -n N`` in a subprocess, with a
  readiness check that waits until a stop signal can no longer be lost;
- :class:`StartBarrier`, :func:`arrive` (:mod:`.barrier`): release N processes at one instant;
- :mod:`.pytest_plugin`: fixtures for all of the above, loaded by pytest automatically.

Names are imported on first use: pytest imports this package in every run (for the plugin),
and the emulator alone pulls in ``cryptography`` and ``http.server``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokencache.testing.barrier import StartBarrier, arrive
    from tokencache.testing.emulator import Emulator, EmulatorConfig
    from tokencache.testing.redisserver import EmbeddedRedis, SentinelSetup, free_port
    from tokencache.testing.workers import PoolError, PoolProcess, isolated_env

__all__ = [  # noqa: RUF022 - grouped by part, as the docstring lists them
    "Emulator",
    "EmulatorConfig",
    "EmbeddedRedis",
    "SentinelSetup",
    "free_port",
    "PoolProcess",
    "PoolError",
    "isolated_env",
    "StartBarrier",
    "arrive",
]

_HOMES = {
    "Emulator": "emulator",
    "EmulatorConfig": "emulator",
    "EmbeddedRedis": "redisserver",
    "SentinelSetup": "redisserver",
    "free_port": "redisserver",
    "PoolProcess": "workers",
    "PoolError": "workers",
    "isolated_env": "workers",
    "StartBarrier": "barrier",
    "arrive": "barrier",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # the next lookup skips this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
