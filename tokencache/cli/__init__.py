"""The ``tokencache`` command line (``tokencache.cli:main`` is the console script)."""

from tokencache.cli.commands import main

__all__ = ["main"]
