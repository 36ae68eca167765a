"""README's first command: `make demo` (scripts/demo.py) starts both servers and rotator, rotates,
and on Ctrl-C stops rotator, then both servers. Run on free ports in a temporary folder."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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


def demo_env(tmp_path: Path, ports: str) -> dict[str, str]:
    """The demo's environment: no AWS_ or VAULT_ variable of the caller's, its folder and ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VAULT_"))}
    env.update(ROTATOR_DEMO_DIR=str(tmp_path / "demo"), ROTATOR_DEMO_PORTS=ports)
    return env


def run_demo(tmp_path: Path, ports: str) -> subprocess.CompletedProcess[str]:
    """The demo run to its end (the ports tests: it must stop before starting anything)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        cwd=ROOT,
        env=demo_env(tmp_path, ports),
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.timeout(180)
def test_the_demo_rotates_a_key_and_ctrl_c_stops_rotator_and_both_servers(
    tmp_path: Path,
) -> None:
    ports = (servers.free_port(), servers.free_port(consecutive=2), servers.free_port())
    checkout_copy = ROOT / ".demo" / "demo.yaml"  # an earlier demo on other ports may have it
    before = checkout_copy.stat().st_mtime_ns if checkout_copy.exists() else None
    demo = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        cwd=ROOT,
        env=demo_env(tmp_path, ",".join(map(str, ports))),
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
    after = checkout_copy.stat().st_mtime_ns if checkout_copy.exists() else None
    assert after == before  # nothing written into the checkout
    assert (tmp_path / "demo" / "demo.yaml").exists()  # but into ROTATOR_DEMO_DIR


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port something else listens on, as an earlier demo's server would."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", ["iam", "vault", "vault cluster", "metrics"])
def test_a_demo_whose_port_is_taken_stops_before_starting_or_writing_anything(
    tmp_path: Path, held_port: int, which: str
) -> None:
    iam, vault, metrics = servers.free_port(), servers.free_port(consecutive=2), servers.free_port()
    ports = {
        "iam": (held_port, vault, metrics),
        "vault": (iam, held_port, metrics),
        "vault cluster": (iam, held_port - 1, metrics),
        "metrics": (iam, vault, held_port),
    }[which]
    done = run_demo(tmp_path, ",".join(map(str, ports)))

    assert done.returncode == 1, done.stdout + done.stderr
    taken = re.search(r"port ([\d, ]+) of 127\.0\.0\.1 is taken", done.stderr)
    assert taken and str(held_port) in taken.group(1).split(", "), done.stderr
    assert "ROTATOR_DEMO_PORTS=IAM,VAULT,METRICS" in done.stderr
    assert "Traceback" not in done.stderr
    assert " pid " not in done.stdout  # no server was started
    assert not (tmp_path / "demo").exists()  # no key, token or config written


@pytest.mark.timeout(30)
def test_a_server_on_a_taken_port_refuses_to_start_instead_of_taking_the_other_for_itself(
    tmp_path: Path, held_port: int
) -> None:
    moto = servers.MotoServer(log_path=tmp_path / "moto.log")
    bao = servers.OpenBaoServer(tmp_path / "bao")

    taken = rf"port ([\d, ]+, )?{held_port}(, [\d, ]+)? of 127\.0\.0\.1 is taken"
    with pytest.raises(RuntimeError, match=taken):
        moto.start(port=held_port)
    with pytest.raises(RuntimeError, match=taken):
        bao.start(port=held_port - 1)  # its cluster port (PORT+1) is the held one

    assert moto.pid is None and bao.pid is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "ports",
    ["20001,65535,20003", "20011,-5,20013", "20051,20052,20053", "20061,20061,20063", "1,2"],
)
def test_demo_ports_that_cannot_work_are_refused_in_one_line(tmp_path: Path, ports: str) -> None:
    done = run_demo(tmp_path, ports)

    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith(f"demo: ROTATOR_DEMO_PORTS={ports!r}"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()
