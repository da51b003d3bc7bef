"""What every tokencache process shares: Redis connections, the token hash, locks, the refresh queue.

Nothing here knows about a store, a worker or a command line; the app side
(:mod:`tokencache.app`, :mod:`tokencache.aio`) and the worker side
(:mod:`tokencache.worker`) are both built on it. See docs/design.md for the layers.
"""
