"""Settings for plain ``rq worker``: the same refresh workers as ``tokencache worker``.

    rq worker -c workers.settings --with-scheduler \\
        --serializer rq.serializers.JSONSerializer

Plain ``rq worker`` does not run tokencache's repair pass; run
``python -m workers.repair`` beside it (any number of copies: one pass a
second runs fleet-wide).
"""

from tokencache import env

REDIS_URL = env.redis_url()
QUEUES = [env.queue_name()]
