"""A small sd_notify client: tell systemd the daemon is ready, alive, reloading or stopping.

systemd's notify protocol is one datagram of newline-separated ``KEY=VALUE`` lines sent to the
unix socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). There
is no reply. Without ``$NOTIFY_SOCKET`` (not under systemd, or ``Type=`` other than notify) every
call is a no-op, so the daemon calls the notifier unconditionally.

This module needs no dependency and must never raise into the daemon: a failed send is logged
once and reported as ``False``; a service manager that went away must not stop key rotation.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

_log = logging.getLogger(__name__)


def _address(value: str | None) -> str | bytes | None:
    """The socket address to send to; None when unset or of a kind this client cannot use."""
    if not value:
        return None
    if value.startswith("@"):
        # Abstract namespace: a leading NUL byte, the rest of the name as is (not NUL-ended).
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # vsock:CID:PORT and relative paths: not used by a systemd service on a host.
    _log.warning("sd_notify_unsupported_socket", extra={"notify_socket": value})
    return None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds (``WatchdogSec=``), None when no watchdog applies to us.

    As ``sd_watchdog_enabled()``: ``$WATCHDOG_USEC`` must be a positive integer and, when
    ``$WATCHDOG_PID`` is set, it must be this process's pid (the variables may have leaked from
    a parent). Send ``WATCHDOG=1`` at least every half of it.
    """
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC", "").strip()
    if not usec_text:
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid_text = env.get("WATCHDOG_PID", "").strip()
    if pid_text:
        try:
            pid = int(pid_text)
        except ValueError:
            return None
        if pid != os.getpid():
            return None
    return usec / 1_000_000


class Notifier:
    """Sends sd_notify messages to one socket; every method is a no-op without one."""

    def __init__(self, notify_socket: str | None, *, watchdog: float | None = None) -> None:
        self._address = _address(notify_socket)
        self._watchdog = watchdog
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET`` and the watchdog of ``$WATCHDOG_USEC``."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"), watchdog=watchdog_interval(env))

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere (``$NOTIFY_SOCKET`` was set to a usable address)."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds found at creation; None: no watchdog."""
        return self._watchdog

    # --- the messages --------------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: startup (or a reload) is complete; systemd starts what waits for us."""
        return self.send("READY=1", *self._status(status))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the process is alive; systemd restarts it if these stop coming."""
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.send("STOPPING=1", *self._status(status))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC``: a reload began; send ``ready()`` after it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *self._status(status))

    def status(self, text: str) -> bool:
        """``STATUS=...``: one line shown by ``systemctl status``."""
        return self.send(*self._status(text))

    @staticmethod
    def _status(text: str | None) -> tuple[str, ...]:
        if text is None:
            return ()
        # One message line per field: a newline would start a new (bogus) field.
        return ("STATUS=" + " ".join(text.split()),)

    def send(self, *fields: str) -> bool:
        """Send ``fields`` as one datagram; True if sent, False if disabled or it failed."""
        if self._address is None or not fields:
            return False
        payload = "\n".join(fields).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                self._sock.sendto(payload, self._address)
            except OSError as exc:
                if not self._warned:  # once: a gone manager would otherwise log every beat
                    self._warned = True
                    _log.warning("sd_notify_failed", extra={"error": str(exc)})
                return False
        return True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
