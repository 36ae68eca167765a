"""`python -m rotator` is the same as the `rotator` command."""

from rotator.entry import main

raise SystemExit(main())
