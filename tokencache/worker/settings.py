"""Settings for plain ``rq worker``: the same refresh workers as ``tokencache worker``.

    rq worker -c tokencache.worker.settings --with-scheduler \\
        --serializer rq.serializers.JSONSerializer \\
        --job-class tokencache.scheduling.RefreshJob

(``-c workers.settings`` from a checkout of the repository is the same module.)
The queue is ``TOKENCACHE_QUEUE``, else the namespace (``TOKENCACHE_NAMESPACE``):
the workers serve one namespace and refuse the jobs of any other.
Give ``--job-class``: with it the workers run nothing but the refresh (a job
naming any other function is refused), and a job rescheduled after its run
sheds RQ's record of that run (docs/performance.md has the bytes per token).
Without it the refresh function refuses to run (a ConfigurationError naming
the option, in the failed registry and ``tokencache status``).

A ``redis+sentinel://`` URL in ``TOKENCACHE_REDIS_URL`` becomes RQ's own
``SENTINEL`` setting (``REDIS_URL`` is then None, which is how RQ picks it),
with tokencache's connection class: the workers' commands, the refreshes and
RQ's scheduler follow the master across a failover (docs/operations.md#sentinel).

Plain ``rq worker`` does not run tokencache's repair pass; run
``python -m tokencache.worker.repairloop`` beside it (any number of copies: one
pass a second runs fleet-wide).
"""

from typing import Any

from tokencache import env
from tokencache.core.connection import parse_sentinel_url

_url = env.redis_url()
_sentinel = parse_sentinel_url(_url)

REDIS_URL: str | None = _url if _sentinel is None else None
SENTINEL: dict[str, Any] | None = None if _sentinel is None else _sentinel.rq_settings()
QUEUES = [env.queue_name()]
