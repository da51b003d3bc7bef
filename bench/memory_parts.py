"""What each part of a cached token costs in Redis: ``used_memory`` per token with one part changed.

    .venv/bin/python -m bench.memory_parts [--tokens 100000]

Writes N tokens' keys the way ``store()`` lays them out (token hash with its
``EXPIREAT``, index entry, RQ job hash, schedule entry; 185-character access
token, one ``sub`` per token), but by hand, so that one part at a time can be
left out or written differently: what ``used_memory`` then loses is what that
part costs, key names, hash-table entries and allocator rounding included
(``MEMORY USAGE`` leaves some of that out). The variants are the ideas
docs/performance.md weighs. Redis's default configuration; a private server.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from redis import Redis

from tokencache.testing.redisserver import EmbeddedRedis

from .common import ACCESS_TOKEN, SCOPE
from .memory import growth

ESCAPED_SCOPE = "https%3A//www.googleapis.com/auth/cloud-platform"
JOB_ID_LENGTH = 54
"""Characters after ``tc-`` of the job id of ``(default, cloud-platform, userN@example.com)``."""

VARIANTS: dict[str, dict[str, Any]] = {
    "as stored": {},
    "token hash + TTL only": {"index": False, "schedule": False, "job": False},
    "bare 6-field hash + TTL": {"refresh_at": False, "index": False, "schedule": False, "job": False},
    "without the index entry": {"index": False},
    "without the schedule entry": {"schedule": False},
    "without the RQ job hash": {"job": False},
    "job with created_at + description (before)": {"lean_job": False},
    "without refresh_at": {"refresh_at": False},
    "index member abbreviated": {"member": "abbreviated"},
    "job id of 38 characters": {"job_id_length": 38},
    "no refresh_at, index member abbreviated": {"refresh_at": False, "member": "abbreviated"},
}


def write(client: Redis, n: int, *, refresh_at: bool = True, index: bool = True, schedule: bool = True,
          job: bool = True, lean_job: bool = True, member: str = "key",
          job_id_length: int = JOB_ID_LENGTH) -> None:  # fmt: skip
    expires = int(time.time()) + 3600
    for start in range(0, n, 1000):
        with client.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + 1000)):
                sub = f"user{i}@example.com"
                key = f"tokencache:token:default:{ESCAPED_SCOPE}:{sub}"
                fields = {"token": ACCESS_TOKEN, "type": "Bearer", "scope": SCOPE, "sub": sub, "account": "",
                          "expires": str(expires)}  # fmt: skip
                if refresh_at:
                    fields["refresh_at"] = str(expires - 10)
                pipe.hset(key, mapping=fields)
                pipe.expireat(key, expires)
                if index:
                    name = key if member == "key" else f"%D:%Gcloud-platform:{sub}"
                    pipe.zadd("tokencache:index", {name: expires})
                job_id = ("tc-" + f"{i:012d}" + "A" * 100)[: job_id_length + 3]
                if job:
                    pipe.hset(f"rq:job:{job_id}", mapping=job_fields(lean_job))
                if schedule:
                    pipe.zadd("rq:scheduled:tokencache", {job_id: expires - 10})
            pipe.execute()


def job_fields(lean: bool) -> dict[str, str]:
    """A refresh job's RQ hash as stored (values of the lengths RQ writes: ``data`` is 47 bytes)."""
    fields = {"status": "scheduled", "data": "x" * 47, "origin": "tokencache", "timeout": "60",
              "result_ttl": "0", "failure_ttl": "86400"}  # fmt: skip
    if not lean:
        fields |= {"created_at": "2026-12-01T01:56:26.255074Z", "description": "tokencache refresh"}
    return fields


def per_token(client: Redis, n: int, options: dict[str, Any]) -> float:
    return growth(client, lambda: write(client, n, **options)) / n  # on the private server started below


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory_parts", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tokens", type=int, default=100_000)
    n = parser.parse_args().tokens
    with EmbeddedRedis() as server:
        client = server.client()
        base = None
        for name, options in VARIANTS.items():
            value = per_token(client, n, options)
            base = value if base is None else base
            print(f"{name:45s} {value:8.1f} B per token  {value - base:+7.1f}")


if __name__ == "__main__":
    main()
