"""``python -m tokencache`` is the ``tokencache`` command."""

from tokencache.cli.commands import main

raise SystemExit(main())
