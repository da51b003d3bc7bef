"""Stable path: ``tokencache.scheduling.RefreshJob`` is the documented ``rq worker --job-class``.

Deployments name it in their worker command lines, so it must never move. The
refresh queue's code lives in :mod:`tokencache.core.queue`.
"""

from tokencache.core.queue import RefreshJob

__all__ = ["RefreshJob"]
