"""One app process of a simulated fleet: waits for the go signal, calls for_scope once, prints JSON.

    python -m tests.fleet_child REDIS_URL NAMESPACE QUEUE INDEX TIMEOUT [sync|async]

Used by the stampede tests. The processes start together through
``tokencache.testing.barrier`` (barrier ``{NAMESPACE}:test``, member INDEX),
so the parent releases them all with one pipelined write instead of a sleep.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time

from tokencache import Token, TokenCacheError, TokenStore, aio
from tokencache.testing.barrier import arrive

SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def main() -> None:
    url, namespace, queue, index, timeout = sys.argv[1:6]
    mode = sys.argv[6] if len(sys.argv) > 6 else "sync"
    store = TokenStore.from_url(url, namespace=namespace, queue=queue)
    store.sources.has("default")  # read the environment before the clock starts
    # A client of its own (the URL): a blocking pop outlasts the store's 5 s socket timeout.
    arrive(url, f"{namespace}:test", index, timeout=60)
    started = time.time()
    result: dict[str, object] = {"index": int(index), "started": started, "mode": mode}
    try:
        if mode == "async":
            token = asyncio.run(async_for_scope(url, namespace, queue, float(timeout)))
        else:
            token = store.for_scope(SCOPE, timeout=float(timeout))
        result["token"] = hashlib.sha256(token.token.encode()).hexdigest()
    except TokenCacheError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    result["ended"] = time.time()
    print(json.dumps(result), flush=True)


async def async_for_scope(url: str, namespace: str, queue: str, timeout: float) -> Token:
    store = aio.TokenStore.from_url(url, namespace=namespace, queue=queue)
    try:
        return await store.for_scope(SCOPE, timeout=timeout)
    finally:
        await store.aclose()


if __name__ == "__main__":
    main()
