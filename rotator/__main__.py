"""`python -m rotator` is the same as the `rotator` command."""

from rotator import cli

raise SystemExit(cli.main())
