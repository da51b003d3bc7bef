"""Tools for tests: a local Google token endpoint, a private redis-server, a worker-pool launcher.

Public and supported, so that applications can test against a real token flow
(see docs/testing.md); the library itself never imports this package.
"""
