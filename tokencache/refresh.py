"""Stable path: ``tokencache.refresh.refresh`` is the function every refresh job in Redis names.

RQ stores the function's dotted name in each job hash, so running fleets hold
jobs that name this module: it must never move. The job's code lives in
:mod:`tokencache.worker.refresh`.
"""

from tokencache.worker.refresh import refresh

__all__ = ["refresh"]
