"""README's first command: `make demo` (scripts/demo.py) starts both servers and rotator, rotates,
and on Ctrl-C stops rotator, then both servers. Run on free ports in a temporary folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import servers

ROOT = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(180)
def test_the_demo_rotates_a_key_and_ctrl_c_stops_rotator_and_both_servers(
    tmp_path: Path,
) -> None:
    ports = (servers.free_port(), servers.free_port(consecutive=2), servers.free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VAULT_"))}
    env.update(
        ROTATOR_DEMO_DIR=str(tmp_path / "demo"), ROTATOR_DEMO_PORTS=",".join(map(str, ports))
    )
    demo = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert demo.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    try:
        for raw in demo.stdout:  # ends when the demo exits
            lines.append(raw.decode(errors="replace"))
            if '"event": "key_published"' in lines[-1] or time.monotonic() > deadline:
                break
        published = any('"event": "key_published"' in line for line in lines)
        demo.send_signal(signal.SIGINT)  # what Ctrl-C sends
        rest, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
    output = "".join(lines) + rest.decode(errors="replace")

    assert published, output[-3000:]
    assert demo.returncode == 0, output[-3000:]
    assert "demo: rotator exited with 0; servers stopped" in output
    pids = [int(line.split("pid")[1]) for line in output.splitlines() if " pid " in line]
    assert len(pids) == 2 and not any(alive(pid) for pid in pids), pids  # both servers gone
    assert f"127.0.0.1:{ports[0]}" in output and f"127.0.0.1:{ports[1]}" in output
    assert "Traceback" not in output
    assert (tmp_path / "demo" / "vault-token").stat().st_mode & 0o077 == 0  # mode 0600
    assert not (ROOT / ".demo" / "demo.yaml").exists()  # nothing written into the checkout
