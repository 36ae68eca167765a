"""The lower bound: exactly the calls one correct rotation needs, nothing else, same concurrency.

Per target: ListAccessKeys, read state, read the published secret, CreateAccessKey, write the
pending key (check-and-set), verify (iam:GetUser signed with the new key), publish
(check-and-set), write the final state (check-and-set): 3 IAM calls, 2 Vault reads, 3 Vault
writes. One boto3 client and one hvac client are shared by the worker threads, as rotator shares
its own.

Verification comes in two flavours. The plain bound builds a client with the new key, as a
script would (about 15 ms of CPU on this machine). ``shared_verifier`` uses rotator's technique
instead: one client whose credentials are each thread's key under test, read by botocore's signer
on every request. Against the plain bound the ratio tells what rotator costs next to the obvious
script; against the shared-verifier bound it tells rotator's own overhead (its lease, its intent
marker, its logging and state), libraries used the same way on both sides.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import boto3
import botocore.credentials
import botocore.exceptions
import botocore.session
import hvac
import hvac.exceptions
import requests
from botocore.config import Config

from tests.support import servers

_CONFIG = Config(retries={"mode": "standard", "total_max_attempts": 2}, user_agent_extra="lb")
_VERIFY = Config(retries={"mode": "standard", "total_max_attempts": 1})


class _ThreadKey(botocore.credentials.Credentials):
    """Each thread's key under test (what rotator's adapter does, written again here)."""

    def __init__(self) -> None:
        super().__init__("", "")
        self.local = threading.local()

    def get_frozen_credentials(self) -> botocore.credentials.ReadOnlyCredentials:
        key_id, secret = self.local.key
        return botocore.credentials.ReadOnlyCredentials(key_id, secret, None, None)


class _Only(botocore.credentials.CredentialProvider):
    METHOD = "lb-thread-key"

    def __init__(self, credentials: _ThreadKey) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> _ThreadKey:
        return self._credentials


@dataclass(frozen=True)
class LbTarget:
    user: str
    state_path: str  # KV v2 path (in mount ``secret``) of this script's own state
    secret_path: str  # KV v2 path of the published secret


class LowerBound:
    """One boto3 client and one hvac client, shared by the workers (both are thread-safe)."""

    def __init__(
        self,
        admin: servers.MotoAdmin,
        vault_address: str,
        token: str,
        *,
        shared_verifier: bool = False,
    ) -> None:
        self._admin = admin
        self._session = boto3.Session(
            aws_access_key_id=admin.access_key_id,
            aws_secret_access_key=admin.secret_access_key,
            region_name=admin.region,
        )
        self._iam = self._session.client("iam", endpoint_url=admin.endpoint, config=_CONFIG)
        session = requests.Session()
        session.trust_env = False  # as rotator's: the environment is read once, not per call
        self._vault = hvac.Client(url=vault_address, token=token, session=session)
        self._session_lock = threading.Lock()  # boto3 sessions are not thread-safe
        self._thread_key: _ThreadKey | None = None
        self._probe: Any = None
        if shared_verifier:
            self._thread_key = _ThreadKey()
            verifying = botocore.session.Session()
            verifying.register_component(
                "credential_provider",
                botocore.credentials.CredentialResolver([_Only(self._thread_key)]),
            )
            self._probe = boto3.Session(
                botocore_session=verifying, region_name=admin.region
            ).client("iam", endpoint_url=admin.endpoint, config=_VERIFY)

    def _clients(self) -> tuple[Any, Any, Any]:
        return self._session, self._iam, self._vault

    def _read(self, vault: Any, path: str) -> tuple[dict[str, Any], int]:
        try:
            answer = vault.secrets.kv.v2.read_secret_version(
                path=path, mount_point="secret", raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath:
            return {}, 0
        return answer["data"]["data"], int(answer["data"]["metadata"]["version"])

    def _write(self, vault: Any, path: str, data: dict[str, Any], cas: int) -> int:
        answer = vault.secrets.kv.v2.create_or_update_secret(
            path=path, secret=data, cas=cas, mount_point="secret"
        )
        return int(answer["data"]["version"])

    def rotate(self, target: LbTarget) -> str:
        """One rotation; returns the new key id (raises on any failure)."""
        session, iam, vault = self._clients()
        keys = iam.list_access_keys(UserName=target.user)["AccessKeyMetadata"]
        if len(keys) >= 2:
            raise RuntimeError(f"{target.user}: no free key slot")
        state, state_version = self._read(vault, target.state_path)
        published, published_version = self._read(vault, target.secret_path)
        new = iam.create_access_key(UserName=target.user)["AccessKey"]
        key_id, secret = new["AccessKeyId"], new["SecretAccessKey"]
        created = datetime.now(UTC).isoformat()
        pending = {**state, "pending": {"key_id": key_id, "secret": secret, "created": created}}
        state_version = self._write(vault, target.state_path, pending, state_version)
        self._verify(session, key_id, secret)
        self._write(
            vault,
            target.secret_path,
            {
                **published,
                "access_key_id": key_id,
                "secret_access_key": secret,
                "created_at": created,
            },
            published_version,
        )
        final = {k: v for k, v in pending.items() if k != "pending"}
        final["current"] = {"key_id": key_id, "created": created}
        final["retiring"] = [k["AccessKeyId"] for k in keys]
        self._write(vault, target.state_path, final, state_version)
        return key_id

    def _verify(self, session: Any, key_id: str, secret: str) -> None:
        """GetUser signed with the new key; AccessDenied means it authenticated."""
        if self._thread_key is not None:
            probe, close = self._probe, False
            self._thread_key.local.key = (key_id, secret)
        else:
            with self._session_lock:
                probe = session.client(
                    "iam",
                    endpoint_url=self._admin.endpoint,
                    aws_access_key_id=key_id,
                    aws_secret_access_key=secret,
                    config=_VERIFY,
                )
            close = True
        try:
            probe.get_user()
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "AccessDenied":
                raise
        finally:
            if close:
                probe.close()
            if self._thread_key is not None:
                self._thread_key.local.key = None

    def observe(self, target: LbTarget) -> int:
        """What an idle pass cannot do without: list the keys, read the state and the secret."""
        _, iam, vault = self._clients()
        keys = iam.list_access_keys(UserName=target.user)["AccessKeyMetadata"]
        self._read(vault, target.state_path)
        self._read(vault, target.secret_path)
        return len(keys)

    def idle(self, targets: list[LbTarget], workers: int) -> tuple[float, float]:
        """The idle floor: ``observe`` every target; (wall seconds, this process's CPU seconds)."""
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lb") as pool:
            started, cpu = time.perf_counter(), time.process_time()
            list(pool.map(self.observe, targets))
            return time.perf_counter() - started, time.process_time() - cpu

    def run(self, targets: list[LbTarget], workers: int) -> tuple[float, list[str]]:
        """Rotate every target, ``workers`` at a time; (seconds, new key ids)."""
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lb") as pool:
            started = time.perf_counter()
            new_ids = list(pool.map(self.rotate, targets))
            return time.perf_counter() - started, new_ids


def iam_ceiling(
    admin: servers.MotoAdmin, users: list[str], workers: int, calls: int
) -> tuple[float, float]:
    """ListAccessKeys as fast as ``workers`` threads can: (calls per second, seconds)."""
    local = threading.local()

    def client() -> Any:
        if not hasattr(local, "iam"):
            local.iam = boto3.Session(
                aws_access_key_id=admin.access_key_id,
                aws_secret_access_key=admin.secret_access_key,
                region_name=admin.region,
            ).client("iam", endpoint_url=admin.endpoint, config=_CONFIG)
        return local.iam

    def one(index: int) -> None:
        client().list_access_keys(UserName=users[index % len(users)])

    warm = threading.Barrier(workers)

    def build(_: int) -> None:
        client()
        warm.wait(30)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ceiling") as pool:
        list(pool.map(build, range(workers)))
        started = time.perf_counter()
        list(pool.map(one, range(calls)))
        seconds = time.perf_counter() - started
    return calls / seconds, seconds
