"""Settings for plain ``rq worker``: the same refresh workers as ``tokencache worker``.

    rq worker -c tokencache.worker.settings --with-scheduler \\
        --serializer rq.serializers.JSONSerializer \\
        --job-class tokencache.scheduling.RefreshJob

(``-c workers.settings`` from a checkout of the repository is the same module.)
``--job-class`` is optional: with it, a job rescheduled after its run sheds
RQ's record of that run (docs/performance.md has the bytes per token).

Plain ``rq worker`` does not run tokencache's repair pass; run
``python -m tokencache.worker.repairloop`` beside it (any number of copies: one
pass a second runs fleet-wide).
"""

from tokencache import env

REDIS_URL = env.redis_url()
QUEUES = [env.queue_name()]
