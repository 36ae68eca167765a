"""The daemon speaks systemd's notify protocol over a real unix datagram socket."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import servers
from tests.support.harness import daemon_env, start_daemon, started, write_config

__all__ = ["daemon_env", "started"]


def receive_until(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    """Datagrams received until one carries the field ``wanted`` (or the deadline)."""
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        messages.append(message)
        if wanted in message.split("\n"):
            return messages
    raise AssertionError(f"no {wanted} within {timeout}s; got {messages}")


@pytest.mark.timeout(90)
def test_ready_watchdog_reloading_and_stopping_reach_the_notify_socket(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    vault: Any,
    daemon_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> None:
    cfg = write_config(tmp_path, iam_admin, vault, servers.free_port(), max_age="1h")
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        env = {**daemon_env, "NOTIFY_SOCKET": address}
        process = start_daemon(cfg, env, started)
        ready = receive_until(sock, "READY=1", 30)
        assert any(m.startswith("READY=1") and "STATUS=1 targets" in m for m in ready)
        receive_until(sock, "WATCHDOG=1", 15)

        process.send_signal(signal.SIGHUP)
        reload_messages = receive_until(sock, "RELOADING=1", 15)
        reloading = next(m for m in reload_messages if "RELOADING=1" in m.split("\n"))
        assert any(f.startswith("MONOTONIC_USEC=") for f in reloading.split("\n"))
        after = receive_until(sock, "READY=1", 15)
        assert any("config reloaded" in m for m in after)

        process.send_signal(signal.SIGTERM)
        receive_until(sock, "STOPPING=1", 15)
        assert process.wait(timeout=30) == 0


@pytest.mark.timeout(90)
def test_the_watchdog_keeps_beating_while_every_worker_is_busy(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    iam_proxy: Any,
    vault: Any,
    daemon_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> None:
    # The only worker spends its pass verifying a key IAM refuses for a minute.
    cfg = write_config(
        tmp_path,
        iam_admin,
        vault,
        servers.free_port(),
        endpoint=iam_proxy.endpoint,
        workers=1,
        max_age="5m",
        verify_timeout="90s",
    )
    iam_proxy.reject_young_keys(60)
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        process = start_daemon(cfg, {**daemon_env, "NOTIFY_SOCKET": address}, started)
        receive_until(sock, "READY=1", 30)
        deadline = time.monotonic() + 30
        while iam_proxy.count(action="GetUser", status=403) < 1:  # verification has begun
            assert time.monotonic() < deadline, "no verification attempt seen"
            time.sleep(0.1)
        receive_until(sock, "WATCHDOG=1", 15)
        receive_until(sock, "WATCHDOG=1", 15)  # a second beat, the worker still verifying
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
