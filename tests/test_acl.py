"""The Redis users of docs/security.md, read from that page, run every role's commands with an empty ACL log.

A redis-server of this module's own holds the users exactly as the page writes them (the ``default``
user turned off, as the page says; the tests inspect through an admin user of their own). Each role
runs what it runs in production: apps (sync with the near cache, asyncio, without ``invalidate``)
against a worker pool of the worker user, that pool's failures and repair, plain ``rq worker`` with
the repair loop, and the operator's ``ls``, ``status`` and ``audit``. Afterwards Redis's ``ACL LOG`` must be
empty and the workers' logs free of tracebacks; and what a role must not do is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis import Redis
from rq.command import send_shutdown_command
from rq.job import Job

from tokencache import RedisUnavailableError, Token, TokenStore, aio
from tokencache.cli import acl
from tokencache.constants import FORGET_POOL
from tokencache.crypto import new_key
from tokencache.keys import Keys, TokenKey
from tokencache.testing.emulator import TOKEN_PREFIX, Emulator
from tokencache.testing.redisserver import EmbeddedRedis
from tokencache.testing.workers import PoolProcess, isolated_env, stop_group
from tokencache.validate import NAMESPACE_PATTERN

from .conftest import SCOPE, wait_for

ROOT = Path(__file__).resolve().parent.parent
SECURITY_PAGE = ROOT / "docs" / "security.md"
NS = "tokencache"
"""The namespace the documented lines are written for; its refresh queue has the same name."""
APP, APP_NOINVALIDATE, WORKER, OPERATOR = (
    "tokencache-app",
    "tokencache-app-noinvalidate",
    "tokencache-worker",
    "tokencache-operator",
)
ADMIN, ADMIN_PASSWORD = "acl-test-admin", "acl-test-admin-password"
FETCH_WAIT = 30.0
"""Seconds an app waits for the workers' fetch: a pool on a busy two-core machine."""
NOBODY = "nobody@tokencache-acl.iam.gserviceaccount.com"
"""An account no worker holds credentials for: its refresh gives up (a hopeless error)."""


def documented_acl_lines() -> list[list[str]]:
    """Every ``ACL SETUSER`` line of the page's text blocks, split as redis-cli splits it."""
    blocks = re.findall(r"^```text\n(.*?)^```", SECURITY_PAGE.read_text(), re.S | re.M)
    lines = [
        line.split() for block in blocks for line in block.splitlines() if line.startswith("ACL SETUSER ")
    ]
    assert len(lines) >= 5, "docs/security.md lost its ACL SETUSER lines"
    return lines


def role_lines() -> dict[str, list[str]]:
    """Each user's defining line (the one that starts from ``reset``), by user name."""
    return {line[2]: line for line in documented_acl_lines() if line[3:4] == ["reset"]}


SETINFO = "+client|setinfo"


def extra_lines(user: str) -> list[list[str]]:
    """The page's optional additions for ``user`` (lines without ``reset``), but for :data:`SETINFO`."""
    return [
        line
        for line in documented_acl_lines()
        if line[2] == user and "reset" not in line and SETINFO not in line
    ]


def setinfo_lines() -> list[list[str]]:
    """The page's ``+client|setinfo`` lines, for servers with ``CLIENT SETINFO`` (Redis >= 7.2, Valkey)."""
    return [line for line in documented_acl_lines() if SETINFO in line]


def knows_setinfo(admin: Redis) -> bool:
    """Whether the server has ``CLIENT SETINFO``: redis-py sends it on every connection where it does."""
    try:
        admin.execute_command("CLIENT", "SETINFO", "LIB-NAME", "tokencache-acl-test")
    except redis.ResponseError:  # Redis 7.0: unknown subcommand
        return False
    return True


class Tap:
    """A TCP relay in front of the server for one user: every connection through it is that user's, and the
    relay knows the port each one reaches the server from, which is how MONITOR names a client."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.ports: set[int] = set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self.ports.add(server.getsockname()[1])
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
        source.close()  # each socket is one pipe's source: that pipe closes it

    def close(self) -> None:
        self.listener.close()


SUBCOMMANDS = {"client", "script", "acl", "config", "xinfo", "object", "memory", "function", "cluster"}


class Monitor:
    """Every command the server runs, by the user whose connection (a :class:`Tap`'s) sent it.

    A script's commands (MONITOR's ``lua`` client) count for the user whose EVALSHA ran them."""

    STOP = "acl-monitor-stop"

    def __init__(self, server: EmbeddedRedis, taps: dict[str, Tap]) -> None:
        self.client = Redis(host="127.0.0.1", port=server.port, username=ADMIN, password=ADMIN_PASSWORD)
        self.taps = taps
        self.lines: list[tuple[str, str]] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _watch(self) -> None:
        with self.client.monitor() as monitor:
            self.ready.set()
            for entry in monitor.listen():
                if self.STOP in entry["command"]:
                    return
                self.lines.append((entry["client_port"] or entry["client_address"], entry["command"]))

    def stop(self, admin: Redis) -> dict[str, set[str]]:
        admin.echo(self.STOP)
        self.thread.join(10)
        self.client.close()
        users = {port: user for user, tap in self.taps.items() for port in tap.ports}
        sent: dict[str, set[str]] = {user: set() for user in self.taps}
        caller = None  # a script's commands ("lua") are its caller's
        for port, command in self.lines:
            if port != "lua":
                caller = users.get(int(port)) if port.isdigit() else None
            if caller is not None:
                sent[caller].add(command_name(command))
        return sent


def command_name(command: str) -> str:
    """``client|setname`` for ``CLIENT SETNAME x``, ``get`` for ``GET k``: as ACL rules name commands."""
    words = [word.strip('"').lower() for word in command.split(" ", 2)]
    return f"{words[0]}|{words[1]}" if words[0] in SUBCOMMANDS and len(words) > 1 else words[0]


@dataclass
class Roles:
    """The module's redis-server with the documented users, and an admin client to look at it."""

    server: EmbeddedRedis
    admin: Redis
    taps: dict[str, Tap]

    def url(self, user: str) -> str:
        password = next(rule[1:] for rule in role_lines()[user] if rule.startswith(">"))
        return f"redis://{user}:{password}@127.0.0.1:{self.taps[user].port}/0"

    def apply(self, lines: list[list[str]]) -> None:
        for line in lines:
            assert self.admin.execute_command(*line) in (b"OK", "OK"), line

    def denials(self) -> list[str]:
        """Redis's ACL log, one line per refusal: who was refused what."""
        return [
            f"{entry['username']}: {entry['reason']} {entry['object']} ({entry['context']})"
            for entry in self.admin.acl_log()
        ]

    def store(self) -> TokenStore:
        """A store of the namespace as the admin sees it (for planting tokens and looking at them)."""
        return TokenStore(self.admin, namespace=NS, queue=NS)

    def pool(self, key_file: Path, tmp_path: Path, workers: int = 2) -> PoolProcess:
        """``tokencache worker`` as the worker user, holding ``key_file`` as its default account."""
        env = isolated_env(tmp_path / "no-gcloud", GOOGLE_APPLICATION_CREDENTIALS=str(key_file))
        return PoolProcess(
            self.url(WORKER), workers, namespace=NS, queue=NS, env=env, log=tmp_path / "pool.log"
        )


@pytest.fixture(scope="module")
def acl_server() -> Iterator[Roles]:
    """A redis-server of this module's own, with an admin user, then every documented line."""
    server = EmbeddedRedis().start()
    bootstrap = server.client()
    bootstrap.execute_command("ACL", "SETUSER", ADMIN, "on", f">{ADMIN_PASSWORD}", "~*", "&*", "+@all")
    bootstrap.close()
    admin = Redis(
        host="127.0.0.1", port=server.port, username=ADMIN, password=ADMIN_PASSWORD, socket_timeout=5
    )
    roles = Roles(server, admin, {user: Tap(server.port) for user in role_lines()})
    roles.apply([line for line in documented_acl_lines() if SETINFO not in line])  # see roles()
    yield roles
    for tap in roles.taps.values():
        tap.close()
    admin.close()
    server.stop()


SENT: dict[str, set[str]] = {}
"""Every command each role sent in the tests that run it as in production (see :func:`recorded`)."""
RECORDED: set[str] = set()


@pytest.fixture
def recorded(request: pytest.FixtureRequest, roles: Roles) -> Iterator[Roles]:
    """``roles``, with what each user sends recorded into :data:`SENT` (for the least-privilege check)."""
    monitor = Monitor(roles.server, roles.taps)
    yield roles
    for user, commands in monitor.stop(roles.admin).items():
        SENT.setdefault(user, set()).update(commands)
    RECORDED.add(request.node.name)


@pytest.fixture
def roles(acl_server: Roles) -> Roles:
    """The documented users as the page defines them (a test's additions undone), an empty server and log."""
    acl_server.admin.flushall()  # server started by this test (this module's own)
    acl_server.apply(list(role_lines().values()))
    if knows_setinfo(acl_server.admin):  # the page's lines for Redis >= 7.2 and Valkey
        acl_server.apply(setinfo_lines())
    acl_server.admin.acl_log_reset()
    return acl_server


@pytest.fixture
def key_file(emulator: Emulator, tmp_path: Path) -> Path:
    path = tmp_path / "default.json"
    emulator.write_service_account(path)
    return path


def cli_env(roles: Roles, user: str, **extra: str) -> dict[str, str]:
    """The environment of a ``tokencache`` command run as ``user``, on the namespace NS, no credentials."""
    env = isolated_env(Path("/nonexistent"), TOKENCACHE_REDIS_URL=roles.url(user))
    env.update(TOKENCACHE_NAMESPACE=NS, TOKENCACHE_QUEUE=NS, **extra)
    return env


def cli(roles: Roles, user: str, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokencache", *args],
        env=cli_env(roles, user, **extra),
        capture_output=True,
        text=True,
        timeout=60,
    )


def soon(seconds: int) -> int:
    return int(time.time()) + seconds


def replaced(store: TokenStore, token: Token) -> bool:
    """Whether the workers have stored another token under ``token``'s key."""
    found = store.find((token.account, token.scope))
    return found is not None and found.token != token.token


LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", re.M)
JOB_RAISED = "exception raised while executing"
"""RQ's report of a refresh job that raised (a refresh that gives up does), with the job's traceback."""


def worker_log_is_clean(log: str) -> None:
    """No refused command, no traceback but RQ's report of a job that raised; RQ's command channel is up."""
    starts = [m.start() for m in LOG_RECORD.finditer(log)] + [len(log)]
    records = [log[: starts[0]], *(log[a:b] for a, b in itertools.pairwise(starts))]
    unexpected = [r for r in records if "Traceback" in r and JOB_RAISED not in r.partition("\n")[0]]
    assert not unexpected, unexpected[0][-3000:]
    assert "no permissions" not in log.lower() and "NoPermission" not in log, log[-3000:]
    assert "pubsub thread exiting" not in log, log[-3000:]
    assert "subscribing to channel rq:pubsub:" in log, log[-3000:]


def test_the_page_defines_every_role(roles: Roles) -> None:
    assert set(role_lines()) == {APP, APP_NOINVALIDATE, WORKER, OPERATOR}
    for user in role_lines():
        assert roles.admin.acl_getuser(user)["enabled"]
    assert not roles.admin.acl_getuser("default")["enabled"]  # as the page says
    assert extra_lines(APP) == [["ACL", "SETUSER", APP, "+client|tracking"]]
    assert extra_lines(OPERATOR) == [["ACL", "SETUSER", OPERATOR, "-info"]]
    assert setinfo_lines() == [["ACL", "SETUSER", user, SETINFO] for user in role_lines()]


async def aio_app(url: str) -> tuple[Token, Token]:
    """The asyncio app: a miss the workers fetch, its invalidation, and the refetch."""
    async with aio.TokenStore.from_url(url, namespace=NS, queue=NS) as app:
        fetched = await app.for_scope("acl-miss-aio", timeout=FETCH_WAIT)
        assert await app.invalidate("acl-miss-aio", fetched)
        return fetched, await app.for_scope("acl-miss-aio", timeout=FETCH_WAIT)


def run_sync_apps(roles: Roles, stored: Token) -> None:
    """The sync app with the near cache (find, a miss, invalidate, the refetch); one without invalidate."""
    with TokenStore.from_url(roles.url(APP), namespace=NS, queue=NS, near_cache=True) as app:
        assert app.near_cache is not None and app.near_cache.wait_active(5)
        assert app.find(SCOPE) == stored and app.find(SCOPE) == stored  # the second from the near cache
        fetched = app.for_scope("acl-miss", timeout=FETCH_WAIT)
        assert fetched.token.startswith(TOKEN_PREFIX)
        assert app.invalidate("acl-miss", fetched)
        assert app.for_scope("acl-miss", timeout=FETCH_WAIT).token != fetched.token
    with TokenStore.from_url(roles.url(APP_NOINVALIDATE), namespace=NS, queue=NS) as basic:
        assert basic.find(SCOPE) == stored
        assert basic.for_scope("acl-miss-basic", timeout=FETCH_WAIT).token.startswith(TOKEN_PREFIX)


def run_worker_failures(roles: Roles, emulator: Emulator) -> None:
    """Under the worker user: a refresh that gives up, one that fails and retries, and a lost job repaired."""
    admin = roles.store()
    emulator.config.fail_next = 2
    retried = Token(token="ya29.acl-retried", scope="acl-retry", expires=soon(5))
    hopeless = Token(token="ya29.acl-hopeless", scope=SCOPE, account=NOBODY, expires=soon(5))
    lost = Token(token="ya29.acl-lost", scope="acl-lost", expires=soon(12))  # refresh due in 2 s
    for token in (retried, hopeless, lost):
        admin.store(token)
    lost_job = admin.keys.job_id(admin.key_for(lost))
    roles.admin.zrem(admin.refresh_queue.scheduled.key, lost_job)  # as if a failover lost it
    roles.admin.delete(Job.key_for(lost_job))
    hash_of = {t.scope: admin.keys.token(admin.key_for(t)) for t in (retried, hopeless)}
    wait_for(lambda: roles.admin.hget(hash_of["acl-retry"], "failures"), 10, what="a failure recorded")
    wait_for(
        lambda: roles.admin.hget(hash_of[SCOPE], "gave_up_at"), 10, what="the hopeless refresh to give up"
    )
    for token in (retried, lost):
        wait_for(lambda t=token: replaced(admin, t), 20, what=f"{token.scope} refreshed")  # type: ignore[misc]


@pytest.mark.usefixtures("recorded")
def test_app_and_worker_roles_run_with_an_empty_acl_log(
    roles: Roles, emulator: Emulator, key_file: Path, tmp_path: Path
) -> None:
    roles.apply(extra_lines(APP))  # +client|tracking: the page's addition for the near cache
    stored = Token(token="ya29.acl-stored", scope=SCOPE, expires=soon(3600))
    roles.store().store(stored)
    pool = roles.pool(key_file, tmp_path)
    with pool:
        run_sync_apps(roles, stored)
        fetched, refetched = asyncio.run(aio_app(roles.url(APP)))
        assert fetched.token.startswith(TOKEN_PREFIX) and refetched.token != fetched.token
        run_worker_failures(roles, emulator)
    assert roles.denials() == []
    worker_log_is_clean((tmp_path / "pool.log").read_text())


@pytest.mark.usefixtures("recorded")
def test_plain_rq_worker_and_repair_loop_run_with_an_empty_acl_log(
    roles: Roles, key_file: Path, tmp_path: Path
) -> None:
    """The documented plain-RQ setup as the worker user; RQ's command channel works (it stops the worker)."""
    env = isolated_env(
        tmp_path / "no-gcloud",
        GOOGLE_APPLICATION_CREDENTIALS=str(key_file),
        TOKENCACHE_REDIS_URL=roles.url(WORKER),
        TOKENCACHE_NAMESPACE=NS,
        TOKENCACHE_QUEUE=NS,
        PYTHONPATH=str(ROOT),
    )
    rq = str(Path(sys.executable).parent / "rq")
    log = tmp_path / "rq.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [rq, "worker", "-c", "workers.settings", "--with-scheduler", "--name", "acl-plain",
             "--serializer", "rq.serializers.JSONSerializer",
             "--job-class", "tokencache.scheduling.RefreshJob"],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        repair = subprocess.Popen(
            [sys.executable, "-m", "workers.repair"],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        with TokenStore.from_url(roles.url(APP), namespace=NS, queue=NS) as app:
            assert app.for_scope("acl-plain", timeout=FETCH_WAIT).token.startswith(TOKEN_PREFIX)
        admin = roles.store()
        lost = Token(token="ya29.acl-plain-lost", scope="acl-plain-lost", expires=soon(12))
        admin.store(lost)
        lost_job = admin.keys.job_id(admin.key_for(lost))
        roles.admin.zrem(admin.refresh_queue.scheduled.key, lost_job)
        roles.admin.delete(Job.key_for(lost_job))
        wait_for(lambda: replaced(admin, lost), 20, what="repair to re-enqueue the lost job")
        send_shutdown_command(roles.admin, "acl-plain")  # through the worker's rq:pubsub:acl-plain
        assert worker.wait(20) == 0
    finally:
        stop_group(repair, 10)
        stop_group(worker, 10)
    assert roles.denials() == []
    text = log.read_text(errors="replace")
    worker_log_is_clean(text)
    assert "Received shutdown command" in text, text[-2000:]


@pytest.mark.usefixtures("recorded")
def test_operator_role_lists_and_checks_a_live_fleet(roles: Roles, key_file: Path, tmp_path: Path) -> None:
    admin = roles.store()
    admin.store(Token(token="ya29.acl-operator-listed", scope=SCOPE, expires=soon(3600)))
    gone = {"workers": 1, "at": time.time() - FORGET_POOL - 60, "host": "old-host", "pid": 1}
    roles.admin.hset(admin.keys.pools, "long-gone", json.dumps(gone))
    with roles.pool(key_file, tmp_path):
        listed = cli(roles, OPERATOR, "ls")
        assert listed.returncode == 0, listed.stderr
        assert "ya29.acl-operator-listed" not in listed.stdout and "ya29.ac…ted" in listed.stdout
        status = cli(roles, OPERATOR, "status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        health = json.loads(status.stdout)
        assert health["problems"] == [] and health["redis_version"].startswith("7.")
        assert health["workers"] == 2 and health["scheduler"] and health["tokens"] == 1
        assert roles.admin.hget(admin.keys.pools, "long-gone") is None  # forgotten, as the role allows
        hopeless = Token(token="ya29.acl-hopeless", scope=SCOPE, account=NOBODY, expires=soon(5))
        admin.store(hopeless)
        token_hash = admin.keys.token(admin.key_for(hopeless))
        wait_for(lambda: roles.admin.hget(token_hash, "gave_up_at"), 10, what="the refresh to give up")
        status = cli(roles, OPERATOR, "status")
        assert status.returncode == 1 and "gave up" in status.stdout and NOBODY in status.stdout, (
            status.stdout
        )
        trail = cli(roles, OPERATOR, "audit", "--json")
        assert trail.returncode == 0, trail.stderr
        events = [json.loads(line)["event"] for line in trail.stdout.splitlines()]
        assert events.count("stored") == 2 and "gave_up" in events, events
        assert cli(roles, OPERATOR, "audit", "--event", "gave_up").returncode == 0
        follow_audit(roles)
    ring = f"k1:{new_key()},plaintext"  # turning encryption on: the ring still reads plaintext
    rekeyed = cli(roles, OPERATOR, "rekey", TOKENCACHE_ENCRYPTION_KEYS=ring)
    # The listed token, and the hopeless one unless its hash expired (5 s) before the rekey ran: skipped.
    said = r"rewrote (\d) under key 'k1', 0 already current, (\d) skipped, 0 failed"
    done = re.search(said, rekeyed.stdout)
    assert rekeyed.returncode == 0 and done and int(done[1]) >= 1, rekeyed
    assert int(done[1]) + int(done[2]) == 2, rekeyed
    listed_token = admin.keys.token(admin.key_for(Token(token="x", scope=SCOPE, expires=soon(60))))
    assert roles.admin.hget(listed_token, "token").startswith(b"enc:k1:")
    assert roles.denials() == []


def follow_audit(roles: Roles) -> None:
    """``tokencache audit --follow`` as the operator, until Redis shows it waiting in XREAD."""
    follower = subprocess.Popen(
        [sys.executable, "-m", "tokencache", "audit", "--follow"], env=cli_env(roles, OPERATOR),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(
            lambda: any(c["user"] == OPERATOR and c["cmd"] == "xread" for c in roles.admin.client_list()),
            30,
            what="audit --follow to wait in XREAD",
        )
    finally:
        stop_group(follower, 10)


WEDGE = "18446744073709551615-18446744073709551615"
"""The largest stream id: after it, every ``XADD *`` fails."""


def test_a_wedged_audit_stream_fails_no_write_and_status_flags_it(
    roles: Roles, caplog: pytest.LogCaptureFixture
) -> None:
    """An app user can make every later XADD fail (an entry with the largest id, MAXLEN 0): each audited
    write (store, a refresh's write, an eviction, a give-up) still goes through, warns and is counted."""
    from tokencache.core.audit import Audit, Role
    from tokencache.worker.writes import record_failure, replace_if_indexed

    from .test_metrics import sample

    def failed_entries() -> float:
        return sample("tokencache_audit_failed_total")

    before = failed_entries()
    app = Redis.from_url(roles.url(APP))
    assert app.xadd(f"{NS}:audit", {"event": "x"}, id=WEDGE, maxlen=0)  # MAXLEN 0 empties the trail too
    app.close()
    admin, key = roles.store(), TokenKey.of(None, SCOPE, None)
    with caplog.at_level("WARNING", logger="tokencache.core.audit"):
        admin.store(Token(token="ya29.after-wedge", scope=SCOPE, expires=soon(3600)))
        asyncio.run(_aio_store(roles, Token(token="ya29.after-wedge-aio", scope=SCOPE, expires=soon(3600))))
        worker = TokenStore(roles.admin, namespace=NS, queue=NS, audit=Audit(10_000, Role.WORKER))
        refreshed = Token(token="ya29.refreshed", scope=SCOPE, expires=soon(3600))
        assert replace_if_indexed(worker, key, refreshed, outcome="due")
        assert record_failure(worker, key, "boom", gave_up=True, current=refreshed) == 1
        with TokenStore.from_url(roles.url(APP), namespace=NS, queue=NS) as reporter:
            assert reporter.invalidate(SCOPE, "ya29.refreshed")
    assert roles.admin.hget(admin.keys.token(key), "rejected_at") is not None  # the eviction stood
    assert failed_entries() - before == 5
    assert caplog.text.count("the audit entry was not appended") == 5 and "exhausted" in caplog.text
    health = json.loads(cli(roles, OPERATOR, "status", "--json").stdout)
    assert health["audit_ahead"] > 10**9 and any("audit stream's last id" in p for p in health["problems"])
    roles.admin.rename(f"{NS}:audit", f"{NS}:audit:wedged")  # the documented recovery
    admin.store(Token(token="ya29.after-recovery", scope=SCOPE, expires=soon(3600)))
    assert failed_entries() - before == 5 and roles.admin.xlen(f"{NS}:audit") == 1
    assert roles.denials() == []


async def _aio_store(roles: Roles, token: Token) -> None:
    url = f"redis://{ADMIN}:{ADMIN_PASSWORD}@127.0.0.1:{roles.server.port}/0"
    async with aio.TokenStore.from_url(url, namespace=NS, queue=NS) as store:
        await store.store(token, sub="aio")


def test_status_works_without_info_and_says_unknown(roles: Roles, key_file: Path, tmp_path: Path) -> None:
    """Finding 3: status ran INFO and exited 1 for a user without it; now it says what it cannot read."""
    roles.apply(extra_lines(OPERATOR))  # -info
    with roles.pool(key_file, tmp_path, workers=1):
        status = cli(roles, OPERATOR, "status")
        as_json = cli(roles, OPERATOR, "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "version and memory unknown" in status.stdout and "ok" in status.stdout
    health = json.loads(as_json.stdout)
    assert (health["redis_version"], health["redis_memory"], health["problems"]) == ("unknown", "unknown", [])
    assert set(roles.denials()) == {f"{OPERATOR}: command info (toplevel)"}


def refused(client: Redis, *command: Any) -> str:
    """The error of a command ``client``'s user may not run (fails the test if it runs), lower-cased:
    Redis says "no permissions", Valkey "No permissions"."""
    with pytest.raises(redis.ResponseError) as caught:
        client.execute_command(*command)
    return str(caught.value).lower()


DELETE_SCRIPT = "return redis.call('DEL', KEYS[1])"


def test_what_a_role_must_not_do_is_refused(roles: Roles) -> None:
    admin = roles.store()
    token = Token(token="ya29.acl-victim", scope=SCOPE, expires=soon(3600))
    job = admin.store(token)
    assert job is not None
    victim = admin.keys.token(admin.key_for(token))
    other_ns = "other-team:token:default:x:"
    roles.admin.hset(other_ns, "token", "ya29.other-team")
    users = {user: Redis.from_url(roles.url(user)) for user in role_lines()}
    app, basic, worker, operator = users[APP], users[APP_NOINVALIDATE], users[WORKER], users[OPERATOR]
    try:
        sha = app.script_load(DELETE_SCRIPT)
        for client in (app, basic, operator):
            assert "no permissions" in refused(client, "DEL", victim)
            assert "no permissions" in refused(client, "SET", victim, "overwritten")
            assert "no permissions" in refused(client, "EVAL", DELETE_SCRIPT, 1, victim)
            assert "no permissions" in refused(client, "HGETALL", other_ns)
            admin_only = (("FLUSHALL",), ("KEYS", "*"), ("SCAN", "0"))  # server started by this test
            for command in (*admin_only, ("CONFIG", "GET", "*")):  # refused: the roles may not run them
                assert "no permissions" in refused(client, *command)
        for client in (app, basic):
            assert "no permissions" in refused(client, "HGETALL", job.key)  # RQ's job data: write only
            assert "no permissions" in refused(client, "INFO")
            assert "no permissions" in refused(
                client, "PUBLISH", admin.keys.channel(admin.key_for(token)), "{}"
            )
            assert "no permissions" in refused(client, "SUBSCRIBE", "rq:pubsub:some-worker")
        # A loaded script gains the app nothing: its DEL is checked against the app's rules.
        said = refused(app, "EVALSHA", sha, 1, victim)  # Redis, then Valkey 9:
        assert "can't run this command" in said or "no permissions to run the 'del' command" in said
        # What the page says ACLs cannot stop: an app with invalidate may HSET any field of a token hash.
        assert app.hset(victim, "rejected_at", 1) == 1
        assert "no permissions" in refused(basic, "HSET", victim, "token", "ya29.forged")
        assert "no permissions" in refused(basic, "EVALSHA", sha, 1, victim)
        not_workers = (("FLUSHALL",), ("KEYS", "*"))  # server started by this test
        for command in (*not_workers, ("CONFIG", "SET", "save", ""), ("HGETALL", other_ns)):  # refused
            assert "no permissions" in refused(worker, *command)
        assert "no permissions" in refused(operator, "ZREM", admin.refresh_queue.scheduled.key, job.id)
        assert "no permissions" in refused(operator, "HGETALL", "rq:job:another-apps-job")
        assert roles.admin.exists(victim) and roles.admin.exists(job.key)
    finally:
        for client in users.values():
            client.close()
    assert all(": key " in d or ": command " in d or ": channel " in d for d in roles.denials())


def test_an_app_without_invalidate_gets_a_clear_error_from_invalidate(roles: Roles) -> None:
    token = Token(token="ya29.acl-basic", scope=SCOPE, expires=soon(3600))
    roles.store().store(token)
    with TokenStore.from_url(roles.url(APP_NOINVALIDATE), namespace=NS, queue=NS) as basic:
        with pytest.raises(
            RedisUnavailableError, match=r"no permissions to run the '(hget|evalsha)' command"
        ):
            basic.invalidate(SCOPE, token)
        assert basic.find(SCOPE) == token  # nothing evicted


def test_the_page_lines_target_the_environment_defaults() -> None:
    """The lines name the default namespace and the queue that follows it, so they work unchanged."""
    from tokencache import env

    assert env.DEFAULT_NAMESPACE == NS
    text = " ".join(" ".join(line) for line in role_lines().values())
    assert f"rq:queue:{NS}" in text and f"%R~{NS}:token:*" in text


ERROR_PATHS = {
    "discard": "redis-py sends it only to abandon a transaction that failed half-way",
    "unwatch": "redis-py sends it only when a WATCH transaction is reset before EXEC",
}
UNOBSERVABLE = {
    APP: ERROR_PATHS,
    APP_NOINVALIDATE: ERROR_PATHS,
    WORKER: {
        **ERROR_PATHS,
        "hexists": "RQ checks a worker name already registered (a plain rq worker restarted with --name)",
        "lmove": "RQ's dequeue without blocking: tokencache worker --burst",
        "lpush": "RQ's scheduler enqueues a job marked enqueue_at_front so (no refresh job is; a planted one "
        "must not stop the scheduler)",
    },
    OPERATOR: {},
}
"""Grants the role tests cannot make a role send, each kept for the reason given."""


def granted_commands(line: list[str]) -> set[str]:
    """The commands a role line grants (``+cmd`` anywhere, selectors included)."""
    text = " ".join(line)
    return {rule.strip("()").removeprefix("+") for rule in text.split() if rule.strip("(").startswith("+")}


def test_every_granted_command_is_sent_by_its_role() -> None:
    """Least privilege, not just enough: each command a role line grants was sent by that role in the role
    tests above (MONITOR through each user's own relay), the operator's ``rekey`` included."""
    roles_run = {"test_app_and_worker_roles_run_with_an_empty_acl_log",
                 "test_plain_rq_worker_and_repair_loop_run_with_an_empty_acl_log",
                 "test_operator_role_lists_and_checks_a_live_fleet"}  # fmt: skip
    if not roles_run <= RECORDED:
        pytest.skip("run the whole module: the role tests record what each role sends")
    unused = {
        user: sorted(granted_commands(line) - SENT[user] - UNOBSERVABLE[user].keys())
        for user, line in role_lines().items()
    }
    assert unused == {user: [] for user in role_lines()}, json.dumps(unused)


def test_the_page_lines_are_what_tokencache_acl_prints() -> None:
    """The page prints ``tokencache acl``'s lines for the default namespace, and the command prints the
    environment's: one generator for the page, the command and these tests."""
    page = [" ".join(line) for line in role_lines().values()]
    assert page == acl.role_lines(NS)
    env = isolated_env(Path("/nonexistent"), TOKENCACHE_NAMESPACE="team-a")
    env.pop("TOKENCACHE_QUEUE", None)
    out = subprocess.run(
        [sys.executable, "-m", "tokencache", "acl"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.splitlines() == acl.role_lines("team-a"), out
    assert "%W~rq:job:tc-dGVhbS1hO[g-v]*" in out.stdout and "tokencache:" not in out.stdout


def test_an_app_user_cannot_touch_another_namespaces_jobs(roles: Roles) -> None:
    """The app lines granted HSET/HDEL on every namespace's ``rq:job:tc-*``; now on its own namespace's."""
    own = Keys(NS).job_id(TokenKey.of(None, "x", None))
    other = Keys("team-b").job_id(TokenKey.of(None, "x", None))
    users = {user: Redis.from_url(roles.url(user)) for user in (APP, APP_NOINVALIDATE)}
    try:
        for client in users.values():
            client.hset(Job.key_for(own), "origin", NS)  # its own namespace's job: allowed
            assert "no permissions" in refused(client, "HSET", Job.key_for(other), "origin", "nowhere")
            assert "no permissions" in refused(client, "HDEL", Job.key_for(other), "origin")
    finally:
        for client in users.values():
            client.close()
    operator = Redis.from_url(roles.url(OPERATOR))
    try:
        assert "no permissions" in refused(operator, "HGETALL", Job.key_for(other))
    finally:
        operator.close()


PIECES = ["tokencache", "default", ".iam.gserviceaccount.com", "T", "D", "S", "a", "-", "_", "9", "."]
ABBREVIATED = st.lists(st.sampled_from(PIECES), min_size=1, max_size=5).map("".join)
NAMESPACES = st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True), ABBREVIATED).filter(
    lambda name: NAMESPACE_PATTERN.fullmatch(name) is not None and name != "rq"
)
KEY_TEXT = st.one_of(
    st.text(min_size=1, max_size=8).filter(str.strip), st.sampled_from(["default", "tokencache"])
)
SCOPES = st.one_of(
    st.sampled_from(["https://www.googleapis.com/auth/cloud-platform", "email openid", "x"]), KEY_TEXT
)


@settings(max_examples=150, deadline=None)
@given(a=NAMESPACES, b=NAMESPACES, account=KEY_TEXT, scope=SCOPES, sub=st.none() | KEY_TEXT)
def test_the_job_pattern_matches_exactly_its_namespaces_jobs(
    acl_server: Roles, a: str, b: str, account: str, scope: str, sub: str | None
) -> None:
    """Redis's own matcher (ACL DRYRUN) on a user whose only key is ``Keys(a).job_key_pattern``: every job
    of ``a`` matches, no job of another namespace does (abbreviated names and base64 alignment included)."""
    key = TokenKey.of(account, scope, sub)
    admin = acl_server.admin
    admin.execute_command("ACL", "SETUSER", "job-pattern-probe", "reset", "on", "nopass", "+hset",
                          f"~{Keys(a).job_key_pattern}")  # fmt: skip
    try:
        for namespace in (a, b):
            job_key = Job.key_for(Keys(namespace).job_id(key))
            verdict = admin.execute_command("ACL", "DRYRUN", "job-pattern-probe", "HSET", job_key, "f", "v")
            assert (verdict in (b"OK", "OK")) == (namespace == a), (a, namespace, job_key, verdict)
    finally:
        admin.execute_command("ACL", "DELUSER", "job-pattern-probe")
