"""``python -m mmserver`` runs the CLI."""

from .cli import main

raise SystemExit(main())
