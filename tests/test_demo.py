"""The demo, run as a user would: the real executable, to completion, leaving nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    match = re.search(rf"{re.escape(label)}[^:]*:\s+(?:>=\s*)?(\d+)", text)
    assert match, f"{label!r} not in the summary:\n{text}"
    return int(match.group(1))


def test_demo_on_its_own_redis_calls_the_endpoint_once_per_token_lifetime() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TOKENCACHE_REDIS_URL"}
    before = descendants(os.getpid())
    out = run_demo(env, "--duration", "10", "--lifetime", "6")  # a token serves 3 s: 2 tokens x about 4
    assert out.returncode == 0, out.stdout + out.stderr
    assert number("misses", out.stdout) == 0
    requests = number("token requests at the endpoint", out.stdout)
    assert requests == number("token lifetimes the apps used", out.stdout)
    assert 6 <= requests <= 10  # refreshed about every 3 s, never once per process or per call
    assert number("per-process caching would have made", out.stdout) == 4 * requests
    assert not descendants(os.getpid()) - before  # redis-server, workers and apps are all gone


def test_demo_on_a_given_redis_touches_only_its_namespace(redis_url: str, real_redis: Redis) -> None:
    real_redis.set("someone-else:key", "keep me")
    out = run_demo(dict(os.environ, TOKENCACHE_REDIS_URL=redis_url), "--duration", "4", "--lifetime", "30")
    assert out.returncode == 0, out.stderr
    assert real_redis.get("someone-else:key") == b"keep me"
    ours = [k.decode() for k in real_redis.scan_iter(count=1000) if not k.startswith(b"rq:")]
    assert all(k.startswith("tokencache-demo:") or k == "someone-else:key" for k in ours), ours
    assert real_redis.zcard("tokencache-demo:index") == 0  # its tokens deleted at the end


def test_demo_fails_when_its_worker_pool_dies(tmp_path: object) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TOKENCACHE_REDIS_URL"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokencache", "demo", "--duration", "20", "--lifetime", "6"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        from .conftest import wait_for

        def pool_pid() -> int | None:
            for pid in descendants(proc.pid):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"worker\x00-n" in cmdline:
                    return pid
            return None

        pid = wait_for(pool_pid, 30, what="the demo's worker pool")
        time.sleep(3)  # let the demo run a little before the failure
        os.killpg(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1 and "FAILED" in out, out
