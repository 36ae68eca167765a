"""The peer: PyPI ``iam-credential-rotation`` rotating keys on the same moto server.

What it is (0.2.2, Thoughtworks DPS): a click command ``iam-credential-rotation PATH`` that, for
the IAM users under ``/PATH/`` (20 at most, else it refuses), lists each user's keys, deletes the
oldest if there are two, creates a new one and prints the new keys as JSON. It checks its
credentials with sts:GetCallerIdentity first. It does not verify the new key, does not publish it
anywhere, and works on one user at a time. It takes no endpoint option: boto3 (>= 1.28) reads
``AWS_ENDPOINT_URL`` from the environment, which points it at moto.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support import servers

PER_PATH = 20  # the peer refuses more users than this on one path


@dataclass(frozen=True)
class PeerResult:
    users: int
    paths: int
    seconds: float  # wall time of all its invocations, one after the other
    startup_seconds: float  # one `iam-credential-rotation --version`
    keys_rotated: int
    error: str | None = None

    @property
    def per_key(self) -> float:
        return self.seconds / max(1, self.keys_rotated)


def binary() -> str | None:
    beside = Path(sys.executable).parent / "iam-credential-rotation"
    return str(beside) if beside.exists() else shutil.which("iam-credential-rotation")


def setup_users(admin: servers.MotoAdmin, count: int, tag: str) -> list[str]:
    """``count`` users spread over paths of at most 20, each with one key; the path names."""
    client = admin.client()
    paths = []
    for index in range(count):
        path = f"peer-{tag}-{index // PER_PATH:03d}"
        if not paths or paths[-1] != path:
            paths.append(path)
        user = f"peer-{tag}-{index:04d}"
        client.create_user(UserName=user, Path=f"/{path}/")
        client.create_access_key(UserName=user)
    return paths


def run(admin: servers.MotoAdmin, count: int, tag: str, workdir: Path) -> PeerResult:
    exe = binary()
    if exe is None:
        return PeerResult(count, 0, 0.0, 0.0, 0, "iam-credential-rotation is not installed")
    paths = setup_users(admin, count, tag)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=admin.endpoint,
        AWS_ACCESS_KEY_ID=admin.access_key_id,
        AWS_SECRET_ACCESS_KEY=admin.secret_access_key,
        AWS_DEFAULT_REGION=admin.region,
        AWS_CONFIG_FILE=str(workdir / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(workdir / "no-aws-credentials"),
    )
    started = time.perf_counter()
    subprocess.run([exe, "--version"], env=env, check=True, capture_output=True)
    startup = time.perf_counter() - started
    rotated = 0
    started = time.perf_counter()
    for path in paths:
        done = subprocess.run([exe, path], env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            return PeerResult(
                count,
                len(paths),
                time.perf_counter() - started,
                startup,
                rotated,
                f"exit {done.returncode} on {path}: {done.stderr.strip()[-300:]}",
            )
        rotated += done.stdout.count('"AccessKeyId"')
    return PeerResult(count, len(paths), time.perf_counter() - started, startup, rotated)
