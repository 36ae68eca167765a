"""The sd_notify client over a real unix datagram socket, as systemd would receive it."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rotator import systemd


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket bound in tmp_path, standing in for systemd's notify socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(2.0)
    try:
        yield sock
    finally:
        sock.close()


def _fields(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def _nothing_waiting(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(2.0)
    return False


def test_ready_watchdog_stopping_arrive_in_order_as_single_datagrams(
    manager: socket.socket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    notifier = systemd.Notifier.from_env()
    try:
        assert notifier.enabled
        assert notifier.ready(status="2 targets, Vault ok")
        assert notifier.watchdog()
        assert notifier.stopping()
    finally:
        notifier.close()
    assert _fields(manager) == ["READY=1", "STATUS=2 targets, Vault ok"]
    assert _fields(manager) == ["WATCHDOG=1"]
    assert _fields(manager) == ["STOPPING=1"]
    assert _nothing_waiting(manager)


def test_reloading_carries_the_monotonic_clock_in_microseconds(
    manager: socket.socket, tmp_path: Path
) -> None:
    notifier = systemd.Notifier(str(tmp_path / "notify"))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    try:
        assert notifier.reloading()
        assert notifier.ready()
    finally:
        notifier.close()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading = _fields(manager)
    assert reloading[0] == "RELOADING=1"
    key, _, value = reloading[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert _fields(manager) == ["READY=1"]  # systemd waits for READY=1 to end the reload


def test_status_is_one_line_even_when_the_text_has_newlines(
    manager: socket.socket, tmp_path: Path
) -> None:
    notifier = systemd.Notifier(str(tmp_path / "notify"))
    try:
        assert notifier.status("waiting for Vault:\nconnection refused")
    finally:
        notifier.close()
    assert _fields(manager) == ["STATUS=waiting for Vault: connection refused"]


def test_abstract_namespace_socket_named_with_at_sign(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"rotator-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    notifier = systemd.Notifier.from_env()
    try:
        assert notifier.watchdog()
        assert _fields(sock) == ["WATCHDOG=1"]
    finally:
        notifier.close()
        sock.close()


def test_without_notify_socket_every_call_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = systemd.Notifier.from_env()
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not notifier.stopping()
    assert not notifier.reloading()
    assert not notifier.status("x")
    notifier.close()


def test_a_vanished_manager_socket_is_reported_not_raised(tmp_path: Path) -> None:
    notifier = systemd.Notifier(str(tmp_path / "nobody-listens"))
    try:
        assert notifier.enabled
        assert not notifier.ready()
        assert not notifier.watchdog()
    finally:
        notifier.close()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval_follows_sd_watchdog_enabled(
    environ: dict[str, str], expected: float | None
) -> None:
    assert systemd.watchdog_interval(environ) == expected
    assert systemd.Notifier.from_env(environ).watchdog_interval() == expected
