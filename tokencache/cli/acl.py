"""The ``ACL SETUSER`` lines of each role (docs/security.md), for any namespace and queue.

docs/security.md prints them for the default namespace; ``tokencache acl`` prints them for the
environment's (``TOKENCACHE_NAMESPACE``, ``TOKENCACHE_QUEUE``), and tests/test_acl.py checks that the
page's lines are exactly what this module writes for the default, so the page, the command and the tested
users never drift apart.

A namespace's refresh jobs are ``rq:job:tc-<base64url>``: the key pattern that matches exactly its
jobs comes from :func:`tokencache.keys.job_id_pattern`, so no role of one namespace can write or read
another namespace's jobs.
"""

from __future__ import annotations

import re

from tokencache.keys import Keys

__all__ = ["REKEY_SELECTOR", "ROLES", "role_lines"]

ROLES = ("tokencache-app", "tokencache-app-noinvalidate", "tokencache-worker", "tokencache-operator")
"""The Redis user of each role, in the page's order."""

PASSWORDS = {role: role.split("-")[1] + "-password" for role in ROLES}
"""The page's placeholder passwords (``app-password``...): set your own."""

REKEY_SELECTOR = "(+evalsha +script|load +script|exists +hget +hset ~{ns}:token:*)"
"""The operator's selector for ``tokencache rekey`` (key rotation, which rewrites the ``token`` field)."""

_QUEUE = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
_ENQUEUE = (
    "(+hset +hdel +persist %W~{job}) (+rpush +lrem %W~rq:queue:{q}) (+sadd %W~rq:queues) "
    "(+zrem %W~rq:scheduled:{q})"
)
"""What RQ's enqueue of one refresh job writes, for an app that asks the workers for a token."""

_TEMPLATES = {
    "tokencache-app": (
        "+hello +multi +exec +discard +hgetall +hget +hexists +get %R~{ns}:token:* %R~{ns}:error:* "
        "+subscribe &{ns}:fetched:* (+set %W~{ns}:want:* %W~{ns}:invalidated:*) "
        "(+zadd %W~{ns}:index) (+hset %W~{ns}:token:*) "
        "(+evalsha +script|load ~{ns}:token:* ~{ns}:index ~{ns}:invalidated:* ~{ns}:audit) "
        "(+xadd %W~{ns}:audit) {enqueue}"
    ),
    "tokencache-app-noinvalidate": (
        "+hello +multi +exec +discard +hgetall +get %R~{ns}:token:* %R~{ns}:error:* "
        "+subscribe &{ns}:fetched:* (+set %W~{ns}:want:*) (+zadd %W~{ns}:index) {enqueue}"
    ),
    "tokencache-worker": (
        "~{ns}:* ~rq:* &{ns}:fetched:* &rq:pubsub:* +ping +hello +info +client|setname +client|info +multi "
        "+exec +discard +watch +unwatch +evalsha +script|load +script|exists +subscribe +unsubscribe "
        "+publish +get +set +del +exists +expire +expireat +pexpire +persist +pttl +hget +hgetall +hmget "
        "+hvals +hexists +hset +hdel +hincrby +hincrbyfloat +llen +lrange +lpush +rpush +lrem +lmove +blmove "
        "+smembers +sadd +srem +zadd +zrem +zscore +zrange +zrangebyscore +zremrangebyscore +xadd"
    ),
    "tokencache-operator": (
        "+hello +info +get +exists +hget +hgetall +hmget +llen +smembers +zcard +zscore +zrange +zscan "
        "+zrangebyscore +xrevrange +xread +xinfo|stream %R~{ns}:* %R~{job} %R~rq:queue:{q} "
        "%R~rq:scheduled:{q} %R~rq:failed:{q} %R~rq:workers:{q} %R~rq:worker:* %R~rq:scheduler-lock:{q} "
        "%R~rq:scheduler:* (+hdel %W~{ns}:pools) " + REKEY_SELECTOR
    ),
}


def role_lines(namespace: str, queue: str | None = None) -> list[str]:
    """One ``ACL SETUSER`` line per role for ``namespace``'s keys and the refresh queue ``queue`` (the
    namespace by default, as ``TOKENCACHE_QUEUE``), with the page's placeholder passwords."""
    keys = Keys(namespace)  # validates the name: no glob character can reach a pattern
    queue = namespace if queue is None else queue
    if not isinstance(queue, str) or not _QUEUE.fullmatch(queue):
        raise ValueError(
            f"queue must be letters, digits and _ . : - (what an ACL pattern names as is), not {queue!r}"
        )
    fields = {"ns": keys.namespace, "q": queue, "job": keys.job_key_pattern}
    fields["enqueue"] = _ENQUEUE.format(**fields)
    return [
        f"ACL SETUSER {role} reset on >{PASSWORDS[role]} {_TEMPLATES[role].format(**fields)}"
        for role in ROLES
    ]
