"""Shared pieces of the end-to-end tests: a config writer, a consumer, an observer, probes.

The consumer reads the published secret every half second and uses it against the IAM server,
as an agent would; the observer lists the user's keys and records every status each went
through; ``scrape`` reads /metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.support import servers

POLICY_DOC = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["ec2:Describe*", "elasticloadbalancing:Describe*"],
            "Resource": ["*"],
        }
    ],
}


def target_names(count: int) -> list[str]:
    """The targets write_config makes: "monitoring" alone, or fleet-00, fleet-01, ..."""
    return ["monitoring"] if count == 1 else [f"fleet-{n:02d}" for n in range(count)]


def user_of(target: str) -> str:
    return "watcher_1" if target == "monitoring" else f"user-{target}"


def secret_path_of(target: str) -> str:
    return "monitoring/watcher_1" if target == "monitoring" else f"fleet/{target}"


def write_config(
    tmp_path: Path,
    iam: servers.MotoAdmin,
    vault: Any,
    metrics_port: int,
    *,
    check_interval: str = "1s",
    max_age: str = "6s",
    grace: str = "2s",
    inactive_period: str = "2s",
    verify_timeout: str = "4s",
    targets: int = 1,
    endpoint: str | None = None,
    workers: int = 2,
    level: str = "debug",
    extra_eim: str = "",
    extra_vault: str = "",
) -> Path:
    """A config for the daemon against these servers; ``targets`` > 1 makes a fleet whose
    targets share the group and policy ``monitoring``. ``endpoint`` overrides the IAM endpoint
    (a fault proxy)."""
    creds = tmp_path / "eim-credentials"
    creds.write_text(
        f"aws_access_key_id = {iam.access_key_id}\n"
        f"aws_secret_access_key = {iam.secret_access_key}\n"
    )
    token = tmp_path / "vault-token"
    token.write_text(vault.root_token + "\n")
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "monitoring.json").write_text(json.dumps(POLICY_DOC))
    target_yaml = "".join(
        f"""
  - name: {name}
    user: {user_of(name)}
    group: monitoring
    policy:
      name: monitoring
      description: Allow describe for every item
      document_file: policies/monitoring.json
    secret_path: {secret_path_of(name)}"""
        for name in target_names(targets)
    )
    cfg = tmp_path / "rotator.yaml"
    cfg.write_text(
        f"""
eim:
  provider: outscale
  region: {iam.region}
  endpoint: {endpoint or iam.endpoint}
  credentials_file: eim-credentials
  max_attempts: 2
  connect_timeout: 2s
  read_timeout: 5s{extra_eim}
vault:
  address: {vault.address}
  auth:
    method: token
    token_file: vault-token
  mount: {vault.mount}
  state_path: rotator{extra_vault}
defaults:
  check_interval: {check_interval}
  max_age: {max_age}
  grace: {grace}
  inactive_period: {inactive_period}
  verify_timeout: {verify_timeout}
  identity_check_interval: 1m
targets:{target_yaml}
workers: {workers}
metrics:
  listen: 127.0.0.1:{metrics_port}
logging:
  format: json
  level: {level}
"""
    )
    return cfg


@dataclass
class Consumer:
    """Reads the published secret every half second and uses it against IAM, like an agent."""

    vault: Any
    endpoint: str
    region: str
    reads: int = 0
    uses: int = 0
    failures: list[str] = field(default_factory=list)
    key_ids: list[str] = field(default_factory=list)
    secrets: set[str] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(0.5):
            data = self.vault.read_raw("monitoring/watcher_1")
            self.reads += 1
            if not data:
                continue
            key_id, secret = data["access_key_id"], data["secret_access_key"]
            self.secrets.add(secret)
            if not self.key_ids or self.key_ids[-1] != key_id:
                self.key_ids.append(key_id)
            ec2 = boto3.client(
                "ec2",
                endpoint_url=self.endpoint,
                region_name=self.region,
                aws_access_key_id=key_id,
                aws_secret_access_key=secret,
                config=Config(retries={"max_attempts": 1}),
            )
            try:
                ec2.describe_regions()
                self.uses += 1
            except ClientError as exc:
                # a key superseded between the read and the use (moto's EC2 backend takes
                # seconds to build on a first call) is a late consumer, not a broken publish
                again = self.vault.read_raw("monitoring/watcher_1")
                if again and again["access_key_id"] == key_id:
                    self.failures.append(f"{key_id}: {exc.response['Error']['Code']}")


@dataclass
class Observer:
    """Lists the user's keys four times a second, recording every status each key went through."""

    admin: servers.MotoAdmin
    max_keys: int = 0
    history: dict[str, list[str]] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        client = self.admin.client()
        while not self.stop.wait(0.25):
            try:
                keys = client.list_access_keys(UserName="watcher_1")["AccessKeyMetadata"]
            except ClientError:
                continue  # the user does not exist yet
            self.max_keys = max(self.max_keys, len(keys))
            present = set()
            for key in keys:
                present.add(key["AccessKeyId"])
                seen = self.history.setdefault(key["AccessKeyId"], [])
                if not seen or seen[-1] != key["Status"]:
                    seen.append(key["Status"])
            for key_id in self.history:
                if key_id not in present and key_id not in self.deleted:
                    self.deleted.append(key_id)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def wait_for(
    predicate: Any, timeout: float, what: str, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"the daemon exited with {process.returncode} while waiting for {what}"
            )
        time.sleep(0.1)  # polling a condition with a deadline, not standing in for a sync
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def run_rotator(cfg: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m rotator ARGS -c CFG``, run from the test's own working directory (not the
    config's), its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "rotator", *args, "-c", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def start_daemon(
    cfg: Path,
    env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
    err: Path | None = None,
    *,
    program: tuple[str, ...] = ("-m", "rotator"),
) -> subprocess.Popen[bytes]:
    """``python PROGRAM run -c CFG`` in the background, its stderr (the log) in ``err`` (none
    kept if None), registered in ``started`` to be stopped by PID at the end of the test."""
    with contextlib.ExitStack() as files:
        sink = files.enter_context(err.open("wb")) if err else subprocess.DEVNULL
        process = subprocess.Popen(
            [sys.executable, *program, "run", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=sink,
            env=env,
        )
    started.append(process)
    return process


@dataclass
class Rotations:
    """What :func:`watch_rotations` saw: the consumer, the observer, /metrics scraped before the
    daemon stopped, its stdout and stderr together, and the JSON events of its stderr."""

    consumer: Consumer
    observer: Observer
    metrics: dict[str, float]
    logs: str
    events: list[dict[str, Any]]


def watch_rotations(
    cfg: Path,
    env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
    admin: servers.MotoAdmin,
    consumer: Consumer,
    metrics_port: int,
    rotations: int,
) -> Rotations:
    """Run the daemon on ``cfg`` (stdout.log and stderr.log beside it) with ``consumer`` and an
    observer of the user's keys until the consumer saw ``rotations`` rotations and the observer as
    many old keys deleted; scrape /metrics, stop both threads, then SIGTERM the daemon, which must
    exit 0."""
    out, err = cfg.with_name("stdout.log"), cfg.with_name("stderr.log")
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "rotator", "run", "-c", str(cfg)],
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=cfg.parent,
        )
    started.append(process)
    observer = Observer(admin)
    threads = [threading.Thread(target=t.run, daemon=True) for t in (consumer, observer)]
    for thread in threads:
        thread.start()
    try:
        wait_for(
            lambda: len(consumer.key_ids) >= rotations + 1 and len(observer.deleted) >= rotations,
            timeout=120,
            what=f"{rotations} rotations seen by the consumer and {rotations} old keys deleted",
            process=process,
        )
        metrics = scrape(metrics_port)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\nconsumer saw {consumer.key_ids}, observer {observer.history}"
            f"\ndaemon log tail:\n{err.read_text()[-4000:]}"
        ) from None
    finally:
        consumer.stop.set()
        observer.stop.set()
        for thread in threads:
            thread.join(timeout=10)

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0, err.read_text()[-3000:]
    events = [json.loads(line) for line in err.read_text().splitlines() if line.startswith("{")]
    return Rotations(consumer, observer, metrics, out.read_text() + err.read_text(), events)


def assert_rotated_cleanly(run: Rotations, rotations: int, secrets: set[str]) -> None:
    """The checks every :func:`watch_rotations` run must pass: no consumer failure, at most two
    keys, each old key deactivated before its deletion, a new key every rotation, clean metrics,
    no secret (the published ones and ``secrets``) in the logs, pass summaries (of the one
    target) and the daemon_stopped event in them."""
    consumer, observer, metrics = run.consumer, run.observer, run.metrics
    assert consumer.failures == [], consumer.failures
    assert consumer.uses >= 10, consumer.uses
    assert observer.max_keys <= 2, observer.max_keys
    for key_id in observer.deleted:
        assert observer.history[key_id][-1] == "Inactive", (key_id, observer.history[key_id])
        assert "Active" in observer.history[key_id], (key_id, observer.history[key_id])
    assert len(set(consumer.key_ids)) == len(consumer.key_ids), consumer.key_ids  # new keys

    target = 'target="monitoring"'
    successes = metrics[f'rotator_rotations_total{{result="success",{target}}}']
    assert successes >= rotations + 1, successes  # the first key counts as a rotation
    assert metrics[f'rotator_rotations_total{{result="failure",{target}}}'] == 0, metrics
    assert metrics[f"rotator_foreign_keys{{{target}}}"] == 0, metrics
    assert metrics[f"rotator_blocked{{{target}}}"] == 0, metrics
    assert 0 <= metrics[f"rotator_key_age_seconds{{{target}}}"] < 30, metrics
    assert metrics[f'rotator_access_keys{{status="active",{target}}}'] >= 1, metrics
    assert metrics[f"rotator_last_pass_success_timestamp_seconds{{{target}}}"] > time.time() - 30

    assert consumer.secrets
    for secret in consumer.secrets | secrets:
        assert secret not in run.logs  # no message: it would print the secret
    # botocore logs each request's SigV4 signature at debug level: masked, every one
    assert '"logger": "botocore.auth"' in run.logs
    assert not re.search(r"(?i)signature[\"']?\s*[:=]\s*(?:\\n)?\s*[0-9a-f]{64}", run.logs)
    summaries = [e for e in run.events if e.get("event") == "pass_summary"]
    assert summaries and all(e["target"] == "monitoring" for e in summaries), summaries
    assert any(e.get("event") == "daemon_stopped" for e in run.events)


@pytest.fixture
def daemon_env() -> dict[str, str]:
    """The environment for a daemon process: no AWS_ or VAULT_ variables leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VAULT_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; any still running at the end is killed (by its PID)."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
