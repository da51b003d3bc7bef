"""Fleet against the peer: 8 app processes use 20 tokens for several token lifetimes, two ways.

Through tokencache: apps without credentials call ``find()`` (``for_scope()`` on
a miss); a ``tokencache worker -n 2`` pool holds the key and refreshes every
token ``refresh_before`` = lifetime / 4 ahead (``TOKENCACHE_REFRESH_BEFORE``,
given to the pool and the apps). Through plain google-auth, the peer: every
app holds the key and 20 ``Credentials`` and refreshes each itself when it is
not ``valid``, with google-auth's refresh threshold (3 min 45 s of a 1 h
token) scaled to the same 6.25 % of the short lifetime. The app loop is
``bench/fleet_child.py``: one call every 10 ms per app in both fleets.

The two fleets run side by side, at the same time, as two service accounts of
the one emulator, which counts the tokens it issues per account; its counters
are reset once, before anything starts. That is the same-run baseline of
``bench/common.py`` taken a step further (both sides see the same machine at
the same moment), and it keeps ``--quick`` under a minute with three 12 s
lifetimes per side (one fleet after the other would take 72 s of loop alone).
The counts do not depend on timing, except that a starved worker pool shows
up as tokencache misses, which the extra load makes more likely, not less.

    --quick  12 s tokens, refresh_before 3 s, loop 36 s (3 lifetimes): about 45 s in all
    full     20 s tokens, refresh_before 5 s, loop 120 s (6 lifetimes): about 2 min 15 s

Endpoint calls include each fleet's warm-up (every app's first pass over its
20 tokens, before the loop starts). The ideal is 20 tokens x the lifetimes
the run spanned, rounded up (from the first warm-up to the end: a little more
than the loop). tokencache replaces a token every lifetime - refresh_before,
so it makes about 4/3 of the ideal; google-auth about 8x the ideal, a bit
more for its short margin.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokencache.testing.barrier import StartBarrier
from tokencache.testing.workers import PoolProcess

from .common import BenchEnv, Result
from .fleet_child import GOOGLE_AUTH_FRACTION, SCOPES

APPS = 8
PACE = 0.01
"""Seconds between the starts of an app's calls, in both fleets: a schedule, so a late app catches up
and both fleets make the same number of calls. A fixed pace instead of a tight loop, because a
google-auth hit is a property check (microseconds) and a tokencache hit a Redis round trip: tight
loops would give the two fleets very different call counts, and 16 busy processes would starve the
worker pool of a 2-core machine. The endpoint counts do not depend on the pace as long as every app
comes back to each of its 20 tokens (every 0.2 s here) well inside both refresh margins
(google-auth's 0.75 s of a 12 s token is the narrowest)."""
SAMPLE = 50
"""One returned token in this many is also checked with the emulator's tokeninfo."""
PREFIX = "bench-fleet"
"""Name of the apps' start barrier (tokencache.testing.barrier) on the benchmark's private Redis."""
READY_WAIT = 90.0
POOL_WAIT = 30.0


@dataclass(frozen=True)
class Plan:
    """Token lifetime, tokencache's refresh margin, and how many lifetimes the apps' loop runs."""

    lifetime: int
    refresh_before: int
    lifetimes: int

    @property
    def duration(self) -> float:
        return float(self.lifetime * self.lifetimes)


QUICK = Plan(lifetime=12, refresh_before=3, lifetimes=3)
FULL = Plan(lifetime=20, refresh_before=5, lifetimes=6)


@dataclass
class Fleet:
    """The summed counts of one fleet's apps (see ``fleet_child.Counts``)."""

    mode: str
    reports: list[dict[str, Any]]

    def total(self, name: str) -> int:
        return int(sum(r[name] for r in self.reports))

    @property
    def warm_start(self) -> float:
        return float(min(r["warm_start"] for r in self.reports))

    @property
    def expired(self) -> int:
        return self.total("expired_by_clock") + self.total("rejected")

    def summary(self) -> dict[str, Any]:
        names = ("calls", "misses", "errors", "expired_by_clock", "sampled", "rejected", "wrong_scope")
        out: dict[str, Any] = {name: self.total(name) for name in (*names, "tokeninfo_errors")}
        out["slowest_call_ms"] = round(1000 * max(r["slowest_call"] for r in self.reports), 1)
        out["loop_s"] = round(statistics.mean(r["loop_end"] - r["loop_start"] for r in self.reports), 1)
        out["warm_up_s"] = round(max(r["loop_start"] for r in self.reports) - self.warm_start, 1)
        out["setting"] = self.reports[0]["setting"]
        out["first_error"] = next((r["first_error"] for r in self.reports if r["first_error"]), "")
        return out


def run(env: BenchEnv, quick: bool) -> list[Result]:
    plan = QUICK if quick else FULL
    progress(
        f"{APPS}+{APPS} apps, {len(SCOPES)} tokens, lifetime {plan.lifetime} s, tokencache refresh_before "
        f"{plan.refresh_before} s, google-auth threshold {GOOGLE_AUTH_FRACTION * plan.lifetime:.2f} s, "
        f"loop {plan.duration:.0f} s, one call / {PACE * 1000:.0f} ms"
    )
    peer_key = env.dir / "fleet-peer.json"
    peer = env.emulator.write_service_account(peer_key)["client_email"]
    own = json.loads(env.key_file.read_text())["client_email"]
    saved = env.emulator.config.lifetime
    env.emulator.config.lifetime = plan.lifetime
    try:
        env.emulator.reset_stats()
        with worker_pool(env, plan) as pool:
            fleets = run_fleets(env, plan, pool, peer_key)
            stats = env.emulator.stats()
            ended = time.time()
        progress("worker pool stopped")
    finally:
        env.emulator.config.lifetime = saved
    calls = {"tokencache": stats["by_account"].get(own, 0), "google-auth": stats["by_account"].get(peer, 0)}
    return results(plan, fleets, calls, stats, ended)


_started = time.monotonic()


def progress(message: str) -> None:
    print(f"fleet {time.monotonic() - _started:6.1f} s: {message}", file=sys.stderr, flush=True)


@contextmanager
def worker_pool(env: BenchEnv, plan: Plan) -> Iterator[PoolProcess]:
    """``tokencache worker -n 2`` with the key file, started but not waited for (the apps start meanwhile).

    The pool serves the children's defaults (their environment has no TOKENCACHE_NAMESPACE/QUEUE),
    not this process's. Stopped with SIGTERM to its group at the end: its workers finish their refresh.
    """
    child_env = env.child_env(credentials=True, TOKENCACHE_REFRESH_BEFORE=str(plan.refresh_before))
    pool = PoolProcess(env.url, 2, env=child_env, log_level="WARNING", log=env.dir / "fleet-pool.log")
    try:
        yield pool.start(wait=False)
    finally:
        pool.stop(20)


def app_commands(env: BenchEnv, plan: Plan, peer_key: Path) -> dict[tuple[str, int], list[str]]:
    common = ["--control", env.url, "--prefix", PREFIX, "--emulator", env.emulator.url]
    common += ["--pace", str(PACE), "--sample", str(SAMPLE)]
    child = [sys.executable, "-m", "bench.fleet_child"]
    commands = {}
    for i in range(APPS):
        commands["tokencache", i] = [*child, "tokencache", str(i), *common]
        commands["tokencache", i] += ["--refresh-before", str(plan.refresh_before)]
        commands["google-auth", i] = [*child, "google-auth", str(i), *common]
        commands["google-auth", i] += ["--lifetime", str(plan.lifetime), "--key-file", str(peer_key)]
    return commands


def run_fleets(env: BenchEnv, plan: Plan, pool: PoolProcess, peer_key: Path) -> dict[str, Fleet]:
    """Start both fleets (while the pool starts), release them together, collect what each app saw."""
    logs = env.dir / "fleet-logs"
    logs.mkdir(exist_ok=True)
    child_env = env.child_env(credentials=False, TOKENCACHE_REFRESH_BEFORE=str(plan.refresh_before))
    with apps(app_commands(env, plan, peer_key), child_env, logs) as procs, env.client() as control:
        pool.wait_ready(POOL_WAIT)  # the apps' first misses wait in the queue meanwhile
        progress("worker pool ready")
        barrier = StartBarrier(control, PREFIX, len(procs))
        barrier.wait_ready(READY_WAIT, check=lambda: check_apps(procs, logs))  # each warmed up
        progress(f"{len(procs)} apps warmed up: go")
        end = time.time() + plan.duration
        barrier.go(json.dumps({"end": end}))
        reports = collect(procs, logs, end)
        progress("apps done")
    return {
        mode: Fleet(mode, [r for r in reports if r["mode"] == mode]) for mode in ("tokencache", "google-auth")
    }


@contextmanager
def apps(
    commands: dict[tuple[str, int], list[str]], child_env: dict[str, str], logs: Path
) -> Iterator[dict[tuple[str, int], subprocess.Popen[str]]]:
    """Start every app (stderr to a log file each); kill and reap whatever is left at the end."""
    procs: dict[tuple[str, int], subprocess.Popen[str]] = {}
    try:
        for (mode, i), command in commands.items():
            with (logs / f"{mode}-{i}.log").open("w") as log:
                procs[mode, i] = subprocess.Popen(
                    command, env=child_env, stdout=subprocess.PIPE, stderr=log, text=True
                )
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in procs.values():
            with suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


def check_apps(procs: dict[tuple[str, int], subprocess.Popen[str]], logs: Path) -> None:
    """Raise when an app exited before its go signal, with the tail of its log."""
    for (mode, i), proc in procs.items():
        if proc.poll() is not None:
            raise RuntimeError(f"app {mode} {i} exited early: {tail(logs / f'{mode}-{i}.log')}")


def collect(
    procs: dict[tuple[str, int], subprocess.Popen[str]], logs: Path, end: float
) -> list[dict[str, Any]]:
    reports = []
    for (mode, i), proc in procs.items():
        out, _ = proc.communicate(timeout=max(0.0, end - time.time()) + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"app {mode} {i} failed ({proc.returncode}): {tail(logs / f'{mode}-{i}.log')}")
        reports.append(json.loads(out))
    return reports


def tail(path: Path, lines: int = 5) -> str:
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def results(
    plan: Plan, fleets: dict[str, Fleet], calls: dict[str, int], stats: dict[str, Any], ended: float
) -> list[Result]:
    tc, ga = fleets["tokencache"], fleets["google-auth"]
    span = ended - tc.warm_start
    ideal = len(SCOPES) * math.ceil(span / plan.lifetime)
    # One fetch per token at warm-up, then one per refresh period (the scheduler may be a second off).
    schedule = len(SCOPES) * (1 + math.ceil(span / (plan.lifetime - plan.refresh_before)))
    per_process = APPS * len(SCOPES) + ga.total("misses")
    extra = {
        "plan": {**plan.__dict__, "duration": plan.duration, "apps": APPS, "tokens": len(SCOPES)},
        "pace_s": PACE,
        "tokeninfo_sample": f"1 in {SAMPLE}",
        "span_s": round(span, 1),
        "endpoint": {**calls, "failed": stats["failed"], "requests": stats["token_requests"]},
        "tokencache": tc.summary(),
        "google-auth": ga.summary(),
    }
    where = (
        f"{APPS} apps each, {len(SCOPES)} tokens, {plan.lifetime} s tokens over {span:.0f} s "
        f"({span / plan.lifetime:.1f} lifetimes); tokencache refresh_before {plan.refresh_before} s "
        f"(TOKENCACHE_REFRESH_BEFORE, workers and apps); google-auth REFRESH_THRESHOLD "
        f"{GOOGLE_AUTH_FRACTION * plan.lifetime:.2f} s (6.25 %); "
        f"one call per app every {PACE * 1000:.0f} ms: "
        f"{tc.total('calls'):,} tokencache calls, {ga.total('calls'):,} google-auth calls"
    )
    return [
        Result(
            "fleet",
            "token endpoint calls (ratio tokencache / google-auth)",
            calls["tokencache"],
            "calls",
            baseline="google-auth",
            baseline_value=calls["google-auth"],
            target="ratio <= 0.25 (2/8)",
            met=calls["tokencache"] <= 0.25 * calls["google-auth"],
            limit=0.25 * calls["google-auth"],
            note=f"ratio = tokencache calls / google-auth calls, lower is better; {APPS} processes that each "
            f"refresh their own copy make about {APPS}x the calls of one shared copy. google-auth calls "
            f"= {APPS} x {len(SCOPES)} warm-up + {ga.total('misses')} in-loop refreshes "
            f"= {per_process}. {where}",
            extra=extra,
        ),
        Result(
            "fleet",
            "tokencache endpoint calls vs ideal (20 x lifetimes spanned)",
            calls["tokencache"],
            "calls",
            baseline="ideal",
            baseline_value=ideal,
            target=f"<= {schedule} (1 per token per {plan.lifetime - plan.refresh_before} s)",
            met=calls["tokencache"] <= schedule,
            limit=schedule,
            note=f"ideal = {len(SCOPES)} tokens x ceil({span:.0f} s / {plan.lifetime} s) = {ideal}: "
            f"the fewest tokens that cover the run. tokencache refreshes every lifetime - refresh_before = "
            f"{plan.lifetime - plan.refresh_before} s, so it makes about {plan.lifetime}/"
            f"{plan.lifetime - plan.refresh_before} of that.",
        ),
        Result(
            "fleet",
            "misses after warm-up (google-auth: calls that waited on a refresh)",
            tc.total("misses") + tc.total("errors"),
            "calls",
            baseline="google-auth",
            baseline_value=ga.total("misses"),
            target="0",
            met=tc.total("misses") == 0 and tc.total("errors") == 0,
            note=f"tokencache: find() returned None (then for_scope() waited) or an error, in "
            f"{tc.total('calls'):,} calls ({tc.total('errors')} errors). google-auth: every refresh "
            f"runs on the caller's path ({ga.total('errors')} errors).",
        ),
        Result(
            "fleet",
            "expired tokens seen",
            tc.expired,
            "tokens",
            baseline="google-auth",
            baseline_value=ga.expired,
            target="0 (tokencache)",
            met=tc.expired == 0 and tc.total("wrong_scope") == 0,
            note=f"a returned token whose own expiry had passed (every call), or that the emulator's "
            f"tokeninfo rejected (1 in {SAMPLE} sampled: tokencache {tc.total('sampled')}, google-auth "
            f"{ga.total('sampled')}). tokencache {tc.total('expired_by_clock')} by clock + "
            f"{tc.total('rejected')} by tokeninfo; google-auth {ga.total('expired_by_clock')} + "
            f"{ga.total('rejected')}; wrong scope: {tc.total('wrong_scope')} / {ga.total('wrong_scope')}.",
        ),
    ]
