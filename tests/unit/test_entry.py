"""The `rotator` entry point: a SIGTERM while the daemon is still starting exits 0 (the daemon's
own handlers take over once it runs); one-shot commands keep Python's default."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rotator import entry

# The stop request arrives while the config loads, after the entry point's first line: the same
# moment every time, no race with the interpreter's start.
SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from rotator import config, entry
    load = config.load
    def load_then_stop(path):
        os.kill(os.getpid(), signal.SIGTERM)
        return load(path)
    config.load = load_then_stop
    raise SystemExit(entry.main(sys.argv[1:]))
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["run"], 0),
        (["run", "--once"], -signal.SIGTERM),
        (["status"], -signal.SIGTERM),
    ],
)
def test_a_sigterm_during_start_ends_the_daemon_cleanly_and_one_shot_commands_as_before(
    tmp_path: Path, args: list[str], code: int
) -> None:
    config_file = tmp_path / "rotator.yaml"
    config_file.write_text("not: a config\n")  # never read to the end: the stop comes first

    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args, "-c", str(config_file)],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr


def test_only_the_daemon_gets_the_early_handler() -> None:
    assert entry._is_daemon(["run", "-c", "f"])
    assert not entry._is_daemon(["run", "--once"])
    assert not entry._is_daemon(["run", "--dry-run"])
    assert not entry._is_daemon(["status"])
