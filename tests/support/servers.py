"""Start and stop the real servers the tests (and the local demo) run against.

Plain classes with no pytest in them, so a demo script can reuse them. Each server is started as
one process on loopback and stopped by the PID it was started with, never by name.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

DEV_ROOT_TOKEN = "root"  # the dev server's throwaway root token; it only lives in memory


def free_port(consecutive: int = 1) -> int:
    """A loopback TCP port that is free now, with the ``consecutive - 1`` ports after it free too.

    There is a window between this check and the server binding the port; callers that start a
    server retry with another port if it fails to bind.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port + consecutive - 1 > 65535:
            continue
        held: list[socket.socket] = []
        try:
            for candidate in range(port, port + consecutive):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(sock)
                sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
        return port
    raise RuntimeError(f"no run of {consecutive} free loopback port(s) found")


def _venv_binary(name: str) -> str:
    """The binary installed next to this Python (the venv's bin/), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


class OpenBaoServer:
    """An OpenBao dev server (in memory, unsealed, root token known) on a loopback port.

    Dev mode binds PORT and PORT+1 (cluster) and writes the root token to ``$HOME/.vault-token``,
    so it gets a pair of free ports and a throwaway HOME.
    """

    def __init__(
        self,
        home: Path,
        *,
        root_token: str = DEV_ROOT_TOKEN,
        binary: str | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.home = Path(home)
        self.root_token = root_token
        self.binary = binary or _venv_binary("bao")
        self.log_path = log_path or self.home / "openbao.log"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self, timeout: float = 20.0, attempts: int = 3) -> None:
        """Start the server and wait until ``/v1/sys/health`` answers (retrying on a port race)."""
        if self._process is not None:
            raise RuntimeError("OpenBao server already started")
        self.home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.home)
        last_error = ""
        for _ in range(attempts):
            self.port = free_port(consecutive=2)
            self._log = self.log_path.open("ab")
            self._process = subprocess.Popen(
                [
                    self.binary,
                    "server",
                    "-dev",
                    f"-dev-root-token-id={self.root_token}",
                    f"-dev-listen-address=127.0.0.1:{self.port}",
                ],
                env=env,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
            last_error = self._wait_healthy(timeout)
            if not last_error:
                return
            self.stop()
        raise RuntimeError(f"OpenBao did not start: {last_error}; see {self.log_path}")

    def _wait_healthy(self, timeout: float) -> str:
        """'' once healthy, else why not (the process exited, or the deadline passed)."""
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                return f"bao exited with status {code} (port {self.port} taken?)"
            if self.health_status() == 200:
                return ""
            time.sleep(0.05)  # polling interval of a deadline-bounded wait, not a synchronisation
        return f"no healthy answer on {self.address} within {timeout}s"

    def health_status(self) -> int | None:
        """HTTP status of ``/v1/sys/health`` (200 active, 503 sealed...), None if no answer."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/v1/sys/health")
            return conn.getresponse().status
        except OSError:
            return None
        finally:
            conn.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process this object started (by its PID) and wait for it."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None

    def __enter__(self) -> OpenBaoServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
