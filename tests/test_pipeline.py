"""The Pipeline protocol names exactly the commands the store, the refresh queue and RQ send into it."""

from __future__ import annotations

import time
from typing import Any

import fakeredis

from tokencache import Token, TokenStore
from tokencache.core.pipeline import Pipeline
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
    store.ask_workers_commands(recording, key)
    store.delete_commands(recording, key)
    store.refresh_queue.move_scheduled(recording, key, int(time.time()))
    assert recording.called == protocol_methods()
    assert "explicit_transaction" in Pipeline.__annotations__
