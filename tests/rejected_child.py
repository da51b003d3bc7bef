"""One app process calling the test API until told to stop; prints what each call got, as JSON.

    python -m tests.rejected_child REDIS_URL NAMESPACE QUEUE INDEX API_URL google|bearer

``google``: google-auth's ``AuthorizedSession`` over ``tokencache.Credentials``, the way
google-cloud clients use credentials (it refreshes and retries on a 401). ``bearer``: a
``requests`` session with ``tokencache.BearerAuth``. The process holds no credentials. It waits
for its go at the start barrier (as tests/fleet_child.py does), then calls the API every
:data:`PACE` seconds until ``{NAMESPACE}:test:stop`` exists, and reports each call as
``[ended_at, status or "error", seconds]`` with the first error message of each kind.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import google.auth.exceptions
import requests
from google.auth.transport.requests import AuthorizedSession
from redis import Redis

from tokencache import BearerAuth, Credentials, TokenCacheError, TokenStore
from tokencache.testing.barrier import arrive

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
PACE = 0.02
"""Seconds between calls: about 50 a second per process, enough to see every 401, light on two cores."""
STOP_CHECK = 0.1
"""Seconds between looks at the stop key."""


def session(mode: str, store: TokenStore) -> requests.Session:
    if mode == "google":
        return AuthorizedSession(Credentials([SCOPE], store=store))
    plain = requests.Session()
    plain.auth = BearerAuth(SCOPE, store=store)
    return plain


def call(http: requests.Session, api: str, errors: dict[str, str]) -> int | str:
    try:
        return http.get(api, timeout=10).status_code
    except (google.auth.exceptions.GoogleAuthError, TokenCacheError, requests.RequestException) as e:
        errors.setdefault(type(e).__name__, str(e))
        return "error"


def main() -> None:
    url, namespace, queue, index, api, mode = sys.argv[1:7]
    store = TokenStore.from_url(url, namespace=namespace, queue=queue)
    store.sources.has("default")  # read the environment before the clock starts
    control = Redis.from_url(url)
    http = session(mode, store)
    http.headers["X-Child"] = index  # so that the API can tell who it answered
    arrive(url, f"{namespace}:test", index, timeout=60)
    calls: list[list[Any]] = []
    errors: dict[str, str] = {}
    next_check = 0.0
    while True:
        if time.monotonic() >= next_check:
            if control.exists(f"{namespace}:test:stop"):
                break
            next_check = time.monotonic() + STOP_CHECK
        started = time.time()
        status = call(http, api, errors)
        calls.append([time.time(), status, time.time() - started])
        time.sleep(PACE)
    http.close()
    store.close()
    control.close()
    print(json.dumps({"index": int(index), "mode": mode, "calls": calls, "errors": errors}), flush=True)


if __name__ == "__main__":
    main()
