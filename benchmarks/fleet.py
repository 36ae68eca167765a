"""The benchmark fleet: servers on loopback and a rotator config of N targets.

Every target has its own user, all in one group ``monitoring`` with one policy (the shape of
OUTSCALE's "Managing Access for Cloud Automation" tutorial, as tests/support/harness.py writes
it), default timings (max_age 30d, grace 24h), so after the first key nothing is due.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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


def target_name(n: int) -> str:
    return f"t{n:04d}"


def user_of(target: str) -> str:
    return f"user-{target}"


def secret_path_of(target: str) -> str:
    return f"fleet/{target}"


@dataclass
class Servers:
    """moto (auth enforced) and OpenBao, started by this process and stopped by their PIDs."""

    moto: servers.MotoServer
    bao: servers.OpenBaoServer
    admin: servers.MotoAdmin | None = None

    @classmethod
    def start(cls, workdir: Path) -> Servers:
        moto = servers.MotoServer(log_path=workdir / "moto.log")
        bao = servers.OpenBaoServer(workdir / "bao-home")
        moto.start()
        try:
            bao.start()
        except BaseException:
            moto.stop()
            raise
        return cls(moto, bao)

    def fresh(self) -> servers.MotoAdmin:
        """Wipe IAM and create the admin (Vault paths are per size, see ``write_config``)."""
        self.admin = self.moto.bootstrap_admin()
        return self.admin

    def stop(self) -> None:
        self.moto.stop()
        self.bao.stop()


def write_config(
    directory: Path,
    srv: Servers,
    count: int,
    *,
    workers: int,
    state_path: str,
    check_interval: str = "5m",
    metrics_port: int = 0,
) -> Path:
    """A rotator config for ``count`` targets; ``state_path`` keeps sizes apart in one Vault."""
    assert srv.admin is not None
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "eim-credentials").write_text(
        f"aws_access_key_id = {srv.admin.access_key_id}\n"
        f"aws_secret_access_key = {srv.admin.secret_access_key}\n"
    )
    (directory / "vault-token").write_text(srv.bao.root_token + "\n")
    (directory / "policy.json").write_text(json.dumps(POLICY_DOC))
    targets = "".join(
        f"""
  - name: {name}
    user: {user_of(name)}
    group: monitoring
    policy:
      name: monitoring
      description: Allow describe for every item
      document_file: policy.json
    secret_path: {state_path}-pub/{secret_path_of(name)}"""
        for name in (target_name(n) for n in range(count))
    )
    path = directory / "rotator.yaml"
    path.write_text(
        f"""eim:
  provider: outscale
  region: {srv.admin.region}
  endpoint: {srv.moto.endpoint}
  credentials_file: eim-credentials
vault:
  address: {srv.bao.address}
  auth:
    method: token
    token_file: vault-token
  mount: secret
  state_path: {state_path}
defaults:
  check_interval: {check_interval}
targets:{targets}
workers: {workers}
metrics:
  listen: 127.0.0.1:{metrics_port or servers.free_port()}
logging:
  format: json
  level: info
"""
    )
    return path
