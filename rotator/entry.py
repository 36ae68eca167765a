"""The `rotator` command's entry point: a SIGTERM before the daemon is up still exits 0, and a
SIGHUP then is a reload done once the daemon runs.

Importing the client libraries and loading the config take about a second. The daemon installs
its own handlers once it runs (SIGTERM then finishes the step in flight); before that, a stop
request (systemd, Kubernetes) has nothing to finish, and Python's default would end the process
by the signal (status -15). Python's default for SIGHUP ends the process too: a reload sent
while the daemon starts (a config management run right after a restart) must not stop it. This
module imports nothing heavy before the handlers are in place.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from types import FrameType


def _stopped_before_start(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)  # nothing has started yet: a clean stop


class EarlyHangup:
    """The SIGHUP handler until the daemon's own: it notes the request (``seen``). The daemon
    reads ``seen`` on the handler it replaces and reloads once it runs, since the config may
    have been read before the change the signal announces."""

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.seen = True


def _is_daemon(argv: Sequence[str]) -> bool:
    """`rotator run` without --once or --dry-run (a one-shot command keeps the default)."""
    return "run" in argv and not {"--once", "--dry-run"} & set(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if _is_daemon(args):
        signal.signal(signal.SIGTERM, _stopped_before_start)
        signal.signal(signal.SIGHUP, EarlyHangup())
    from rotator import cli  # the heavy imports, after the handler

    return cli.main(args)
