"""The redis-cli examples of docs/design.md match what a real server shows."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from tokencache import Token, TokenStore
from tokencache.testing.redisserver import EmbeddedRedis

DESIGN_PAGE = Path(__file__).parent.parent / "docs" / "design.md"


def documented_hgetall_fields() -> list[str]:
    text = DESIGN_PAGE.read_text()
    block = re.search(r"\$ redis-cli HGETALL (\S+)\n(.*?)\$ redis-cli TTL", text, re.S)
    assert block is not None, "docs/design.md lost its HGETALL example"
    lines = block.group(2).split("\n")
    return lines[0:-1:2]


def test_design_hgetall_and_ttl_read_as_documented(store: TokenStore, redis_server: EmbeddedRedis) -> None:
    token = Token(
        token="ya29.a0AfB_byC-example-access-token",
        scope="https://www.googleapis.com/auth/cloud-platform",
        expires=int(time.time()) + 3599,
    )
    store.store(token)
    key = store.keys.token(store.key_for(token))

    def cli(*args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(redis_server.port), *args], capture_output=True, text=True, check=True
        ).stdout

    shown = cli("HGETALL", key).split("\n")
    assert shown[0:-1:2] == documented_hgetall_fields()
    assert shown[1] == token.token and shown[shown.index("expires") + 1] == str(token.expires)
    assert 3590 <= int(cli("TTL", key)) <= 3599
    assert f"$ redis-cli TTL {key.replace('tc-test', 'tokencache')}" in DESIGN_PAGE.read_text()
