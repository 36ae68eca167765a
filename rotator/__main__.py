"""`python -m rotator` is the same as the `rotator` command."""

from rotator.cli import main

raise SystemExit(main())
