"""`python -m routereplay`, the same as the `routereplay` command."""

from routereplay.cli import main

raise SystemExit(main())
