"""``python -m tokencache`` is the ``tokencache`` command."""

from tokencache.cli.main import main

raise SystemExit(main())
