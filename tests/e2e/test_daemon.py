"""The daemon as a process, against moto's IAM server (authentication enforced) and OpenBao.

Second-scale timings drive it through several rotations while a consumer reads Vault every half
second and uses what it reads against the IAM server, and an observer lists the user's keys.
"""

from __future__ import annotations

import json
import os
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

ROTATIONS = 3
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


def write_config(
    tmp_path: Path,
    iam: servers.MotoAdmin,
    vault: Any,
    metrics_port: int,
    *,
    check_interval: str = "1s",
    max_age: str = "6s",
) -> Path:
    creds = tmp_path / "eim-credentials"
    creds.write_text(
        f"aws_access_key_id = {iam.access_key_id}\n"
        f"aws_secret_access_key = {iam.secret_access_key}\n"
    )
    token = tmp_path / "vault-token"
    token.write_text(vault.root_token + "\n")
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "monitoring.json").write_text(json.dumps(POLICY_DOC))
    cfg = tmp_path / "rotator.yaml"
    cfg.write_text(
        f"""
eim:
  provider: outscale
  region: {iam.region}
  endpoint: {iam.endpoint}
  credentials_file: eim-credentials
  max_attempts: 2
  connect_timeout: 2s
  read_timeout: 5s
vault:
  address: {vault.address}
  auth:
    method: token
    token_file: vault-token
  mount: {vault.mount}
  state_path: rotator
defaults:
  check_interval: {check_interval}
  max_age: {max_age}
  grace: 2s
  inactive_period: 2s
  verify_timeout: 4s
  identity_check_interval: 1m
targets:
  - name: monitoring
    user: watcher_1
    group: monitoring
    policy:
      name: monitoring
      description: Allow describe for every item
      document_file: policies/monitoring.json
    secret_path: monitoring/watcher_1
workers: 2
metrics:
  listen: 127.0.0.1:{metrics_port}
logging:
  format: json
  level: debug
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


@pytest.fixture
def daemon_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VAULT_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.timeout(180)
def test_daemon_rotates_three_times_without_a_consumer_failure(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    vault: Any,
    daemon_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> None:
    metrics_port = servers.free_port()
    cfg = write_config(tmp_path, iam_admin, vault, metrics_port)
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "rotator", "run", "-c", str(cfg)],
            stdout=stdout,
            stderr=stderr,
            env=daemon_env,
            cwd=tmp_path,
        )
    started.append(process)
    consumer = Consumer(vault, iam_admin.endpoint, iam_admin.region)
    observer = Observer(iam_admin)
    threads = [threading.Thread(target=t.run, daemon=True) for t in (consumer, observer)]
    for thread in threads:
        thread.start()
    try:
        wait_for(
            lambda: len(consumer.key_ids) >= ROTATIONS + 1 and len(observer.deleted) >= ROTATIONS,
            timeout=120,
            what=f"{ROTATIONS} rotations seen by the consumer and {ROTATIONS} old keys deleted",
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
    logs = out.read_text() + err.read_text()

    assert consumer.failures == []
    assert consumer.uses >= 10
    assert observer.max_keys <= 2
    for key_id in observer.deleted:
        assert observer.history[key_id][-1] == "Inactive", (key_id, observer.history[key_id])
        assert "Active" in observer.history[key_id]
    assert len(set(consumer.key_ids)) == len(consumer.key_ids)  # every rotation a new key

    target = 'target="monitoring"'
    rotations = metrics[f'rotator_rotations_total{{result="success",{target}}}']
    assert rotations >= ROTATIONS + 1  # the first key counts as a rotation
    assert metrics[f'rotator_rotations_total{{result="failure",{target}}}'] == 0
    assert metrics[f"rotator_foreign_keys{{{target}}}"] == 0
    assert metrics[f"rotator_blocked{{{target}}}"] == 0
    assert 0 <= metrics[f"rotator_key_age_seconds{{{target}}}"] < 30
    assert metrics[f'rotator_access_keys{{status="active",{target}}}'] >= 1
    assert metrics[f"rotator_last_pass_success_timestamp_seconds{{{target}}}"] > time.time() - 30

    assert consumer.secrets
    for secret in consumer.secrets | {iam_admin.secret_access_key, vault.root_token}:
        assert secret not in logs
    events = [json.loads(line) for line in err.read_text().splitlines() if line.startswith("{")]
    summaries = [e for e in events if e.get("event") == "pass_summary"]
    assert summaries and all(e["target"] == "monitoring" for e in summaries)
    assert any(e.get("event") == "daemon_stopped" for e in events)


def test_once_exits_1_and_names_the_problem_when_vault_is_unreachable(
    tmp_path: Path, iam_admin: servers.MotoAdmin, vault: Any, daemon_env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, iam_admin, vault, servers.free_port())
    dead = f"http://127.0.0.1:{servers.free_port()}"
    cfg.write_text(cfg.read_text().replace(vault.address, dead))
    result = subprocess.run(
        [sys.executable, "-m", "rotator", "run", "--once", "-c", str(cfg)],
        capture_output=True,
        env=daemon_env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert b"unreachable" in result.stdout + result.stderr
    assert b"Traceback" not in result.stdout + result.stderr
    # no IAM change without Vault: the user was never created
    with pytest.raises(ClientError):
        iam_admin.client().get_user(UserName="watcher_1")


def test_bad_config_exits_2_with_one_line_naming_the_key(
    tmp_path: Path, iam_admin: servers.MotoAdmin, vault: Any, daemon_env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, iam_admin, vault, servers.free_port())
    cfg.write_text(cfg.read_text().replace("grace: 2s", "grace: 2 seconds"))
    result = subprocess.run(
        [sys.executable, "-m", "rotator", "check-config", "-c", str(cfg)],
        capture_output=True,
        env=daemon_env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "defaults.grace" in lines[0], lines
    assert result.stdout == b""


def test_once_then_status_and_dry_run(
    tmp_path: Path, iam_admin: servers.MotoAdmin, vault: Any, daemon_env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, iam_admin, vault, servers.free_port(), max_age="1h")

    def rotator(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rotator", *args, "-c", str(cfg)],
            capture_output=True,
            text=True,
            env=daemon_env,
            timeout=60,
            check=False,
        )

    plan = rotator("run", "--once", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "create_user watcher_1" in plan.stdout and "create_key" in plan.stdout
    assert vault.read_raw("monitoring/watcher_1") is None  # the dry run changed nothing

    once = rotator("run", "--once")
    assert once.returncode == 0, once.stderr
    published = vault.read_raw("monitoring/watcher_1")
    assert published is not None and published["access_key_id"] in once.stdout

    status = rotator("status", "--json")
    assert status.returncode == 0, status.stderr
    [row] = json.loads(status.stdout)
    assert row["current_key_id"] == published["access_key_id"]
    assert row["foreign_keys"] == [] and row["pending_key_id"] is None
    assert published["secret_access_key"] not in status.stdout

    table = rotator("status")
    assert table.returncode == 0 and published["access_key_id"] in table.stdout

    forced = rotator("rotate", "monitoring")
    assert forced.returncode == 0, forced.stderr
    republished = vault.read_raw("monitoring/watcher_1")
    assert republished is not None
    assert republished["access_key_id"] != published["access_key_id"]

    unknown = rotator("rotate", "nope")
    assert unknown.returncode == 2 and "unknown target nope" in unknown.stderr


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.timeout(120)
def test_sighup_keeps_the_old_config_when_invalid_and_applies_a_valid_one(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    vault: Any,
    daemon_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> None:
    port = servers.free_port()
    cfg = write_config(tmp_path, iam_admin, vault, port, max_age="1h")
    good = cfg.read_text()
    err = tmp_path / "stderr.log"
    with err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "rotator", "run", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=daemon_env,
        )
    started.append(process)
    wait_for(lambda: vault.read_raw("monitoring/watcher_1"), 30, "the first key", process)
    first = vault.read_raw("monitoring/watcher_1")["access_key_id"]
    assert http_status(port, "/healthz") == 200
    assert http_status(port, "/readyz") == 200

    cfg.write_text(good.replace("max_age: 1h", "max_age: 1 hour"))
    process.send_signal(signal.SIGHUP)
    wait_for(lambda: "config_reload_failed" in err.read_text(), 30, "the failed reload", process)
    assert scrape(port)['rotator_errors_total{component="config",target=""}'] == 1
    assert process.poll() is None

    # a shorter max_age takes effect at once: the key's age counts from its creation date
    cfg.write_text(
        good.replace("max_age: 1h", "max_age: 5s")
        .replace("grace: 2s", "grace: 1s")
        .replace("inactive_period: 2s", "inactive_period: 1s")
        .replace("verify_timeout: 4s", "verify_timeout: 3s")
    )
    process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: (vault.read_raw("monitoring/watcher_1") or {}).get("access_key_id") != first,
        30,
        "a rotation under the reloaded max_age",
        process,
    )
    assert "config_reloaded" in err.read_text()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
