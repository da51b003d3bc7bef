"""``tokencache ls`` prints as it reads the index: a million tokens are never all in its memory."""

from __future__ import annotations

import io
import itertools
import json
import time
from collections.abc import Iterator

import pytest
from rich.console import Console

from tokencache import Token, TokenStore
from tokencache.app.core import TokenRecord
from tokencache.cli import commands

from .conftest import SCOPE

TOKENS = 4


@pytest.fixture
def listed(
    store: TokenStore, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[io.StringIO, list[int]]:
    """Stdout of an in-process ``ls``, and how many lines it held each time ``ls`` asked for a record."""
    for i in range(TOKENS):
        store.store(
            Token(token=f"ya29.a0-secret-{i}", scope=SCOPE, expires=int(time.time()) + 600 + i, sub=f"u{i}")
        )
    out = io.StringIO()
    seen: list[int] = []
    every_record = TokenStore.records

    def spy(self: TokenStore) -> Iterator[TokenRecord]:
        for record in every_record(self):
            seen.append(out.getvalue().count("\n"))
            yield record

    monkeypatch.setattr(TokenStore, "records", spy)
    monkeypatch.setenv("TOKENCACHE_REDIS_URL", redis_url)
    monkeypatch.setenv("TOKENCACHE_NAMESPACE", store.keys.namespace)
    return out, seen


def ls(out: io.StringIO, *args: str) -> int:
    """``tokencache ls ARGS`` in this process, printing into ``out`` (set here: pytest swaps sys.stdout
    for each test phase)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stdout", out)
        return commands.main(["ls", *args])


def test_ls_prints_each_row_before_it_reads_the_next(listed: tuple[io.StringIO, list[int]]) -> None:
    out, seen = listed
    assert ls(out) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 + TOKENS and lines[0].startswith("ACCOUNT\tSCOPE")
    assert "secret" not in out.getvalue()
    assert seen == [1 + i for i in range(TOKENS)], "ls read records ahead of printing them"


def test_ls_json_streams_the_same_text_json_dumps_would_print(listed: tuple[io.StringIO, list[int]]) -> None:
    out, seen = listed
    assert ls(out, "--json") == 0
    rows = json.loads(out.getvalue())
    assert out.getvalue() == json.dumps(rows, indent=2) + "\n"
    assert sorted(row["sub"] for row in rows) == [f"u{i}" for i in range(TOKENS)]
    assert seen[0] == 0 and all(later > earlier for earlier, later in itertools.pairwise(seen)), seen


def test_ls_json_of_no_tokens_is_an_empty_list(
    store: TokenStore, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENCACHE_REDIS_URL", redis_url)
    monkeypatch.setenv("TOKENCACHE_NAMESPACE", store.keys.namespace)
    out = io.StringIO()
    assert ls(out, "--json") == 0
    assert out.getvalue() == "[]\n"


def test_ls_on_a_terminal_prints_a_table_per_page_with_one_header(
    listed: tuple[io.StringIO, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, seen = listed
    monkeypatch.setattr(commands, "TABLE_PAGE", 2)
    monkeypatch.setattr(
        commands,
        "_console",
        lambda: Console(file=out, force_terminal=True, width=300, highlight=False, color_system=None),
    )
    assert ls(out) == 0
    text = out.getvalue()
    assert text.count("ACCOUNT") == 1 and text.count("ya29.a0…t-") == TOKENS and "secret" not in text
    assert text.rstrip().endswith(f"{TOKENS} token(s)")
    assert seen[2] > seen[1], "the first page was not printed before the third record was read"
