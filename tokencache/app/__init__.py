"""The app side: the synchronous TokenStore, its fleet-wide fetch, near cache and default store.

:mod:`tokencache.app.core` holds the decisions the sync store and its asyncio
twin (:mod:`tokencache.aio`) share, without I/O; the modules beside it do the
synchronous I/O. See docs/design.md for the layers.
"""
