"""The other process of the near-cache benchmark: stores or deletes a token on request, says when done.

python -m bench.near_writer URL NAMESPACE SCOPE   (reads "store TAG" / "delete -" lines on stdin)
"""

from __future__ import annotations

import json
import sys
import time

from tokencache import Token, TokenStore


def main() -> None:
    url, namespace, scope = sys.argv[1:4]
    store = TokenStore.from_url(url, namespace=namespace)
    for line in sys.stdin:
        op, tag = line.split()
        if op == "store":
            store.store(Token(token=f"ya29.bench-{tag}", scope=scope, expires=int(time.time()) + 3600))
        else:
            store.delete(scope)
        print(json.dumps({"done": time.time()}), flush=True)


if __name__ == "__main__":
    main()
