"""The `tokencache` executable in subprocesses, against the private Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tokencache import Token, TokenStore
from tokencache.testing.emulator import Emulator
from tokencache.testing.redisserver import free_port

from .conftest import SCOPE, Workers, wait_for


def run(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokencache", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_token_prints_the_cached_token_and_nothing_else(store: TokenStore, workers: Workers) -> None:
    token = Token(token="ya29.cached-token-value", scope=SCOPE, expires=int(time.time()) + 600)
    store.store(token)
    out = run("token", SCOPE, env=workers.env())
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ya29.cached-token-value\n"


def test_token_fetches_on_a_miss_with_local_credentials(
    store: TokenStore, workers: Workers, emulator: Emulator
) -> None:
    out = run("token", "b a", env=workers.env())
    assert out.returncode == 0, out.stderr
    assert emulator.validate(out.stdout.strip()) is not None
    assert store.find("a b").token == out.stdout.strip()


def test_unknown_account_is_one_line_and_nonzero(workers: Workers) -> None:
    workers.start(1)  # the workers answer: they hold no such account either
    started = time.monotonic()
    out = run("token", SCOPE, "--account", "nobody@example.com", env=workers.env())
    assert out.returncode == 1 and time.monotonic() - started < 10
    assert out.stderr.count("\n") == 1 and "no credentials for account 'nobody@example.com'" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_scope_is_one_line_and_nonzero(workers: Workers) -> None:
    out = run("token", " , ", env=workers.env())
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "scope" in out.stderr


def test_token_json(store: TokenStore, workers: Workers) -> None:
    token = Token(token="ya29.cached-token-json", scope=SCOPE, expires=int(time.time()) + 600)
    store.store(token)
    out = run("token", SCOPE, "--json", "--redis-url", workers.redis_url, env=workers.env())
    data = json.loads(out.stdout)
    assert (
        data["token"] == token.token and data["expires"] == token.expires and 590 <= data["expires_in"] <= 600
    )


def test_status_healthy_and_attention(store: TokenStore, workers: Workers) -> None:
    token = Token(token="ya29.a0-status-secret-f3k", scope=SCOPE, expires=int(time.time()) + 600)
    store.store(token)
    down = run("status", "--json", env=workers.env())
    assert down.returncode == 1
    report = json.loads(down.stdout)
    assert report["workers"] == 0 and any("no worker" in p for p in report["problems"])
    workers.start(1)
    up = run("status", "--json", env=workers.env())
    assert up.returncode == 0, up.stdout
    report = json.loads(up.stdout)
    assert (
        report["workers"] == 1 and report["scheduler"] and report["tokens"] == 1 and report["scheduled"] == 1
    )
    table = run("status", env=workers.env())
    assert table.returncode == 0 and "workers" in table.stdout and "ok" in table.stdout
    # The server by its own name and version: Valkey also reports a redis_version (7.2.4 for Valkey 9).
    product = "Valkey" if "valkey_version" in store.redis.info("server") else "Redis"
    assert report["server"].startswith(f"{product} ") and f"({product} " in table.stdout.replace("\n", "")
    for out in (down, up, table):
        assert "status-secret" not in out.stdout + out.stderr


def test_status_reports_overdue_refreshes(store: TokenStore, workers: Workers) -> None:
    token = Token(token="ya29.overdue", scope=SCOPE, expires=int(time.time()) + 5)
    job = store.store(token)
    store.redis.delete(job.key)  # a lost job (no worker runs here, so nothing repairs it)
    store.redis.zrem(store.refresh_queue.scheduled.key, job.id)
    out = run("status", "--json", env=workers.env())
    report = json.loads(out.stdout)
    assert out.returncode == 1
    assert report["overdue"] == [store.key_for(token).encode()]
    assert any("overdue" in problem for problem in report["problems"])


@pytest.mark.parametrize("command", [("ls",), ("status",), ("token", SCOPE)])
def test_redis_down_is_one_line_and_nonzero(workers: Workers, command: tuple[str, ...]) -> None:
    env = dict(workers.env(), TOKENCACHE_REDIS_URL=f"redis://:sekret@127.0.0.1:{free_port()}/0")
    out = run(*command, env=env)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "127.0.0.1" in out.stderr and "sekret" not in out.stderr


def test_ls_masks_tokens(store: TokenStore, workers: Workers) -> None:
    store.store(Token(token="ya29.a0-very-secret-f3k", scope=SCOPE, expires=int(time.time()) + 600))
    out = run("ls", "--json", env=workers.env())
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert row["token"] == "ya29.a0…f3k" and row["scope"] == SCOPE
    plain = run("ls", env=workers.env())
    assert "very-secret" not in plain.stdout and "ya29.a0…f3k" in plain.stdout
    assert store.invalidate(SCOPE, "ya29.a0-very-secret-f3k")  # an API rejected it; no worker runs
    (row,) = json.loads(run("ls", "--json", env=workers.env()).stdout)
    assert row["last_refresh"].startswith("rejected by an API") and row["token"] == "ya29.a0…f3k"


def test_worker_stops_gracefully_on_sigterm(store: TokenStore, workers: Workers) -> None:
    from .conftest import descendants

    proc = workers.start(2)
    tree = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        code = proc.wait(40)  # a loaded 2-core machine can take a while; a hang fails with who is left
    except subprocess.TimeoutExpired:
        alive = {
            pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in tree if Path(f"/proc/{pid}").exists()
        }
        raise AssertionError(f"the pool ignored SIGTERM; still alive: {alive}") from None
    assert code == 0
    wait_for(lambda: workers.count() == 0, 10, what="workers unregistered")


def test_plain_rq_worker_with_the_settings_module(store: TokenStore, workers: Workers) -> None:
    old = Token(token="ya29.before-plain-rq", scope=SCOPE, expires=int(time.time()) - 1)
    store.store(old)
    job_id = store.keys.job_id(store.key_for(old))
    store.refresh_queue.enqueue(store.key_for(old), store.refresh_before)  # as repair would
    out = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "rq"),
            "worker",
            "-c",
            "workers.settings",
            "--burst",
            "--serializer",
            "rq.serializers.JSONSerializer",
            "--job-class",
            "tokencache.scheduling.RefreshJob",
        ],
        env=workers.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert store.find(SCOPE) is not None, out.stderr
    assert store.redis.zrange(store.refresh_queue.scheduled.key, 0, -1) == [job_id.encode()]  # next run


def test_emulator_command_writes_keys_serves_and_stops(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokencache", "emulator", "--port", str(port), "--keys", str(tmp_path),
         "--accounts", "2", "--lifetime", "60"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lines = [proc.stdout.readline() for _ in range(4)]  # type: ignore[union-attr]
        assert lines[-1].startswith("emulator listening on http://127.0.0.1:"), lines
        assert sorted(p.name for p in tmp_path.glob("*.json")) == [
            "authorized_user.json",
            "sa-1.json",
            "sa-2.json",
        ]
        assert (
            json.loads((tmp_path / "sa-1.json").read_text())["token_uri"] == f"http://127.0.0.1:{port}/token"
        )
        stats = requests.get(f"http://127.0.0.1:{port}/stats", timeout=5).json()
        assert stats["token_requests"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]
    assert code == 0


def test_emulator_bad_option_is_one_line(tmp_path: Path) -> None:
    out = run("emulator", "--port", str(free_port()), "--failure-rate", "2", env=dict(os.environ))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "failure_rate" in out.stderr


def test_status_sees_a_sigkilled_pool(store: TokenStore, workers: Workers) -> None:
    from tokencache.constants import POOL_TTL

    from .conftest import descendants

    pool = workers.start(2)
    assert run("status", env=workers.env()).returncode == 0
    for pid in [pool.pid, *descendants(pool.pid)]:
        os.kill(pid, signal.SIGKILL)
    pool.wait(5)

    def reported() -> dict[str, object] | None:
        out = run("status", "--json", env=workers.env())
        report = json.loads(out.stdout)
        return report if out.returncode == 1 and report["dead_pools"] else None

    report = wait_for(reported, POOL_TTL + 10, interval=0.5, what="the dead pool reported")
    assert report["workers"] == 0 and report["rq_registrations"] == 2  # RQ still lists the dead workers


def test_piped_ls_prints_full_values_and_survives_markup(store: TokenStore, workers: Workers) -> None:
    scope = (
        "https://www.googleapis.com/auth/cloud-platform https://www.googleapis.com/auth/devstorage.read_only"
    )
    token = Token(token="ya29.a0-piped-secret-f3k", scope=scope, expires=int(time.time()) + 600)
    store.store(token, sub="someone.with.a.long.name@example.com")
    store.redis.hset(
        store.keys.token(store.key_for(token, sub="someone.with.a.long.name@example.com")),
        mapping={"failures": "1", "last_error": "boom [/oops] [bold]x"},
    )
    out = run("ls", env=workers.env())
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    cells = row.split("\t")
    assert header.split("\t")[0] == "ACCOUNT" and cells[1] == store.key_for(token).scope
    assert cells[2] == "someone.with.a.long.name@example.com" and "[/oops]" in cells[5]
    assert "piped-secret" not in out.stdout and cells[6] == "ya29.a0…f3k"


def test_status_sees_a_sigkilled_scheduler_within_5_s(store: TokenStore, workers: Workers) -> None:
    """Bound: after a SIGKILL of the pool whose worker runs RQ's scheduler, `tokencache status` reports
    no scheduler and exits 1 within 5 s (measured to the end of the status run that says so), though
    RQ's scheduler lock still names the dead scheduler for up to 61 s."""
    from rq.scheduler import RQScheduler

    pool = workers.start(2)

    def healthy() -> bool:
        out = run("status", "--json", env=workers.env())
        return out.returncode == 0 and json.loads(out.stdout)["scheduler"]

    wait_for(healthy, 30, interval=0.2, what="status healthy with a scheduler")
    killed = time.monotonic()
    pool.kill()  # SIGKILL to the pool's whole process group: parent, workers and the scheduler

    def flagged() -> float | None:
        out = run("status", "--json", env=workers.env())
        report = json.loads(out.stdout)
        return time.monotonic() - killed if out.returncode == 1 and not report["scheduler"] else None

    seen_after = wait_for(flagged, 15, interval=0.05, what="the dead scheduler reported")
    print(f"status reported the dead scheduler {seen_after:.2f} s after the SIGKILL")  # shown by -rP
    assert seen_after <= 5.0, f"status reported the dead scheduler {seen_after:.2f} s after the SIGKILL"
    lock = RQScheduler.get_locking_key(store.refresh_queue.name)
    assert store.redis.exists(lock)  # RQ's lock alone would still say "running"


def test_ls_and_status_skip_and_name_bad_keys(store: TokenStore, workers: Workers) -> None:
    """Bound: with a token key overwritten by a string, a malformed hash and a junk index member (all
    due), ``ls`` lists the good token and exits 0, and ``status`` reports (exit 1: attention), each
    naming the three skipped keys; neither fails."""
    now = int(time.time())
    store.store(Token(token="ya29.a0-good-one-f3k", scope=SCOPE, expires=now + 600, sub="good@example.com"))
    for sub in ("overwritten@example.com", "malformed@example.com"):
        store.store(Token(token="ya29.a0-bad-one-f3k", scope=SCOPE, expires=now + 5, sub=sub))
    overwritten = store.keys.token(store.key_for_info(SCOPE, "overwritten@example.com"))
    malformed = store.keys.token(store.key_for_info(SCOPE, "malformed@example.com"))
    store.redis.set(overwritten, "someone else's string")
    store.redis.hset(malformed, "expires", "soon")
    store.redis.zadd(store.keys.index, {"junk-member": 1})
    bad = (overwritten, malformed, "junk-member")

    ls = run("ls", "--json", env=workers.env())
    assert ls.returncode == 0, ls.stderr
    assert [row["sub"] for row in json.loads(ls.stdout)] == ["good@example.com"]
    assert all(f"skipping {name} " in ls.stderr for name in bad), ls.stderr

    status = run("status", "--json", env=workers.env())
    assert status.returncode == 1 and "error" not in status.stderr, status.stderr
    report = json.loads(status.stdout)
    assert set(report["skipped"]) == set(bad) and "WRONGTYPE" in report["skipped"][overwritten]
    assert any(all(name in problem for name in bad) for problem in report["problems"]), report["problems"]
    assert report["tokens"] == 4
    table = run("status", env=workers.env())
    assert table.returncode == 1 and "bad keys skipped" in table.stdout and overwritten in table.stdout
