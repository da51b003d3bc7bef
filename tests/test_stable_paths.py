"""Paths that running fleets depend on: moving one of them is a breaking change, so each is imported here.

- ``tokencache.refresh.refresh``: RQ stores this dotted name in every refresh job in Redis.
- ``tokencache.scheduling.RefreshJob``: the documented ``rq worker --job-class``.
- ``workers.settings`` (a checkout) and ``tokencache.worker.settings`` (the wheel): ``rq worker -c``.
- ``python -m workers.repair`` and ``python -m tokencache.worker.repairloop``: repair beside plain rq.
- ``python -m tokencache`` and the console script ``tokencache`` (``tokencache.cli:main``).
- The public names of ``tokencache``, ``tokencache.aio`` and ``tokencache.testing``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from rq.job import Job
from rq.utils import import_attribute

ROOT = Path(__file__).resolve().parent.parent

PUBLIC = {
    "tokencache": {
        "Token", "TokenKey", "Freshness", "mask", "normalize_scope", "TokenStore", "store", "find",
        "for_scope", "delete", "invalidate", "tokens", "default_store", "reset_default_store", "Credentials",
        "BearerAuth", "TokenCacheError", "RedisUnavailableError", "RefreshError", "FetchTimeoutError",
        "ConfigurationError", "UnknownAccountError", "RateLimitedError", "CredentialsRejectedError",
        "WrongTypeError", "RefusedJobError", "EncryptionError", "Keyring",
    },
    "tokencache.aio": {
        "TokenStore", "aclose_default", "default_store", "delete", "find", "for_scope", "invalidate", "store",
        "tokens",
    },
    "tokencache.testing": {
        "Emulator", "EmulatorConfig", "EmbeddedRedis", "free_port", "PoolProcess", "PoolError",
        "isolated_env", "StartBarrier", "arrive",
    },
}  # fmt: skip
"""Names each public module must keep exporting (more may be added; none may go)."""


def test_the_refresh_function_named_in_every_job_resolves() -> None:
    from tokencache.core.queue import REFRESH_FUNC

    assert REFRESH_FUNC == "tokencache.refresh.refresh"
    func = import_attribute(REFRESH_FUNC)
    assert callable(func)
    from tokencache.worker.refresh import refresh

    assert func is refresh


def test_the_documented_job_class_resolves() -> None:
    job_class = import_attribute("tokencache.scheduling.RefreshJob")
    assert isinstance(job_class, type) and issubclass(job_class, Job)
    from tokencache.core.queue import RefreshJob

    assert job_class is RefreshJob


@pytest.mark.parametrize("module", ["workers.settings", "tokencache.worker.settings"])
def test_rq_worker_settings_modules(module: str) -> None:
    settings = importlib.import_module(module)
    assert isinstance(settings.REDIS_URL, str) and settings.REDIS_URL
    assert isinstance(settings.QUEUES, list) and settings.QUEUES


@pytest.mark.parametrize("module", ["workers.repair", "tokencache.worker.repairloop"])
def test_repair_entry_points(module: str) -> None:
    assert callable(importlib.import_module(module).main)


def test_python_dash_m_tokencache() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tokencache", "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    assert "worker" in out.stdout and "status" in out.stdout


def test_the_console_script() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert declared == {"tokencache": "tokencache.cli:main"}
    installed = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert installed["tokencache"].value == "tokencache.cli:main"
    assert callable(installed["tokencache"].load())


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_stay(module: str) -> None:
    loaded = importlib.import_module(module)
    missing = {name for name in PUBLIC[module] if not hasattr(loaded, name)}
    assert missing == set(), f"{module} lost public names"
    exported = set(getattr(loaded, "__all__", ()))
    assert PUBLIC[module] <= exported, f"{module}.__all__ lost {PUBLIC[module] - exported}"


def test_the_wheel_ships_only_the_package() -> None:
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert build["packages"] == ["tokencache"]
