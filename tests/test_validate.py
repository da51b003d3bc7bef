"""The argument checks of tokencache.validate name the argument and say what was wrong."""

from __future__ import annotations

import pytest

from tokencache import TokenStore
from tokencache.validate import check_count, check_flag
from tokencache.worker.pool import run_pool


def test_check_count() -> None:
    assert check_count("num_workers", 3) == 3
    with pytest.raises(ValueError, match="num_workers must be at least 1, got 0"):
        check_count("num_workers", 0)
    for bad in (True, 2.0, "2", None):
        with pytest.raises(TypeError, match="num_workers must be a whole number"):
            check_count("num_workers", bad)


def test_check_flag() -> None:
    assert check_flag("near_cache", True) is True and check_flag("near_cache", False) is False
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match="near_cache must be True or False, not"):
            check_flag("near_cache", bad)


def test_the_worker_pool_checks_its_size_first(store: TokenStore) -> None:
    with pytest.raises(ValueError, match="num_workers must be at least 1, got 0"):
        run_pool(store, 0)
