"""An endpoint outage longer than the tokens' lives: how long after the endpoint is back are they back?

    .venv/bin/python -m bench.outage [--cap 30] [--tokens 6] [--runs 2] [--after-expiry S]

Each run stores ``--tokens`` tokens of 12 s life (their refreshes due 2 s later, staggered by
0.7 s so their backoff schedules differ), makes the emulator fail every token request, waits
until they expired and ``--after-expiry`` seconds more (default ``2 * cap + 10``: long enough
for every backoff to sit at the cap), then lets the endpoint answer and times, per token, from
that instant until ``find()`` returns a valid token again. Nobody calls ``for_scope``: a fleet
that only reads. The bound is one cap (``TOKENCACHE_BACKOFF_CAP``) plus scheduler slack.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from tokencache import Token, TokenStore
from tokencache.testing.workers import PoolProcess

from .common import BenchEnv, bench_env

LIFE = 12
STAGGER = 0.7


def one_run(env: BenchEnv, cap: int, tokens: int, after_expiry: float) -> list[float]:
    """Seconds from the endpoint's return to each token's return."""
    env.flush()
    env.emulator.config.fail_next = 10**9
    store = TokenStore(env.client(), namespace="bench-outage", refresh_before=10, queue="bench-outage")
    child = env.child_env(credentials=True, TOKENCACHE_BACKOFF_CAP=str(cap))
    with PoolProcess.for_store(store, env.url, 1, env=child):
        scopes = [f"bench-outage-{i}" for i in range(tokens)]
        for scope in scopes:
            store.store(Token(token="ya29.bench-outage", scope=scope, expires=int(time.time()) + LIFE))
            time.sleep(STAGGER)  # spreads the tokens' backoff schedules (a parameter, not a wait)
        time.sleep(LIFE + after_expiry)  # the outage (a parameter, not a wait)
        assert all(store.find(scope) is None for scope in scopes), "a token survived the outage"
        env.emulator.config.fail_next = 0
        back: dict[str, float] = {}
        recovered = time.monotonic()
        while len(back) < len(scopes) and time.monotonic() - recovered < cap + 30:
            for scope in scopes:
                if scope not in back and store.find(scope) is not None:
                    back[scope] = time.monotonic() - recovered
            time.sleep(0.02)
    store.close()
    missing = set(scopes) - set(back)
    assert not missing, f"never came back: {missing}"
    return sorted(back.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=6)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--after-expiry", type=float, default=None)
    args = parser.parse_args()
    after = args.after_expiry if args.after_expiry is not None else 2 * args.cap + 10
    samples: list[float] = []
    with bench_env() as env:
        for run in range(args.runs):
            times = one_run(env, args.cap, args.tokens, after)
            samples += times
            print(json.dumps({"run": run, "cap": args.cap, "seconds": [round(t, 2) for t in times]}))
    print(
        json.dumps(
            {
                "cap": args.cap,
                "samples": len(samples),
                "median": round(statistics.median(samples), 2),
                "worst": round(max(samples), 2),
                "bound": f"cap + 2 = {args.cap + 2}",
            }
        )
    )


if __name__ == "__main__":
    main()
