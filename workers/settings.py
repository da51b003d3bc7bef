"""Settings for plain ``rq worker`` from a checkout: ``rq worker -c workers.settings`` (a stable path).

The settings themselves are :mod:`tokencache.worker.settings`, which the wheel
ships (``-c tokencache.worker.settings`` works wherever tokencache is installed).
"""

from tokencache.worker.settings import QUEUES, REDIS_URL, SENTINEL

__all__ = ["QUEUES", "REDIS_URL", "SENTINEL"]
