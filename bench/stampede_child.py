"""One app process of bench/stampede.py: meets the others at the start barrier, calls for_scope once.

    python -m bench.stampede_child REDIS_URL NAMESPACE QUEUE MEMBER TIMEOUT

Prints JSON: when the call started and ended, and a hash of the token (never the token) or
the error. The barrier is ``{NAMESPACE}:stampede`` (tokencache.testing.barrier). bench/ imports
nothing from tests/, so this is the benchmark's own twin of tests/fleet_child.py.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

from tokencache import TokenCacheError, TokenStore
from tokencache.testing.barrier import arrive

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GO_WAIT = 120.0
"""Seconds a ready app waits for the go before it gives up."""


def main() -> None:
    url, namespace, queue, member, timeout = sys.argv[1:6]
    store = TokenStore.from_url(url, namespace=namespace, queue=queue)
    store.sources.has("default")  # read the environment before the clock starts
    arrive(url, f"{namespace}:stampede", member, timeout=GO_WAIT)
    result: dict[str, object] = {"member": member, "started": time.time()}
    try:
        token = store.for_scope(SCOPE, timeout=float(timeout))
        result["token"] = hashlib.sha256(token.token.encode()).hexdigest()
    except TokenCacheError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    result["ended"] = time.time()
    store.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
