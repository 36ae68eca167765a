"""deploy/policies: rotator runs with only its policies; a consumer reads only its secret.

Against the real servers: OpenBao (Vault) with tokens made from the HCL files, and moto's IAM
server with authentication enforced, where rotator's own user holds only eim-rotator.json.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import hvac
import pytest

from tests.deploy import tools
from tests.support import servers

POLICIES = tools.DEPLOY / "policies"
EIM_ADAPTER = tools.ROOT / "rotator" / "adapters" / "eim.py"
SECRET_PATH = "monitoring/watcher_1"  # the example target's, as written in the HCL files
TARGET_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["ec2:Describe*"], "Resource": ["*"]}],
}


def _hcl_for_mount(name: str, mount: str) -> str:
    """The HCL file with its mount "secret" replaced by this test's mount."""
    text = (POLICIES / name).read_text()
    assert '"secret/data/' in text
    if name == "rotator.hcl":
        assert "sys/internal/ui/mounts/secret" in text
    text = text.replace('"secret/', f'"{mount}/')
    return text.replace("sys/internal/ui/mounts/secret", f"sys/internal/ui/mounts/{mount}")


def _eim_user_with_policy(iam: servers.MotoAdmin) -> tuple[str, str]:
    """An IAM user holding only deploy/policies/eim-rotator.json; its (key id, secret)."""
    admin = iam.client()
    admin.create_user(UserName="rotator")
    admin.put_user_policy(
        UserName="rotator",
        PolicyName="rotator",
        PolicyDocument=(POLICIES / "eim-rotator.json").read_text(),
    )
    key = admin.create_access_key(UserName="rotator")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def _write_config(tmp_path: Path, iam: servers.MotoAdmin, vault: Any, token: str) -> Path:
    key_id, secret = _eim_user_with_policy(iam)
    (tmp_path / "eim-credentials").write_text(
        f"aws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"
    )
    (tmp_path / "vault-token").write_text(token + "\n")
    (tmp_path / "monitoring.json").write_text(json.dumps(TARGET_POLICY))
    cfg = tmp_path / "rotator.yaml"
    cfg.write_text(
        f"""
eim:
  region: {iam.region}
  endpoint: {iam.endpoint}
  credentials_file: credential:eim-credentials
  max_attempts: 2
vault:
  address: {vault.address}
  auth:
    method: token
    token_file: credential:vault-token
  mount: {vault.mount}
  state_path: rotator
defaults:
  check_interval: 1m
  max_age: 1h
  grace: 1m
  inactive_period: 1m
  verify_timeout: 20s
targets:
  - name: monitoring
    user: watcher_1
    group: monitoring
    policy:
      name: monitoring
      document_file: monitoring.json
    secret_path: {SECRET_PATH}
logging:
  format: json
  level: info
"""
    )
    return cfg


def _rotator(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # CREDENTIALS_DIRECTORY as systemd's LoadCredential= sets it: the config names credentials.
    env = {"PATH": "/usr/bin:/bin", "CREDENTIALS_DIRECTORY": str(cfg.parent)}
    return subprocess.run(
        [sys.executable, "-m", "rotator", *args, "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        env=env,
        cwd=tools.ROOT,
    )


def test_eim_policy_allows_exactly_the_calls_the_adapter_makes() -> None:
    source = EIM_ADAPTER.read_text()
    calls = set(re.findall(r"self\._(?:once_)?client\.([a-z_]+)\(", source))
    calls |= set(re.findall(r'get_paginator\("([a-z_]+)"\)', source))
    calls -= {"get_paginator"}
    wanted = {"iam:" + "".join(part.title() for part in call.split("_")) for call in calls}
    document = json.loads((POLICIES / "eim-rotator.json").read_text())
    allowed = {a for s in document["Statement"] for a in s["Action"] if s["Effect"] == "Allow"}
    assert allowed == wanted
    assert all(s["Resource"] == ["*"] for s in document["Statement"])


def test_rotator_runs_with_only_its_vault_and_eim_policies(
    tmp_path: Path, vault: Any, iam_admin: servers.MotoAdmin
) -> None:
    token = vault.token_with_policy(
        f"rotator-{vault.mount}",
        _hcl_for_mount("rotator.hcl", vault.mount),
        no_default_policy=True,
        ttl="1h",
    )
    cfg = _write_config(tmp_path, iam_admin, vault, token)

    first = _rotator(cfg, "run", "--once")
    assert first.returncode == 0, first.stdout + first.stderr
    # the list of the targets' states (removed or renamed targets) is granted too
    assert "unconfigured_check_failed" not in first.stdout + first.stderr
    published = vault.read_raw(SECRET_PATH)
    assert published is not None and published["access_key_id"].startswith(("AKIA", "ASIA"))
    assert vault.read_raw("rotator/targets/monitoring") is not None

    # A changed policy document (CreatePolicyVersion) and a forced rotation (state, lock,
    # check-and-set over an existing secret): still nothing beyond the two policies.
    (tmp_path / "monitoring.json").write_text(
        json.dumps({**TARGET_POLICY, "Statement": [{**TARGET_POLICY["Statement"][0], "Sid": "V2"}]})
    )
    second = _rotator(cfg, "rotate", "monitoring")
    assert second.returncode == 0, second.stdout + second.stderr
    rotated = vault.read_raw(SECRET_PATH)
    assert rotated is not None and rotated["access_key_id"] != published["access_key_id"]
    status = _rotator(cfg, "status")
    assert status.returncode == 0, status.stdout + status.stderr


def test_rotator_policy_is_needed_a_token_without_it_fails(
    tmp_path: Path, vault: Any, iam_admin: servers.MotoAdmin
) -> None:
    """The run above proves something: with the state path missing from the policy it fails."""
    hcl = _hcl_for_mount("rotator.hcl", vault.mount)
    crippled = hcl.replace(f'"{vault.mount}/data/rotator/*"', f'"{vault.mount}/data/elsewhere/*"')
    assert crippled != hcl
    token = vault.token_with_policy(f"crippled-{vault.mount}", crippled, no_default_policy=True)
    cfg = _write_config(tmp_path, iam_admin, vault, token)
    result = _rotator(cfg, "run", "--once")
    assert result.returncode == 1
    assert "403" in result.stdout + result.stderr or "denied" in (result.stdout + result.stderr)
    assert vault.read_raw(SECRET_PATH) is None


def test_consumer_reads_the_published_secret_and_is_refused_the_state(vault: Any) -> None:
    root = vault.client()
    root.secrets.kv.v2.create_or_update_secret(
        path=SECRET_PATH, secret={"access_key_id": "AKIAEXAMPLE"}, mount_point=vault.mount
    )
    root.secrets.kv.v2.create_or_update_secret(
        path="rotator/targets/monitoring", secret={"schema": 1}, mount_point=vault.mount
    )
    token = vault.token_with_policy(
        f"consumer-{vault.mount}", _hcl_for_mount("consumer.hcl", vault.mount)
    )
    consumer = vault.client(token)
    answer = consumer.secrets.kv.v2.read_secret_version(
        path=SECRET_PATH, mount_point=vault.mount, raise_on_deleted_version=True
    )
    assert answer["data"]["data"]["access_key_id"] == "AKIAEXAMPLE"
    for path in ("rotator/targets/monitoring", "rotator/locks/monitoring", "other/secret"):
        with pytest.raises(hvac.exceptions.Forbidden):
            consumer.secrets.kv.v2.read_secret_version(
                path=path, mount_point=vault.mount, raise_on_deleted_version=True
            )
    with pytest.raises(hvac.exceptions.Forbidden):
        consumer.secrets.kv.v2.create_or_update_secret(
            path=SECRET_PATH, secret={"access_key_id": "stolen"}, mount_point=vault.mount
        )
