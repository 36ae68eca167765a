"""Start and stop the real servers the tests (and the local demo) run against.

Plain classes with no pytest in them, so a demo script can reuse them. Each server is started as
one process on loopback and stopped by the PID it was started with, never by name.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import boto3
from botocore.config import Config

from tests.support.shared import StartStop

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


def taken_ports(*ports: int) -> list[int]:
    """The ports of ``ports`` that something on this machine holds on loopback now."""
    taken = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # As the servers bind: connections of an earlier server in TIME_WAIT do not count,
            # a listening socket does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                taken.append(port)
    return taken


def _refuse_taken(name: str, *ports: int) -> None:
    """A pinned port must be free before the server starts: otherwise the readiness check could
    get its answer from whatever holds the port (an earlier demo's server) and take it for ours."""
    if taken := taken_ports(*ports):
        raise RuntimeError(
            f"{name} cannot start: port {', '.join(map(str, taken))} of 127.0.0.1 is taken "
            "by another process"
        )


def _venv_binary(name: str) -> str:
    """The binary installed next to this Python (the venv's bin/), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


# --- moto's IAM server -----------------------------------------------------------------------

MOTO_ADMIN_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}


@dataclass(frozen=True)
class MotoAdmin:
    """An admin identity on a moto server: allow-all inline policy, one access key."""

    endpoint: str
    region: str
    user: str
    access_key_id: str
    secret_access_key: str = field(repr=False)

    def client(self, key_id: str | None = None, secret: str | None = None) -> Any:
        """A boto3 iam client for test-side checks, signed as the admin unless told otherwise."""
        return boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=key_id or self.access_key_id,
            aws_secret_access_key=secret or self.secret_access_key,
            config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
        )


class _ServerProcess(StartStop):
    """A server process this object started: stopped by its PID, usable as a context manager."""

    _process: subprocess.Popen[bytes] | None
    _log: IO[bytes] | None

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


class MotoServer(_ServerProcess):
    """moto's server on a loopback port, authentication enforced from the first request.

    ``bootstrap_admin`` wipes it and creates an admin (with auth briefly off), the way each test
    starts from a clean IAM.
    """

    def __init__(
        self,
        *,
        region: str = "us-east-1",
        log_path: Path | None = None,
    ) -> None:
        self.region = region
        self.log_path = log_path
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self, timeout: float = 20.0, attempts: int = 3, port: int | None = None) -> None:
        """Start the server and wait until ``/moto-api/`` answers (retrying on a port race).

        ``port`` pins the port (one attempt); by default a free one is chosen.
        """
        if port is not None:
            attempts = 1
            _refuse_taken("moto_server", port)
        if self._process is not None:
            raise RuntimeError("moto server already started")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        # No free requests: every call must be signed by a key moto knows and be allowed.
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        last_error = ""
        for _ in range(attempts):
            self.port = port or free_port()
            if self.log_path is None:
                self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
            else:
                self._log = self.log_path.open("ab")
            self._process = subprocess.Popen(
                [_venv_binary("moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches only the test/demo
            )
            last_error = self._wait_ready(timeout)
            if not last_error:
                return
            last_error += "\n" + self._log_tail()
            self.stop()
        raise RuntimeError(f"moto_server did not start: {last_error}")

    def _wait_ready(self, timeout: float) -> str:
        """'' once ``GET /moto-api/`` answers 200, else why not."""
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                return f"moto_server exited with status {code} (port {self.port} taken?)"
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("GET", "/moto-api/")
                if conn.getresponse().status == 200 and self._process.poll() is None:
                    return ""
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.05)  # polling interval of a deadline-bounded wait, not a synchronisation
        return f"no answer on {self.endpoint}/moto-api/ within {timeout}s"

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        with contextlib.suppress(OSError):
            self._log.flush()
            self._log.seek(0)
            return self._log.read()[-4000:].decode(errors="replace")
        return ""

    def _post(self, path: str, body: bytes, content_type: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": content_type})
            answer = conn.getresponse()
            answer.read()
        finally:
            conn.close()
        if answer.status != 200:
            raise RuntimeError(f"moto POST {path} answered {answer.status}")

    def reset(self) -> None:
        """Wipe every resource moto holds (the auth setting is kept)."""
        self._post("/moto-api/reset", b"", "application/json")

    def set_auth(self, enforced: bool) -> None:
        """Authentication on or off; moto accepts only a text/plain body here (else HTTP 500)."""
        self._post("/moto-api/reset-auth", b"0" if enforced else b"inf", "text/plain")

    def bootstrap_admin(self, user: str = "rotator-admin") -> MotoAdmin:
        """Wipe moto, create an allow-all admin user with a key; authentication is on after."""
        self.reset()
        self.set_auth(False)
        try:
            client = boto3.client(
                "iam",
                endpoint_url=self.endpoint,
                region_name=self.region,
                aws_access_key_id="bootstrap",
                aws_secret_access_key="bootstrap",
                config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
            )
            client.create_user(UserName=user)
            client.put_user_policy(
                UserName=user,
                PolicyName="allow-all",
                PolicyDocument=json.dumps(MOTO_ADMIN_POLICY),
            )
            key = client.create_access_key(UserName=user)["AccessKey"]
        finally:
            self.set_auth(True)
        return MotoAdmin(
            endpoint=self.endpoint,
            region=self.region,
            user=user,
            access_key_id=key["AccessKeyId"],
            secret_access_key=key["SecretAccessKey"],
        )


class OpenBaoServer(_ServerProcess):
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

    def start(self, timeout: float = 20.0, attempts: int = 3, port: int | None = None) -> None:
        """Start the server and wait until ``/v1/sys/health`` answers (retrying on a port race).

        ``port`` pins the port (one attempt; PORT+1 must be free too); by default free ones.
        """
        if port is not None:
            attempts = 1
            _refuse_taken("OpenBao", port, port + 1)
        if self._process is not None:
            raise RuntimeError("OpenBao server already started")
        self.home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.home)
        last_error = ""
        for _ in range(attempts):
            self.port = port or free_port(consecutive=2)
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
                start_new_session=True,  # a terminal's Ctrl-C reaches only the test/demo
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
            if self.health_status() == 200 and self._process.poll() is None:
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
