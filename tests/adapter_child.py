"""One app process using google-auth's AuthorizedSession with tokencache.Credentials; prints JSON.

    python -m tests.adapter_child REDIS_URL NAMESPACE QUEUE INDEX API_URL REQUESTS

Waits for its go at the start barrier (as tests/fleet_child.py does), then
makes REQUESTS calls to the test API and reports the status codes, how many
times the credentials read the cache (for_scope calls) and a hash of the token.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from typing import Any

import google.auth.exceptions
import requests
from google.auth.transport.requests import AuthorizedSession

from tokencache import Token, TokenStore
from tokencache.adapters.google_auth import Credentials
from tokencache.testing.barrier import arrive

SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def main() -> None:
    url, namespace, queue, index, api, requests_count = sys.argv[1:7]
    store = TokenStore.from_url(url, namespace=namespace, queue=queue)
    store.sources.has("default")  # read the environment before the clock starts
    reads = Counter[str]()
    for_scope = store.for_scope

    def counting(*args: Any, **kwargs: Any) -> Token:
        reads["for_scope"] += 1
        return for_scope(*args, **kwargs)

    store.for_scope = counting  # type: ignore[method-assign]
    credentials = Credentials([SCOPE], store=store)
    # A client of its own (the URL): a blocking pop outlasts the store's 5 s socket timeout.
    arrive(url, f"{namespace}:test", index, timeout=60)
    result: dict[str, Any] = {"index": int(index)}
    statuses = Counter[int]()
    try:
        with AuthorizedSession(credentials) as session:
            for _ in range(int(requests_count)):
                statuses[session.get(api, timeout=10).status_code] += 1
        result["token"] = hashlib.sha256(str(credentials.token).encode()).hexdigest()
    except (google.auth.exceptions.GoogleAuthError, requests.RequestException) as e:
        result["error"] = f"{type(e).__name__}: {e}"
    result["statuses"] = {str(code): n for code, n in statuses.items()}
    result["reads"] = reads["for_scope"]
    store.redis.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
