"""``python -m tokencache`` is the ``tokencache`` command."""

from .cli import main

raise SystemExit(main())
