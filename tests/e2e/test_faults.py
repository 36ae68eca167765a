"""Fault injection against the daemon and the CLI as processes (moto with auth enforced, OpenBao).

Each test either covers a fault class the other e2e tests do not (kill -9 at every step of a
rotation, Vault dying under a running daemon, a narrow EIM admin policy, a metrics port already
taken); two began as strict xfails reproducing bugs since fixed (the credentials file re-read,
the status of a failing target).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import hvac
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.support import servers
from tests.support.crashkit import keys_of, run_cli, start_daemon
from tests.support.harness import daemon_env, scrape, started, wait_for, write_config

__all__ = ["daemon_env", "started"]  # fixtures used by name

RW_POLICY = """
path "{mount}/*" {{ capabilities = ["create", "read", "update", "list", "delete"] }}
path "sys/mounts/{mount}" {{ capabilities = ["read"] }}
path "sys/internal/ui/mounts/{mount}" {{ capabilities = ["read"] }}
"""
RO_POLICY = """
path "{mount}/*" {{ capabilities = ["read", "list"] }}
path "sys/mounts/{mount}" {{ capabilities = ["read"] }}
path "sys/internal/ui/mounts/{mount}" {{ capabilities = ["read"] }}
"""


def http_status(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def set_info_level(cfg: Path) -> None:
    cfg.write_text(cfg.read_text().replace("level: debug", "level: info"))


def quiet_config(
    tmp_path: Path, iam_admin: servers.MotoAdmin, vault: Any, **kw: Any
) -> tuple[Path, int]:
    """A config with info logs on a free metrics port (``kw`` for write_config): path, port."""
    port = servers.free_port()
    cfg = write_config(tmp_path, iam_admin, vault, port, **kw)
    set_info_level(cfg)
    return cfg, port


@dataclass
class Launch:
    """Starts ``rotator run`` on a config, its output appended to ``log``; what it starts goes to
    ``started`` (killed at the end of the test if still running)."""

    env: dict[str, str]
    started: list[subprocess.Popen[bytes]]
    log: Path

    def __call__(self, cfg: Path) -> subprocess.Popen[bytes]:
        return start_daemon(cfg, self.env, self.started, self.log).process


@pytest.fixture
def launch(
    tmp_path: Path, daemon_env: dict[str, str], started: list[subprocess.Popen[bytes]]
) -> Launch:
    return Launch(daemon_env, started, tmp_path / "daemon.log")


def last_success(port: int) -> float:
    """When the daemon last finished a pass of the target without an error (0 if never)."""
    return scrape(port).get('rotator_last_pass_success_timestamp_seconds{target="monitoring"}', 0.0)


# --- kill -9 at every step of a rotation ---------------------------------------------------------


@dataclass
class Checker:
    """A consumer that uses the published key against moto, and checks the invariants as it goes."""

    admin: servers.MotoAdmin
    vault: Any
    problems: list[str] = field(default_factory=list)
    uses: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(0.2):
            data = self.vault.read_raw("monitoring/watcher_1")
            if not data:
                continue
            key_id, secret = data["access_key_id"], data["secret_access_key"]
            ec2 = boto3.client(
                "ec2",
                endpoint_url=self.admin.endpoint,
                region_name=self.admin.region,
                aws_access_key_id=key_id,
                aws_secret_access_key=secret,
                config=Config(retries={"total_max_attempts": 1}),
            )
            try:
                ec2.describe_regions()
                self.uses += 1
            except ClientError as exc:
                self.problems.append(f"published {key_id}: {exc.response['Error']['Code']}")
            keys = keys_of(self.admin)
            if len(keys) > 2:
                self.problems.append(f"more than 2 keys: {keys}")
            now = self.vault.read_raw("monitoring/watcher_1")
            # moto accepts Inactive keys, so check the status of the published key directly
            if now and now["access_key_id"] == key_id and keys.get(key_id) != "Active":
                self.problems.append(f"published {key_id} is {keys.get(key_id)} in IAM")


KILL_AT = (
    "key_created",  # after CreateAccessKey, before the pending key is stored
    "key_verification",  # verified, before the publish
    "key_published",  # published, before the state write that promotes it
    "key_deactivated",
    "key_deleted",
    "identity_changed",
)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_at_every_rotation_step_keeps_the_published_key_working_and_leaks_no_key(
    tmp_path: Path, iam_admin: servers.MotoAdmin, vault: Any, launch: Launch
) -> None:
    cfg, port = quiet_config(tmp_path, iam_admin, vault)
    # a killed holder's lease must not make every restart wait the default 15s
    cfg.write_text(
        cfg.read_text().replace(
            "  state_path: rotator\n", "  state_path: rotator\n  lock_ttl: 3s\n"
        )
    )
    log = launch.log
    checker = Checker(iam_admin, vault)
    thread = threading.Thread(target=checker.run, daemon=True)
    thread.start()
    hits: dict[str, int] = {}
    try:
        for round_number in range(2):
            for event in KILL_AT:
                process = subprocess.Popen(
                    [sys.executable, "-m", "rotator", "run", "-c", str(cfg)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env=launch.env,
                    cwd=tmp_path,
                )
                launch.started.append(process)
                assert process.stderr is not None
                deadline = time.monotonic() + 30
                with log.open("ab") as sink:
                    for line in process.stderr:
                        sink.write(line)
                        if f'"event": "{event}"'.encode() in line:
                            process.kill()
                            hits[event] = hits.get(event, 0) + 1
                            break
                        if time.monotonic() > deadline:
                            break
                process.kill()
                process.wait(timeout=10)
                process.stderr.close()
                assert checker.problems == [], (round_number, event, checker.problems)
        # settle: one daemon left alone for a full cycle, then stopped cleanly
        process = launch(cfg)
        wait_for(
            lambda: (
                http_status(port, "/healthz") == 200
                and (state := vault.read_raw("rotator/targets/monitoring")) is not None
                and state.get("pending") is None
                and state.get("intent") is None
                and set(keys_of(iam_admin))
                <= {state["current"]["key_id"]} | {r["key_id"] for r in state["retiring"]}
            ),
            timeout=60,
            what="a settled state tracking every key in IAM",
            process=process,
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        checker.stop.set()
        thread.join(timeout=10)
    assert checker.problems == [], checker.problems
    assert checker.uses > 20
    assert hits.get("key_created", 0) >= 1 and hits.get("key_published", 0) >= 1, hits
    published = vault.read_raw("monitoring/watcher_1")
    state = vault.read_raw("rotator/targets/monitoring")
    assert published is not None and state is not None
    assert state["current"]["key_id"] == published["access_key_id"]
    tracked = {state["current"]["key_id"]} | {r["key_id"] for r in state["retiring"]}
    assert set(keys_of(iam_admin)) <= tracked, (keys_of(iam_admin), state)
    assert "Traceback" not in log.read_text()


# --- Vault dies under a running daemon ------------------------------------------------------------


@pytest.mark.timeout(180)
def test_vault_dying_under_the_daemon_freezes_iam_fails_readiness_counts_errors_exits_0(
    tmp_path: Path, iam_admin: servers.MotoAdmin, launch: Launch
) -> None:
    bao = servers.OpenBaoServer(tmp_path / "bao")
    bao.start()
    try:
        # the dev server's own KV v2 mount, on a server this test may stop
        fixture = SimpleNamespace(address=bao.address, root_token=bao.root_token, mount="secret")
        cfg, port = quiet_config(tmp_path, iam_admin, fixture)
        process = launch(cfg)
        root = hvac.Client(url=bao.address, token=bao.root_token)

        def published() -> bool:
            try:
                root.secrets.kv.v2.read_secret_version(
                    path="monitoring/watcher_1", mount_point="secret", raise_on_deleted_version=True
                )
            except hvac.exceptions.InvalidPath:
                return False
            return http_status(port, "/readyz") == 200

        wait_for(published, timeout=60, what="a published key and ready", process=process)
        bao.stop()
        before = keys_of(iam_admin)

        def vault_errors() -> float:
            return scrape(port).get(
                'rotator_errors_total{component="vault",target="monitoring"}', 0.0
            )

        errors_at_stop = vault_errors()
        wait_for(lambda: http_status(port, "/readyz") == 503, 40, "readyz 503", process)
        # the max_age of 6s passes twice over while Vault is gone: IAM must not move
        deadline = time.monotonic() + 14
        while time.monotonic() < deadline:
            assert keys_of(iam_admin) == before
            time.sleep(0.5)  # sampling IAM over a period of time, not a synchronisation
        assert vault_errors() > errors_at_stop
        assert http_status(port, "/healthz") == 200
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        bao.stop()
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()


# --- the rotator's own EIM permissions ------------------------------------------------------------

# The policy shipped for the rotator's own user (deploy/policies/eim-rotator.json).
NEEDED = [
    action
    for statement in json.loads(
        (Path(__file__).parents[2] / "deploy/policies/eim-rotator.json").read_text()
    )["Statement"]
    for action in statement["Action"]
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("missing", ["iam:CreateAccessKey", "iam:ListAccessKeys", "iam:CreateUser"])
def test_once_with_an_admin_lacking_a_permission_exits_1_naming_the_action_without_traceback(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    vault: Any,
    daemon_env: dict[str, str],
    missing: str,
) -> None:
    client = iam_admin.client()
    client.create_user(UserName="narrow")
    allowed = [a for a in NEEDED if a != missing]
    client.put_user_policy(
        UserName="narrow",
        PolicyName="narrow",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": allowed, "Resource": "*"}],
            }
        ),
    )
    key = client.create_access_key(UserName="narrow")["AccessKey"]
    cfg = write_config(tmp_path, iam_admin, vault, servers.free_port())
    (tmp_path / "eim-credentials").write_text(
        f"aws_access_key_id = {key['AccessKeyId']}\n"
        f"aws_secret_access_key = {key['SecretAccessKey']}\n"
    )
    result = run_cli(cfg, daemon_env, "run", "--once")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert missing in result.stdout
    assert "Traceback" not in output
    assert key["SecretAccessKey"] not in output
    assert keys_of(iam_admin) == {}  # no key was made (or one was cleaned up)


@pytest.mark.timeout(90)
def test_run_once_warns_of_a_mount_that_keeps_one_version_as_the_daemon_does(
    tmp_path: Path, iam_admin: servers.MotoAdmin, vault: Any, daemon_env: dict[str, str]
) -> None:
    # a run --once from cron is the whole deployment: only the daemon said it (breaker c05)
    vault.client().secrets.kv.v2.configure(mount_point=vault.mount, max_versions=1)
    cfg, _ = quiet_config(tmp_path, iam_admin, vault, max_age="1h")

    result = run_cli(cfg, daemon_env, "run", "--once")

    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [
        json.loads(line)
        for line in result.stderr.splitlines()
        if line.startswith("{") and '"config_warning"' in line
    ]
    assert any("max_versions" in w["warning"] for w in warnings), result.stderr


# --- metrics port taken ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_run_with_the_metrics_port_taken_exits_2_with_one_line_naming_metrics_listen(
    tmp_path: Path, iam_admin: servers.MotoAdmin, vault: Any, daemon_env: dict[str, str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        # verify_timeout long enough for a second attempt: no config_warning before the error
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path, iam_admin, vault, port, max_age="1h", verify_timeout="10s")
        set_info_level(cfg)
        result = run_cli(cfg, daemon_env, "run")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "metrics.listen" in lines[0], lines
    assert "is another rotator, or its demo, running?" in lines[0]
    assert vault.read_raw("monitoring/watcher_1") is None  # nothing ran


# --- a Vault token that can read but not write ------------------------------------------------


def _token(vault: Any, name: str, hcl: str) -> str:
    token: str = vault.token_with_policy(name, hcl.format(mount=vault.mount))
    return token


@pytest.mark.timeout(90)
def test_read_only_vault_token_makes_no_iam_change_on_a_new_target(
    tmp_path: Path, iam_admin: servers.MotoAdmin, vault: Any, daemon_env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, iam_admin, vault, servers.free_port())
    (tmp_path / "vault-token").write_text(_token(vault, f"ro-{vault.mount}", RO_POLICY) + "\n")
    result = run_cli(cfg, daemon_env, "run", "--once")
    assert result.returncode == 1
    assert f"denied `create` on `{vault.mount}/data/rotator/" in result.stdout, result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    client = iam_admin.client()
    with pytest.raises(ClientError):
        client.get_user(UserName="watcher_1")
    assert [g["GroupName"] for g in client.list_groups()["Groups"]] == []


@pytest.mark.timeout(90)
def test_read_only_vault_token_does_not_deactivate_a_retiring_key(
    tmp_path: Path, iam_admin: servers.MotoAdmin, vault: Any, daemon_env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, iam_admin, vault, servers.free_port(), max_age="1h")
    assert run_cli(cfg, daemon_env, "run", "--once").returncode == 0
    assert run_cli(cfg, daemon_env, "rotate", "monitoring").returncode == 0
    state = vault.read_raw("rotator/targets/monitoring")
    assert state is not None
    [retiring] = state["retiring"]
    retire_at = datetime_seconds(retiring["retire_at"])
    wait_for(lambda: time.time() > retire_at + 0.5, 10, "the grace period to end")
    (tmp_path / "vault-token").write_text(_token(vault, f"ro-{vault.mount}", RO_POLICY) + "\n")
    result = run_cli(cfg, daemon_env, "run", "--once")
    assert result.returncode == 1
    assert f"on `{vault.mount}/data/rotator/" in result.stdout, result.stdout
    assert keys_of(iam_admin)[retiring["key_id"]] == "Active"


def datetime_seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --- the Vault token file rotated under a running daemon ----------------------------------------


@pytest.mark.timeout(120)
def test_daemon_picks_up_a_rotated_vault_token_file_without_a_restart(
    tmp_path: Path, iam_admin: servers.MotoAdmin, vault: Any, launch: Launch
) -> None:
    cfg, port = quiet_config(tmp_path, iam_admin, vault, max_age="1h")
    first = _token(vault, f"rw-{vault.mount}", RW_POLICY)
    second = vault.client().auth.token.create(policies=[f"rw-{vault.mount}"])["auth"][
        "client_token"
    ]
    (tmp_path / "vault-token").write_text(first + "\n")
    process = launch(cfg)
    wait_for(lambda: http_status(port, "/readyz") == 200, 60, "ready", process)
    replacement = tmp_path / "vault-token.new"
    replacement.write_text(second + "\n")
    replacement.replace(tmp_path / "vault-token")  # the way credential files are rotated
    vault.client().auth.token.revoke(first)
    changed = time.time()
    wait_for(
        lambda: last_success(port) > changed + 1 and http_status(port, "/readyz") == 200,
        40,
        "a successful pass with the new token",
        process,
    )


# --- bugs -----------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_daemon_picks_up_a_rotated_eim_credentials_file_without_a_restart(
    tmp_path: Path, iam_admin: servers.MotoAdmin, vault: Any, launch: Launch
) -> None:
    cfg, port = quiet_config(tmp_path, iam_admin, vault, max_age="1h")
    process = launch(cfg)
    wait_for(lambda: vault.read_raw("monitoring/watcher_1") is not None, 60, "a key", process)
    client = iam_admin.client()
    new = client.create_access_key(UserName=iam_admin.user)["AccessKey"]
    replacement = tmp_path / "eim-credentials.new"
    replacement.write_text(
        f"aws_access_key_id = {new['AccessKeyId']}\n"
        f"aws_secret_access_key = {new['SecretAccessKey']}\n"
    )
    replacement.replace(tmp_path / "eim-credentials")
    iam_admin.client(new["AccessKeyId"], new["SecretAccessKey"]).delete_access_key(
        UserName=iam_admin.user, AccessKeyId=iam_admin.access_key_id
    )
    changed = time.time()
    wait_for(
        lambda: last_success(port) > changed + 1,
        40,
        "a successful pass with the new admin key",
        process,
    )


@pytest.mark.timeout(90)
def test_status_exits_1_and_shows_the_problem_of_a_target_whose_user_does_not_exist(
    tmp_path: Path, iam_admin: servers.MotoAdmin, vault: Any, daemon_env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, iam_admin, vault, servers.free_port(), max_age="1h")
    text = cfg.read_text()
    start = text.index("    group: monitoring")
    end = text.index("    secret_path:")
    cfg.write_text(text[:start] + text[end:])  # no group: the user is managed elsewhere
    once = run_cli(cfg, daemon_env, "run", "--once")
    assert once.returncode == 1 and "watcher_1 does not exist" in once.stdout, once.stdout
    status = run_cli(cfg, daemon_env, "status")
    assert status.returncode == 1, status.stdout
    assert "does not exist" in status.stdout, status.stdout
