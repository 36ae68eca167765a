"""Pieces for the many-replica and soak tests: a recording fault proxy, per-user holds, daemon
replicas as processes, and a consumer and an observer that cover a whole fleet of targets.

- :class:`RecordingProxy` is a :class:`FaultProxy` that also records, per user, every
  ``CreateAccessKey`` it saw (the user it named, the key created, the answer's status) and every
  error code moto itself answered, so a test can count creations per target.
- :meth:`RecordingProxy.hold_user` holds the next call of one user: a call naming it
  (``CreateAccessKey``), or a call signed by one of its keys (a verification).
- :class:`Replica` is one ``rotator run`` process, restartable, with its JSON log.
- :class:`FleetConsumer` reads every target's secret from Vault every half second and uses it
  against moto directly (never through the proxy, so only rotator sees the faults).
- :class:`FleetObserver` lists every user's keys, for the key counts and when each key was first
  seen Inactive (moto accepts Inactive keys, so a use after that is a failure found here).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import boto3
import botocore.session
import hvac
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.support import servers
from tests.support.faultproxy import FaultProxy, Hold, Request, _error_code, _tag
from tests.support.harness import secret_path_of, target_names, user_of, wait_for, write_config


class Create(NamedTuple):
    """One CreateAccessKey seen by the proxy: who for, what it made, when (proxy clock)."""

    user: str
    status: int | None  # None: no answer (dropped, or a hold failed it)
    key_id: str | None  # the key moto created (also when the answer was then dropped)
    at: float


class UserHold(Hold):
    """A hold on calls that name ``user`` (``signed_by_user=False``) or that are signed by one of
    the user's keys as the proxy learnt them from CreateAccessKey answers (a verification)."""

    def __init__(self, proxy: FaultProxy, user: str, signed_by_user: bool, **filters: Any) -> None:
        super().__init__(proxy, **filters)
        self.user = user
        self.signed_by_user = signed_by_user
        self.key_ids_caught: list[str] = []

    def matches(self, request: Request) -> bool:  # called under the proxy's lock
        if not super().matches(request):
            return False
        if self.signed_by_user:
            ok = self._proxy._key_user.get(request.key_id) == self.user
        else:
            ok = request.params.get("UserName") == self.user
        if ok:
            self.key_ids_caught.append(request.key_id)
        return ok


class RecordingProxy(FaultProxy):
    """A FaultProxy that records creations per user and moto's own error codes."""

    def __init__(self, upstream: str, **kwargs: Any) -> None:
        super().__init__(upstream, **kwargs)
        self.creates: list[Create] = []
        self.create_attempts: dict[str, list[int | None]] = {}  # user -> status answered
        self.upstream_errors: list[tuple[str, str]] = []  # (action, code) moto answered

    def _learn(self, request: Request, status: int, body: bytes) -> None:
        super()._learn(request, status, body)  # under the proxy's lock, for every forwarded call
        if status >= 400:
            self.upstream_errors.append((request.action, _error_code(body)))
        if request.action == "CreateAccessKey":
            self.creates.append(
                Create(
                    user=request.params.get("UserName", ""),
                    status=status,
                    key_id=_tag(body, "AccessKeyId") if status == 200 else None,
                    at=self.clock(),
                )
            )

    def _log(self, request: Request, status: int | None) -> None:
        super()._log(request, status)
        if request.action == "CreateAccessKey":
            with self._lock:
                user = request.params.get("UserName", "")
                self.create_attempts.setdefault(user, []).append(status)

    def hold_user(
        self, action: str, user: str, *, signed_by_user: bool = False, count: int = 1
    ) -> UserHold:
        rule: UserHold = self._add(
            UserHold(self, user, signed_by_user, action=action, key_id=None, count=count)
        )
        return rule

    def created_keys(self, user: str) -> list[str]:
        with self._lock:
            return [c.key_id for c in self.creates if c.user == user and c.key_id]

    def create_times(self, user: str) -> list[float]:
        with self._lock:
            return [c.at for c in self.creates if c.user == user and c.key_id]


@pytest.fixture
def fleet_proxy(
    moto_server: servers.MotoServer, iam_admin: servers.MotoAdmin
) -> Iterator[RecordingProxy]:
    """A started RecordingProxy in front of the session's moto (wiped by ``iam_admin``)."""
    proxy = RecordingProxy(moto_server.endpoint)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
    if proxy.errors:
        pytest.fail(f"the fault proxy failed inside: {proxy.errors!r}")


# --- replicas --------------------------------------------------------------------------------


def replica_configs(cfg: Path, metrics_port: int, count: int) -> list[Path]:
    """Copies of ``cfg`` (next to it, so relative files resolve) differing only in the metrics
    port; the first keeps ``metrics_port``."""
    text = cfg.read_text()
    listen = f"listen: 127.0.0.1:{metrics_port}"
    assert listen in text
    paths = []
    for index in range(count):
        port = metrics_port if index == 0 else servers.free_port()
        path = cfg.with_name(f"rotator-{index}.yaml")
        path.write_text(text.replace(listen, f"listen: 127.0.0.1:{port}"))
        paths.append(path)
    return paths


@dataclass
class Replica:
    """One daemon process on ``cfg``; every incarnation appends to the same log."""

    name: str
    cfg: Path
    env: dict[str, str]
    started: list[subprocess.Popen[bytes]]
    process: subprocess.Popen[bytes] | None = None
    pids: list[int] = field(default_factory=list)
    kills: int = 0
    restarts: int = 0
    _offset: int = 0  # where the current incarnation's log begins

    @property
    def log(self) -> Path:
        return self.cfg.with_name(f"{self.name}.log")

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        assert not self.running(), f"{self.name} is already running"
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rotator", "run", "-c", str(self.cfg)],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cfg.parent,
            )
        self.started.append(self.process)
        self.pids.append(self.process.pid)

    def kill9(self) -> None:
        """SIGKILL this process (by its PID) and reap it."""
        assert self.process is not None and self.running(), f"{self.name} is not running"
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.kills += 1

    def up(self) -> bool:
        """Whether the current incarnation logged daemon_started (its signal handlers are set:
        a SIGTERM before that meets Python's default action, an exit by signal 15)."""
        if not self.running():
            return False
        with self.log.open("rb") as log:
            log.seek(self._offset)
            return b'"event": "daemon_started"' in log.read()

    def terminate(self, timeout: float = 30.0) -> int:
        """Wait until it is up, SIGTERM it and wait: the exit code (0 when it stopped cleanly)."""
        assert self.process is not None and self.running(), f"{self.name} is not running"
        wait_for(self.up, timeout, f"{self.name} started", self.process)
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def restart(self) -> int:
        code = self.terminate()
        self.start()
        self.restarts += 1
        return code

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        if not self.log.exists():
            return found
        for line in self.log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if name is None or event.get("event") == name:
                found.append(event)
        return found

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


# --- Vault and IAM views ---------------------------------------------------------------------


class VaultView:
    """Reads of the test's mount with one hvac client (``vault.read_raw`` makes one per call)."""

    def __init__(self, vault: Any) -> None:
        self._mount = vault.mount
        self._client = vault.client()

    def read(self, path: str) -> dict[str, Any] | None:
        try:
            answer = self._client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=self._mount, raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath:
            return None
        data: dict[str, Any] = answer["data"]["data"]
        return data

    def published(self, target: str) -> dict[str, Any] | None:
        return self.read(secret_path_of(target))

    def state(self, target: str) -> dict[str, Any] | None:
        return self.read(f"rotator/targets/{target}")

    def lock(self, target: str) -> dict[str, Any] | None:
        return self.read(f"rotator/locks/{target}")


def tracked_ids(state: dict[str, Any] | None) -> set[str]:
    """The current and retiring key ids of a stored state document."""
    if not state:
        return set()
    ids = {r["key_id"] for r in state.get("retiring") or ()}
    if state.get("current"):
        ids.add(state["current"]["key_id"])
    return ids


def iam_keys(client: Any, user: str) -> dict[str, str]:
    """The user's keys in IAM: id -> status ({} when the user does not exist)."""
    try:
        listed = client.list_access_keys(UserName=user)["AccessKeyMetadata"]
    except ClientError:
        return {}
    return {k["AccessKeyId"]: k["Status"] for k in listed}


def authenticates(admin: servers.MotoAdmin, key_id: str, secret: str) -> bool:
    ec2 = boto3.client(
        "ec2",
        endpoint_url=admin.endpoint,
        region_name=admin.region,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        config=Config(retries={"total_max_attempts": 1}),
    )
    try:
        ec2.describe_regions()
    except ClientError:
        return False
    finally:
        ec2.close()
    return True


# --- consumer and observer -------------------------------------------------------------------


@dataclass
class FleetConsumer:
    """Every ~0.5 s, reads every target's secret from Vault and uses it at once against moto
    (ec2 DescribeRegions signed with it), as an agent would. Any failure is recorded.

    The targets are shared among ``shards`` threads so that each target is read every
    ``interval`` even when one pass over them all would take longer."""

    vault: Any
    admin: servers.MotoAdmin
    targets: list[str]
    interval: float = 0.5
    shards: int = 2
    reads: int = 0
    uses: int = 0
    failures: list[str] = field(default_factory=list)
    key_ids: dict[str, list[str]] = field(default_factory=dict)  # target -> published ids seen
    last_use: dict[str, float] = field(default_factory=dict)  # key id -> monotonic time
    stop: threading.Event = field(default_factory=threading.Event)
    _rounds: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def rounds(self) -> int:
        """Rounds every shard has completed."""
        return min(self._rounds, default=0)

    def run(self) -> None:
        self._rounds = [0] * self.shards
        threads = [
            threading.Thread(target=self._loop, args=(n,), name=f"consumer-{n}", daemon=True)
            for n in range(self.shards)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _loop(self, shard: int) -> None:
        view = VaultView(self.vault)
        session = botocore.session.get_session()
        clients: dict[str, tuple[str, Any]] = {}  # target -> (key id, its ec2 client)
        mine = self.targets[shard :: self.shards]
        while True:
            began = time.monotonic()
            for target in mine:
                self._one(view, session, clients, target)
            self._rounds[shard] += 1
            if self.stop.wait(max(0.0, self.interval - (time.monotonic() - began))):
                break
        for _, client in clients.values():
            client.close()

    def read_once(self) -> None:
        """One more round from the caller's thread (after the consumer threads stopped)."""
        view = VaultView(self.vault)
        session = botocore.session.get_session()
        clients: dict[str, tuple[str, Any]] = {}
        for target in self.targets:
            self._one(view, session, clients, target)
        for _, client in clients.values():
            client.close()

    def distinct(self, target: str) -> int:
        with self._lock:
            return len(set(self.key_ids.get(target, ())))

    def _fail(self, what: str) -> None:
        with self._lock:
            self.failures.append(what)

    def _one(
        self, view: VaultView, session: Any, clients: dict[str, tuple[str, Any]], target: str
    ) -> None:
        try:
            data = view.published(target)
        except hvac.exceptions.VaultError as exc:
            self._fail(f"{target}: Vault read failed: {exc}")
            return
        with self._lock:
            self.reads += 1
        if not data:
            return  # not bootstrapped yet
        key_id, secret = data["access_key_id"], data["secret_access_key"]
        with self._lock:
            seen = self.key_ids.setdefault(target, [])
            if not seen or seen[-1] != key_id:
                seen.append(key_id)
        cached = clients.get(target)
        if cached is None or cached[0] != key_id:
            if cached is not None:
                cached[1].close()
            client = session.create_client(
                "ec2",
                endpoint_url=self.admin.endpoint,
                region_name=self.admin.region,
                aws_access_key_id=key_id,
                aws_secret_access_key=secret,
                config=Config(retries={"total_max_attempts": 1}),
            )
            clients[target] = (key_id, client)
        client = clients[target][1]
        used_at = time.monotonic()  # the use began then: sound against first_inactive
        try:
            client.describe_regions()
        except ClientError as exc:
            self._fail(f"{target} {key_id}: {exc.response['Error']['Code']}")
            return
        except BotoCoreError as exc:
            self._fail(f"{target} {key_id}: {type(exc).__name__}: {exc}")
            return
        with self._lock:
            self.uses += 1
            self.last_use[key_id] = used_at


@dataclass
class FleetObserver:
    """Lists every user's keys (straight from moto) about twice a second."""

    admin: servers.MotoAdmin
    users: list[str]
    interval: float = 0.5
    max_keys: dict[str, int] = field(default_factory=dict)
    seen: dict[str, set[str]] = field(default_factory=dict)  # user -> every key id seen
    first_inactive: dict[str, float] = field(default_factory=dict)  # key id -> monotonic
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        client = self.admin.client()
        while True:
            began = time.monotonic()
            for user in self.users:
                keys = iam_keys(client, user)
                listed_at = time.monotonic()  # each key had this status by then
                self.max_keys[user] = max(self.max_keys.get(user, 0), len(keys))
                self.seen.setdefault(user, set()).update(keys)
                for key_id, status in keys.items():
                    if status == "Inactive":
                        self.first_inactive.setdefault(key_id, listed_at)
            if self.stop.wait(max(0.0, self.interval - (time.monotonic() - began))):
                break
        client.close()


def used_after_inactive(consumer: FleetConsumer, observer: FleetObserver) -> list[str]:
    """Keys the consumer used after the observer had seen them Inactive (moto still accepts
    Inactive keys, so these uses succeeded there but would fail against EIM)."""
    return [
        f"{key_id} used {consumer.last_use[key_id] - at:.2f}s after it was seen Inactive"
        for key_id, at in observer.first_inactive.items()
        if key_id in consumer.last_use and consumer.last_use[key_id] > at
    ]


def users_of(targets: list[str]) -> list[str]:
    return [user_of(t) for t in targets]


# --- a fleet run -------------------------------------------------------------------------------


def fleet_config(
    tmp_path: Path,
    admin: servers.MotoAdmin,
    vault: Any,
    proxy: FaultProxy,
    targets: int,
    lock_ttl: str,
    **timing: str,
) -> tuple[Path, int]:
    """A config for a fleet of ``targets`` whose IAM calls go through ``proxy`` (two workers,
    info logs, a lease TTL of ``lock_ttl``, ``timing`` for the defaults): its path, metrics port."""
    port = servers.free_port()
    cfg = write_config(
        tmp_path,
        admin,
        vault,
        port,
        targets=targets,
        endpoint=proxy.endpoint,
        workers=2,
        level="info",
        extra_vault=f"\n  lock_ttl: {lock_ttl}",
        **timing,
    )
    return cfg, port


class FleetRun:
    """``replicas`` daemons on copies of ``cfg`` (a :func:`fleet_config`), with a consumer and an
    observer over every target: ``start`` starts them all, ``stop_consumers`` the two threads;
    the processes are killed by the ``started`` fixture."""

    def __init__(
        self,
        cfg: Path,
        port: int,
        targets: int,
        replicas: int,
        admin: servers.MotoAdmin,
        vault: Any,
        env: dict[str, str],
        started: list[subprocess.Popen[bytes]],
        *,
        shards: int = 2,
    ) -> None:
        self.targets = target_names(targets)
        self.configs = replica_configs(cfg, port, replicas)
        self.replicas = [
            Replica(f"replica-{i}", path, env, started) for i, path in enumerate(self.configs)
        ]
        self.view = VaultView(vault)
        self.consumer = FleetConsumer(vault, admin, self.targets, shards=shards)
        self.observer = FleetObserver(admin, users_of(self.targets))
        self.threads = [
            threading.Thread(target=t.run, daemon=True) for t in (self.consumer, self.observer)
        ]

    def start(self) -> None:
        """The consumer and the observer first, then every replica."""
        for thread in self.threads:
            thread.start()
        for replica in self.replicas:
            replica.start()

    def tails(self, chars: int = 2000) -> str:
        return "\n".join(f"--- {r.name}\n{r.tail(chars)}" for r in self.replicas)

    def check_alive(self) -> None:
        """Fail if a replica exited by itself (an exit by kill -9 is the test's own)."""
        for replica in self.replicas:
            if replica.process is not None and replica.process.poll() not in (None, -9):
                raise AssertionError(
                    f"{replica.name} exited by itself with {replica.process.returncode}\n"
                    f"{self.tails()}"
                )

    def stop_consumers(self) -> None:
        self.consumer.stop.set()
        self.observer.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
