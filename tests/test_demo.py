"""The demo, run as a user would: the real executable, to completion, leaving nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from redis import Redis

from .conftest import descendants


def run_demo(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokencache", "demo", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def number(label: str, text: str) -> int:
    match = re.search(rf"{re.escape(label)}[^:]*:\s+(\d+)", text)
    assert match, f"{label!r} not in the summary:\n{text}"
    return int(match.group(1))


def test_demo_on_its_own_redis_calls_the_endpoint_once_per_token_lifetime() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TOKENCACHE_REDIS_URL"}
    before = descendants(os.getpid())
    out = run_demo(env, "--duration", "9", "--lifetime", "6")  # a token serves 3 s: 2 tokens x (1 + 3)
    assert out.returncode == 0, out.stderr
    assert number("misses", out.stdout) == 0
    requests = number("token requests at the endpoint", out.stdout)
    assert requests == number("token lifetimes elapsed", out.stdout) == 8
    assert number("per-process caching would have made", out.stdout) == 4 * requests
    assert descendants(os.getpid()) == before  # redis-server, workers and apps are all gone


def test_demo_on_a_given_redis_touches_only_its_namespace(redis_url: str, real_redis: Redis) -> None:
    real_redis.set("someone-else:key", "keep me")
    out = run_demo(dict(os.environ, TOKENCACHE_REDIS_URL=redis_url), "--duration", "4", "--lifetime", "30")
    assert out.returncode == 0, out.stderr
    assert real_redis.get("someone-else:key") == b"keep me"
    ours = [k.decode() for k in real_redis.scan_iter(count=1000) if not k.startswith(b"rq:")]
    assert all(k.startswith("tokencache-demo:") or k == "someone-else:key" for k in ours), ours
    assert real_redis.zcard("tokencache-demo:index") == 0  # its tokens deleted at the end
