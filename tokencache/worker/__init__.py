"""The worker side: the refresh job, batched refreshes, repair, and the ``tokencache worker`` pool.

App processes never import this package; RQ imports it when it runs a refresh
job (through the stable path :mod:`tokencache.refresh`). See docs/design.md for the layers.
"""
