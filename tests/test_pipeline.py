"""The Pipeline protocol names exactly the commands written into it; per_entry names the replies read."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import fakeredis
import pytest

from tokencache import Token, TokenStore
from tokencache.core.pipeline import Pipeline, per_entry
from tokencache.keys import TokenKey

from .conftest import SCOPE


class Recording:
    """Records the name of every method called on it; says no transaction was started yet."""

    explicit_transaction = False

    def __init__(self) -> None:
        self.called: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> None:
            self.called.add(name)
            if name == "multi":
                self.explicit_transaction = True

        return record


def protocol_methods() -> set[str]:
    return {name for name, value in vars(Pipeline).items() if callable(value) and not name.startswith("_")}


def test_the_protocol_lists_every_command_written_and_no_other() -> None:
    store = TokenStore(fakeredis.FakeRedis(), namespace="tc-pipe", refresh_before=10)
    key = TokenKey.of(None, SCOPE, None)
    token = Token(token="ya29.pipe", scope=SCOPE, expires=int(time.time()) + 600)
    recording = Recording()
    store.write_commands(recording, key, token, fetched=True)
    store.failure_commands(recording, key, "boom", gave_up=True)
    store.failure_commands(recording, key, "rate limited", gave_up=False, hold=3.0, retry_in=3.0)
    store.ask_workers_commands(recording, key)
    store.delete_commands(recording, key)
    store.refresh_queue.move_scheduled(recording, key, int(time.time()))
    assert recording.called == protocol_methods()
    assert "explicit_transaction" in Pipeline.__annotations__


class _Pair(NamedTuple):
    score: float | None
    exists: int


def test_per_entry_names_the_replies_of_each_entry() -> None:
    redis = fakeredis.FakeRedis()
    redis.zadd("tc-pipe:z", {"a": 1.5})
    redis.set("tc-pipe:b", 1)
    with redis.pipeline(transaction=False) as pipe:
        for name in ("a", "b"):
            pipe.zscore("tc-pipe:z", name)
            pipe.exists(f"tc-pipe:{name}")
        entries = per_entry(_Pair, pipe.execute())
    assert entries == [_Pair(score=1.5, exists=0), _Pair(score=None, exists=1)]
    with pytest.raises(ValueError, match="3 replies do not split into entries of 2"):
        per_entry(_Pair, [1, 2, 3])
