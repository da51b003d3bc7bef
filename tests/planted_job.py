"""A function a hostile ``rq:job:*`` hash names (tests/test_isolation.py): it must never be imported or run.

Importing this module leaves ``$PLANTED_MARKER.imported`` and calling :func:`mark` leaves
``$PLANTED_MARKER``, so a test sees whether a worker went as far as importing the name a planted
job gave it, or further.
"""

from __future__ import annotations

import os
from pathlib import Path

MARKER = "PLANTED_MARKER"
"""The environment variable naming the marker file (set in the worker pool's environment)."""

if os.environ.get(MARKER):
    Path(os.environ[MARKER] + ".imported").touch()


def mark(*args: object, **kwargs: object) -> str:
    """Leave the marker file: what a planted job (or a planted callback) would do in its place."""
    Path(os.environ[MARKER]).write_text("ran")
    return "ran"
