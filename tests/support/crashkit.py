"""Pieces for the crash, IAM-fault and OUTSCALE e2e tests: a Vault proxy that holds writes, a
watcher that checks the invariants while the daemon runs, and daemon processes with their logs.

:class:`VaultProxy` is a loopback HTTP proxy in front of OpenBao. Every request is forwarded
unchanged; a :class:`VaultHold` catches the next writes (PUT/POST) whose path and JSON body match a
predicate, and keeps them until the test releases them: forwarded (the write is applied, its
answer goes to whoever is still listening) or failed (the connection closes, nothing applied).

:class:`Watcher` runs in a thread from the daemon's start to the end of a test. Four times a
second it reads the published secret straight from OpenBao, uses it against IAM (through the fault
proxy, so young and Inactive keys are refused as a real EIM would), and lists the keys of the
watched users straight from moto (not through the proxy, so holds and call counts are untouched).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.support import servers
from tests.support.harness import write_config
from tests.support.shared import CallGate

WritePredicate = Callable[[str, dict[str, Any] | None], bool]
"""(path after /v1/, the ``data`` of the JSON body or None) -> whether a write matches."""

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


class VaultHold(CallGate):
    """The next ``count`` writes matching ``predicate`` wait in the proxy until :meth:`release`."""

    def __init__(self, predicate: WritePredicate, count: int) -> None:
        super().__init__()
        self.predicate = predicate
        self.remaining = count
        self.paths: list[str] = []

    def _arrive_at(self, path: str) -> None:
        with self._cond:
            self.paths.append(path)
        self._arrive()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True
    proxy: VaultProxy


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _serve(self) -> None:
        self.server.proxy._handle(self)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_LIST = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()


class VaultProxy:
    """A loopback proxy in front of an OpenBao at ``upstream`` (http://127.0.0.1:port)."""

    def __init__(self, upstream: str, port: int = 0) -> None:
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"upstream must be http:// on loopback, not {upstream!r}")
        self._host, self._port = parts.hostname, parts.port or 80
        self._listen = port  # 0: any free port
        self._lock = threading.Lock()
        self._holds: list[VaultHold] = []
        self.calls: list[tuple[str, str, int | None]] = []  # method, path, status (None: none)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> None:
        server = _Server(("127.0.0.1", self._listen), _Handler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="vaultproxy"
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        with self._lock:
            holds = list(self._holds)
        for hold in holds:
            hold.release(forward=False)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        self._server = None

    def hold_write(self, predicate: WritePredicate, count: int = 1) -> VaultHold:
        hold = VaultHold(predicate, count)
        with self._lock:
            self._holds.append(hold)
        return hold

    def writes(self, path_suffix: str) -> int:
        """How many writes to a path ending with ``path_suffix`` were answered."""
        with self._lock:
            return sum(
                1
                for method, path, status in self.calls
                if method in ("PUT", "POST") and path.endswith(path_suffix) and status is not None
            )

    def _handle(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length > 0 else b""
        method, raw_path = handler.command, handler.path
        path = urllib.parse.urlsplit(raw_path).path.removeprefix("/v1/")
        holds: list[VaultHold] = []
        if method in ("PUT", "POST"):
            data: dict[str, Any] | None = None
            with contextlib.suppress(ValueError, AttributeError):
                parsed = json.loads(body or b"null")
                data = parsed.get("data") if isinstance(parsed, dict) else None
            with self._lock:
                for hold in self._holds:
                    if hold.remaining > 0 and hold.predicate(path, data):
                        hold.remaining -= 1
                        holds.append(hold)
            for hold in holds:
                hold._arrive_at(path)
        try:
            for hold in holds:
                if not hold._wait():
                    self._log(method, path, None)
                    handler.close_connection = True
                    with contextlib.suppress(OSError):
                        handler.connection.shutdown(socket.SHUT_RDWR)
                    return
            self._forward(handler, method, raw_path, path, body)
        finally:
            for hold in holds:
                hold._finish()

    def _forward(
        self, handler: _Handler, method: str, raw_path: str, path: str, body: bytes
    ) -> None:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=30)
        try:
            conn.putrequest(method, raw_path, skip_host=True, skip_accept_encoding=True)
            for name, value in handler.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            response = conn.getresponse()
            answer = response.read()
            status, headers = response.status, response.getheaders()
        except OSError:
            self._log(method, path, None)
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
            return
        finally:
            conn.close()
        self._log(method, path, status)
        handler.close_connection = True
        with contextlib.suppress(OSError):
            handler.send_response_only(status)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(answer)))
            handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(answer)
            handler.wfile.flush()

    def _log(self, method: str, path: str, status: int | None) -> None:
        with self._lock:
            self.calls.append((method, path, status))


# --- config ------------------------------------------------------------------------------------

BYSTANDER_USER = "bystander_1"
BYSTANDER_SECRET = "bystander/bystander_1"


def crash_config(
    tmp_path: Path,
    iam: servers.MotoAdmin,
    vault: Any,
    *,
    endpoint: str,
    vault_address: str | None = None,
    metrics_port: int | None = None,
    bystander: bool = True,
    lock_ttl: str = "3s",
    **timing: Any,
) -> Path:
    """write_config's config, pointed at the proxies, with a short lock lease and (``bystander``)
    a second target whose user is managed elsewhere and holds a hand-made key."""
    target_vault = SimpleNamespace(
        address=vault_address or vault.address, root_token=vault.root_token, mount=vault.mount
    )
    cfg = write_config(
        tmp_path,
        iam,
        target_vault,
        metrics_port or servers.free_port(),
        endpoint=endpoint,
        level="info",
        extra_vault=f"\n  lock_ttl: {lock_ttl}",
        **timing,
    )
    if bystander:
        text = cfg.read_text()
        extra = (
            f"\n  - name: bystander\n    user: {BYSTANDER_USER}\n"
            f"    secret_path: {BYSTANDER_SECRET}\n    max_age: 1h\n"
        )
        cfg.write_text(text.replace("\nworkers:", extra + "workers:", 1))
    return cfg


def make_bystander(iam: servers.MotoAdmin) -> str:
    """The bystander's user with one hand-made (foreign) key; returns its id."""
    client = iam.client()
    client.create_user(UserName=BYSTANDER_USER)
    key_id: str = client.create_access_key(UserName=BYSTANDER_USER)["AccessKey"]["AccessKeyId"]
    return key_id


# --- daemon processes --------------------------------------------------------------------------


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    log: Path

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def summaries(self, target: str = "monitoring") -> list[dict[str, Any]]:
        return [
            e for e in self.events() if e.get("event") == "pass_summary" and e["target"] == target
        ]

    def kill9(self) -> None:
        self.process.kill()  # SIGKILL, by the PID this test started
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_daemon(
    cfg: Path,
    env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
    log: Path,
    *args: str,
) -> Daemon:
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "rotator", "run", "-c", str(cfg), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cfg.parent,
        )
    started.append(process)
    return Daemon(process, log)


def run_cli(cfg: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rotator", *args, "-c", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cfg.parent,
        timeout=90,
        check=False,
    )


# --- state and keys ----------------------------------------------------------------------------


def state_of(vault: Any, target: str = "monitoring") -> dict[str, Any] | None:
    data: dict[str, Any] | None = vault.read_raw(f"rotator/targets/{target}")
    return data


def tracked(state: dict[str, Any]) -> set[str]:
    ids = {r["key_id"] for r in state.get("retiring") or []}
    for role in ("current", "pending"):
        if state.get(role):
            ids.add(state[role]["key_id"])
    return ids


def keys_of(admin: servers.MotoAdmin, user: str = "watcher_1") -> dict[str, str]:
    try:
        listed = admin.client().list_access_keys(UserName=user)["AccessKeyMetadata"]
    except ClientError:
        return {}
    return {k["AccessKeyId"]: k["Status"] for k in listed}


def settled(vault: Any, admin: servers.MotoAdmin) -> bool:
    """No rotation in flight and every key of the user has a role in the state."""
    state = state_of(vault)
    if state is None or state.get("pending") or state.get("intent"):
        return False
    return set(keys_of(admin)) <= tracked(state)


def published_id(vault: Any, path: str = "monitoring/watcher_1") -> str | None:
    data = vault.read_raw(path)
    return None if not data else str(data["access_key_id"])


def verified_ids(*daemons: Daemon) -> set[str]:
    """Key ids some daemon verified (verdict publish) before publishing."""
    return {
        e["key_id"]
        for d in daemons
        for e in d.events()
        if e.get("event") == "key_verification" and e.get("verdict") == "publish"
    }


# --- the watcher -------------------------------------------------------------------------------


@dataclass
class Watcher:
    """A consumer and an observer in one thread; ``problems`` lists every invariant broken."""

    admin: servers.MotoAdmin
    vault: Any
    endpoint: str  # where the consumer uses the key (the fault proxy)
    users: tuple[str, ...] = ("watcher_1", BYSTANDER_USER)
    secret_path: str = "monitoring/watcher_1"
    max_keys: int = 2
    period: float = 0.25
    problems: list[str] = field(default_factory=list)
    uses: int = 0
    key_ids: list[str] = field(default_factory=list)
    secrets: set[str] = field(default_factory=set)
    history: dict[str, list[str]] = field(default_factory=dict)  # key id -> statuses seen
    deleted: list[str] = field(default_factory=list)
    most_keys: dict[str, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Watcher:
        self._thread = threading.Thread(target=self.run, daemon=True, name="watcher")
        self._thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def run(self) -> None:
        client = self.admin.client()
        while not self.stop.wait(self.period):
            try:
                self._once(client)
            except Exception as exc:  # a broken check must show, not kill the thread
                self.problems.append(f"watcher crashed: {type(exc).__name__}: {exc}")

    def _list(self, client: Any) -> dict[str, dict[str, str]]:
        listed: dict[str, dict[str, str]] = {}
        for user in self.users:
            try:
                keys = client.list_access_keys(UserName=user)["AccessKeyMetadata"]
            except ClientError:
                keys = []
            listed[user] = {k["AccessKeyId"]: k["Status"] for k in keys}
        return listed

    def _observe(self, listed: dict[str, dict[str, str]]) -> None:
        present: set[str] = set()
        for user, keys in listed.items():
            self.most_keys[user] = max(self.most_keys.get(user, 0), len(keys))
            if len(keys) > self.max_keys:
                self.problems.append(f"{user} has {len(keys)} keys: {keys}")
            for key_id, status in keys.items():
                present.add(key_id)
                seen = self.history.setdefault(key_id, [])
                if not seen or seen[-1] != status:
                    seen.append(status)
        for key_id in self.history:
            if key_id not in present and key_id not in self.deleted:
                self.deleted.append(key_id)

    def _once(self, client: Any) -> None:
        data = self.vault.read_raw(self.secret_path)
        listed = self._list(client)
        self._observe(listed)
        if not data:
            return
        key_id, secret = data["access_key_id"], data["secret_access_key"]
        self.secrets.add(secret)
        if not self.key_ids or self.key_ids[-1] != key_id:
            self.key_ids.append(key_id)
        # STS GetCallerIdentity: an authenticated call that no IAM hold of the tests matches (and
        # cheap for moto, whose EC2 backend takes seconds to build)
        sts = boto3.client(
            "sts",
            endpoint_url=self.endpoint,
            region_name=self.admin.region,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            config=Config(retries={"total_max_attempts": 1}, read_timeout=10),
        )
        try:
            sts.get_caller_identity()
            self.uses += 1
        except (ClientError, BotoCoreError) as exc:
            # a key superseded between the read and the use is a late consumer, not a broken
            # publish: a problem only while that key is still the published one
            again = self.vault.read_raw(self.secret_path)
            if again and again["access_key_id"] == key_id:
                code = (
                    exc.response["Error"]["Code"]
                    if isinstance(exc, ClientError)
                    else type(exc).__name__
                )
                self.problems.append(f"published {key_id}: {code}")
        finally:
            sts.close()
        # the published key must be Active in IAM (moto itself accepts Inactive keys)
        status = listed.get("watcher_1", {}).get(key_id)
        again = self.vault.read_raw(self.secret_path)
        if status != "Active" and again and again["access_key_id"] == key_id:
            status = self._list(client).get("watcher_1", {}).get(key_id)
            still = self.vault.read_raw(self.secret_path)
            if status != "Active" and still and still["access_key_id"] == key_id:
                self.problems.append(f"published {key_id} is {status} in IAM")
